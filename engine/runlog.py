"""The drivers' common plumbing: --name=value overrides, the published log, the run's record, Ctrl-C.

Used by cifar10_convnet.py and mnist_mlp.py on top of nnet.Trainer.
"""
import ast
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time

import numpy as np
import theano

from . import download, machine
from .claims import SHARED_CORES, CoreShare
from .records import SAVED_SETTINGS_ERRORS, minutes, new_params_path, record_path, saved_settings, write_record


class TrainingDiverged(Exception):
    """The cost became NaN or infinite: the run stops, and saves what there is."""


def config_names(namespace):
    """The hyperparameters of a driver: its public globals of plain types, in order."""
    return [k for k, v in namespace.items() if not k.startswith('_')
            and isinstance(v, (bool, int, float, str, tuple, type(None)))]


def apply_overrides(namespace, names, argv, check=None):
    """Apply --name=value arguments to the driver's globals; values are Python literals.

    Unknown names are rejected with the list of valid ones; each override is printed;
    check_settings then checks every value, and `check` (if given) how they fit together.
    --help or -h (after any overrides, checked too) prints the settings and exits;
    --help=json prints them as one JSON line, with the device (for sweep.py, which checks a
    grid's values so, and the benchmarks).  An output pipe already closed ends the run as in
    run_driver (`| head -1` with unbuffered output, PYTHONUNBUFFERED=1, can close it this early).
    """
    try:
        _apply_overrides(namespace, names, argv, check)
    except BrokenPipeError:
        sys.exit(closed_pipe_before_training())


def _apply_overrides(namespace, names, argv, check):
    overridden, help_asked = set(), None
    for arg in argv:
        if arg in ('--help', '-h', '--help=json'):
            help_asked = arg
            break
        m = re.match(r'--(\w+)=(.*)$', arg, re.S)
        if not m or m.group(1) not in names:
            sys.exit('error: %r is not a setting; use --name=value with a name from:\n  %s'
                     % (arg, '  '.join('%s=%r' % (k, namespace[k]) for k in names)))
        name, text = m.groups()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text                                  # a bare string such as a path
        if type(namespace[name]) is float and type(value) is int:
            value = float(value)                          # --eta=1 means 1.0
        namespace[name] = value
        overridden.add(name)
        print('# override: %s = %r' % (name, value))
    check_settings(namespace, names)
    if namespace.get('resume'):
        adopt_resumed_run(namespace, names, overridden)
    if check:
        check()
    if help_asked == '--help=json':
        print(json.dumps({'device': machine.device_description(), 'settings': {k: namespace[k] for k in names}}))
        sys.exit(0)
    if help_asked:
        lines = [sys.modules['__main__'].__doc__ or ''] + ['#   --%s=%r' % (k, namespace[k]) for k in names]
        say('\n'.join(lines + ['# device here: %s' % machine.device_description()]))    # `| head` too
        sys.exit(0)


# Settings a resumed run may override; the others set the stopped run's course.
FREE_ON_RESUME = ('nepoch', 'outdir', 'datadir', 'datanote')


def adopt_resumed_run(namespace, names, overridden):
    """--resume=FILE: the settings of the run that saved FILE (but for those of FREE_ON_RESUME
    given on the command line), checked before any work."""
    path = download.resolve(namespace['resume'])
    if not os.path.isfile(path):
        refuse('resume', namespace['resume'], 'a parameter file of an earlier run: %s is not a file' % path)
    try:
        saved = saved_settings(path)
    except SAVED_SETTINGS_ERRORS as e:
        refuse('resume', namespace['resume'], 'a parameter file of an earlier run: %s is none, or is damaged (%s)'
               % (path, e))
    if 'position' not in saved:
        refuse('resume', namespace['resume'], 'a parameter file saved by a run that can be resumed: %s was '
               'saved before runs could be (no momenta)' % path)
    if saved['status'] == 'diverged':
        refuse('resume', namespace['resume'], 'a parameter file of a run that did not diverge: %s holds the '
               'weights its NaN cost left' % path)
    for name in names:
        if name == 'resume' or name not in saved or (name in FREE_ON_RESUME and name in overridden):
            continue
        value = tuple(saved[name]) if isinstance(saved[name], list) else saved[name]
        if name in overridden and namespace[name] != value:
            refuse(name, namespace[name], 'the value of the run being resumed, %r (%s); a resumed run keeps its '
                   'settings, all but %s' % (value, path, ', '.join(FREE_ON_RESUME)))
        if namespace[name] != value:
            print('# resume: %s = %r, as the run being resumed (this script says %r)' % (name, value, namespace[name]))
            namespace[name] = value
    epoch = saved['position']['epoch']          # where it stopped; after its last epoch: nepoch + 1
    completed = saved['status'] == 'completed'
    needed = epoch if completed else min(epoch, saved['nepoch'])
    if namespace['nepoch'] < needed:
        refuse('nepoch', namespace['nepoch'], 'at least %d to go on from %s (%s)' % (
            needed, path, 'its run completed %d epochs' % (epoch - 1) if completed else 'its run stopped in epoch %d' % epoch))
    namespace['resume'] = path


# ---------------------------------------------------------------- settings, checked before any work

def _number(v):
    return type(v) in (int, float) and np.isfinite(v)


def _count(v):
    return type(v) is int and v > 0


def _counts(n):
    return lambda v: type(v) is tuple and len(v) == n and all(_count(x) for x in v)


_LAYER = ('a positive integer, or None to drop the layer', lambda v: v is None or _count(v))
RULES = {  # setting: (what it takes, check)
    'W1dim': ('a tuple of 3 positive integers (filters, height, width)', _counts(3)),
    'ds1': ('a tuple of 2 positive integers (window height, width)', _counts(2)),
    'st1': ('None (the stride is the window) or a tuple of 2 positive integers', lambda v: v is None or _counts(2)(v)),
    'H1': _LAYER,
    'H2': _LAYER,
    'H3': _LAYER,
    'eta': ('a positive number', lambda v: _number(v) and v > 0),
    'mu': ('a number from 0 up to, not including, 1 (1 or more makes the steps grow without end)',
           lambda v: _number(v) and 0 <= v < 1),
    'lam': ('a number >= 0', lambda v: _number(v) and v >= 0),
    'Wstd': ('a positive number', lambda v: _number(v) and v > 0),
    'batchsize': ('a positive integer', _count),
    'nepoch': ('an integer >= 0 (0: evaluate the initial network only)', lambda v: type(v) is int and v >= 0),
    'seed': ('an integer from 0 to 2**32 - 1', lambda v: type(v) is int and 0 <= v < 2 ** 32),
    'ZCAwhitening': ('True or False', lambda v: type(v) is bool),
    'quickL': ('True or False', lambda v: type(v) is bool),
    'conv': ("'auto', 'conv2d' or 'im2col'", lambda v: v in ('auto', 'conv2d', 'im2col')),
    'datadir': ('None or a folder', lambda v: v is None or (type(v) is str and v.strip() != '')),
    'outdir': ('a folder', lambda v: type(v) is str and v.strip() != ''),
    'datanote': ('a string', lambda v: type(v) is str),
    'resume': ('None or the parameter file (.npz) of an earlier run', lambda v: v is None or (type(v) is str and v.strip() != '')),
}


def conv_impl(conv):
    """The convolution a run writes (convnet.ConvLayer's impl): the `conv` setting, with 'auto'
    im2col on the GPU (one product a minibatch, not GpuCorrMM's two per image), conv2d on the CPU."""
    if conv == 'auto':
        return 'im2col' if machine.gpu_asked() else 'conv2d'
    return conv


def refuse(name, value, what):
    """Stop the run before any work with one line naming the setting, its value and what it takes."""
    sys.exit('error: --%s=%r: needs %s' % (name, value, what))


def check_settings(namespace, names):
    """Refuse the first setting whose value does not fit its rule (RULES)."""
    for name in names:
        if name in RULES and not RULES[name][1](namespace[name]):
            refuse(name, namespace[name], RULES[name][0])


def folder(name, path):
    """A folder setting made ready: resolved (download.resolve), created; refused if it cannot be."""
    full = download.resolve(path)
    if os.path.exists(full) and not os.path.isdir(full):
        refuse(name, path, 'a folder: %s is a file' % full)
    try:
        os.makedirs(full, exist_ok=True)
    except OSError as e:
        refuse(name, path, 'a folder that can be created: %s: %s' % (full, e.strerror))
    if not os.access(full, os.W_OK | os.X_OK):
        refuse(name, path, 'a folder this user can write: %s is not' % full)
    return full


def run_info():
    """What the log's first line and the results record say about where and how this ran."""
    return {'device': machine.device_description(), 'floatX': theano.config.floatX, 'theano': theano.__version__,
            'numpy': np.__version__, 'blas': machine.blas_description(), 'python': platform.python_version(),
            'THEANO_FLAGS': os.environ.get('THEANO_FLAGS', ''),
            'host': platform.node(), 'date': datetime.datetime.now().isoformat(timespec='seconds'),
            **({'gpu_stack': machine.gpu_stack_description()} if machine.gpu_asked() else {})}


def data_loaded(data, resume):
    """The data's fingerprint in the log; a resumed run's data must be those of the run it goes
    on from (refused here, before the compile)."""
    print('# data fingerprint: %s' % data.fingerprint[:16], flush=True)
    theirs = resume and saved_settings(resume).get('data_fingerprint')
    if resume and theirs != data.fingerprint:
        sys.exit('error: --resume=%s: its run had other data (fingerprint %s; these: %s)' % (
            resume, theirs, data.fingerprint))


def print_ops(trainer):
    """Log lines naming the ops of the training step, the GPU's first: what ran where."""
    for where, ops in zip(('GPU', 'CPU'), trainer.ops()):
        if ops:
            print('# %s ops of the training step: %s' % (where, ', '.join(
                name + (' x%d' % n if n > 1 else '') for name, n in sorted(ops.items()))))


# A logged row, as published (epoch | costL accL | costV accV), and the seconds so far.
ROW = '%d | %.6f %.2f | %.6f %.2f | %.1f s'


def should_log(epoch):
    return epoch <= 5 or epoch % 10 == 0


def print_run_info():
    """The log's first lines: where and how this runs.  Returns run_info()."""
    info = run_info()
    print('# %s | floatX %s | Theano %s | numpy %s | BLAS %s | THEANO_FLAGS=%s'
          % (info['device'], info['floatX'], info['theano'], info['numpy'], info['blas'],
             info['THEANO_FLAGS']))
    if 'gpu_stack' in info:
        print('# GPU stack: ' + info['gpu_stack'])
    for note in machine.NOTES:
        print('# ' + note)
    return info


def say(text):
    """Print and flush; once stdout is a closed pipe (`| tee` stopped by the same Ctrl-C), say
    nothing more rather than fail: the run still has to write its record and parameters."""
    try:
        print(text, flush=True)
    except OSError:                     # BrokenPipeError, or a terminal gone
        silence_stdout()


def silence_stdout():
    """stdout to /dev/null from now on: also what Python flushes at exit, which would complain."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Progress:
    """Where the run is, on one terminal line between the log's rows (which can be 10 epochs
    apart: minutes): what it is doing, minibatches done, time so far and, while training, about
    how long is left.  Written to stderr only when that is a terminal, at most once a second,
    and cleared before each row, so neither the log (stdout, `| tee`) nor a redirected stderr
    ever holds it.  Trainer calls it after every minibatch; train_and_log sets `epoch`."""

    def __init__(self, nepoch, stream=None, clock=time.time):
        self.nepoch, self.stream, self.clock = nepoch, stream or sys.stderr, clock
        self.shown = False
        self.epoch = 0                  # the epoch being trained; 0: evaluating before training
        self.before = 0.0               # epochs a resumed run had trained before this process
        self.start = self.last = clock()
        try:
            self.active = self.stream.isatty()
        except (AttributeError, ValueError):        # no such method, or the stream is closed
            self.active = False

    def __call__(self, what, done, total):
        now = self.clock()
        if not self.active or now - self.last < 1:
            return
        self.last = now
        text = '%s: minibatch %d of %d, %s so far' % (what, done, total, minutes(now - self.start))
        trained = 0     # of what this process trains, whose pace the time so far gives
        if self.epoch and what.startswith('epoch') and self.nepoch > self.before:
            trained = (self.epoch - 1 + done / total - self.before) / (self.nepoch - self.before)
        if trained > 0:
            text += ', about %s left' % minutes((now - self.start) * (1 - trained) / trained)
        self.show(text)

    def show(self, text):
        if self.active:
            self._write('\r%s\033[K' % text)
            self.shown = True

    def clear(self):
        """Erase the line, so that what is printed next starts on a clean one."""
        if self.shown:
            self._write('\r\033[K')
            self.shown = False

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:                 # the terminal gone: the run goes on
            self.active = False


@contextlib.contextmanager
def waiting(text):
    """`text` on the terminal while a wait that prints nothing runs (stderr, only when it is a
    terminal, as Progress), erased after."""
    line = Progress(0)
    line.show(text)
    try:
        yield
    finally:
        line.clear()


def position(epoch, trained=(0, 0.0, 0.0)):
    """Where a run is, as its files hold it for --resume: the epoch it is in (nepoch + 1: the
    test set's evaluation) and, of that epoch's training pass, the minibatches done, their
    summed cost and their number correct (nnet.Trainer.trained)."""
    return dict(epoch=epoch, minibatch=trained[0], cost=trained[1], correct=trained[2])


def run_state(settings, record, status, position, train_seconds):
    """What a parameter file holds beside the arrays: the driver's settings and, for --resume
    (and sweep.py, which finds a killed run's checkpoint by them), where the run is and what
    it runs on."""
    return dict(settings, status=status, position=position, epochs=record['epochs'], train_seconds=train_seconds,
                data_fingerprint=record.get('data_fingerprint'), device=record.get('device'))


def write_checkpoint(trainer, path, state):
    """The parameters and momenta now, at path (atomic); True if written, else the log says why."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        trainer.save(path, state)
        return True
    except OSError as e:
        say('# could not write the checkpoint %s: %s; the run goes on without' % (path, e))
        return False


def save_run(record, trainer, settings, outdir, script):
    """The record first, then the parameters and momenta (atomic), together in outdir or, failing
    that, in the system's temporary folder (a record whose parameters could not be written beside
    it is removed).  Returns the parameter file, or None if neither could be written."""
    for where in (outdir, tempfile.gettempdir()):
        written = None
        try:
            os.makedirs(where, exist_ok=True)
            params_path = new_params_path(where, script)
            record['params'] = os.path.basename(params_path)      # resolved from the record's folder
            write_record(record_path(params_path), record)
            written = record_path(params_path)
            trainer.save(params_path, run_state(settings, record, record['status'], record['position'],
                                                record['seconds']['train']))
            say('# record: %s\n# parameters: %s' % (written, params_path))
            return params_path
        except OSError as e:
            if written:
                with contextlib.suppress(OSError):
                    os.remove(written)
            say('# could not save in %s: %s%s' % (where, e, '; trying the temporary folder instead'
                                                     if where == outdir else ''))
    return None


def run_driver(main):
    """A driver's main(), its exit code; Ctrl-C before training (loading, compiling: nothing to
    save yet) ends it with one line instead of a traceback, and so does a closed output pipe
    (`| head` has read its lines; from training on, say() keeps the run going)."""
    try:
        return main()
    except KeyboardInterrupt:
        say('# interrupted before training started: nothing to save')
        return 130
    except BrokenPipeError:
        return closed_pipe_before_training()


def closed_pipe_before_training():
    """One line instead of a traceback; the exit code of a process that SIGPIPE ended."""
    silence_stdout()
    sys.stderr.write('# the output pipe closed before training started: nothing to save\n')
    return 128 + signal.SIGPIPE


def train_and_log(trainer, nepoch, script, settings, info, outdir, t_start, t_data, quickL=False, resume=None,
                  **extra):
    """The published training loop and log; ends by writing the record and the parameters.

    Rows `epoch | costL accL | costV accV | seconds` at epochs 0-5, every 10th and the
    last.  As published, each row evaluates the network after that epoch on the whole
    training set L and validation set V, in minibatches; quickL=True takes the training
    columns from the training pass itself instead (running figures while the weights
    move: cheaper, but not what the published log shows).  Then the run's record, one JSON
    object in outdir/SCRIPT-TIME-PID.record.json (settings, info, every logged row, test
    figures, data/compile/train/total seconds; t_start is the script's start, so the total
    explains what `time` shows), and the parameters beside it in outdir/SCRIPT-TIME-PID.npz.
    Between rows, a Progress line on the terminal (stderr) says where the run is.
    On Ctrl-C (or SIGTERM, as from `kill` or a job scheduler) the current minibatch
    finishes, then both are still written, marked as such, even when stdout is a pipe that
    closed; the parameter file then also holds the momenta and where the run stopped, and
    resume=that file goes on from there, to the same figures as a run never stopped.  A
    diverging cost is written too.  If outdir cannot be written they go to the temporary
    folder, and the log says where.  At every logged row the parameters and momenta are also
    written to a checkpoint file (named in the log, removed once the run's own file is saved),
    from which a run killed outright (power, out of memory: nothing else written) goes on.
    Returns the exit code: 0, 130 after Ctrl-C, 1 after divergence, 74 if nothing could be saved.
    """
    record = dict(script=script, settings=settings, **extra, **info)
    record['seconds'] = {'data': t_data, 'compile': trainer.compile_seconds}
    record['epochs'] = epochs = []
    # rewritten at every logged row, so that a run killed outright (power, out of memory) can go on
    checkpoint = new_params_path(outdir, script, '.checkpoint.npz')
    say('# checkpoint at every logged row (if this run dies: --resume=it): %s' % checkpoint)
    first, start, before = 0, (0, 0.0, 0.0), 0.0
    if resume:
        state = trainer.restore(resume)            # its data were checked by data_loaded
        at = state['position']
        first, start, before = at['epoch'], (at['minibatch'], at['cost'], at['correct']), state['train_seconds']
        epochs += state['epochs']
        record['resumed'] = dict(at, file=resume, train_seconds=before)
        say('# resumed from %s: epoch %d, %d minibatches trained (%.1f s)%s'
            % (resume, first, at['minibatch'], before, '; its rows:' if epochs else ''))
        for row in epochs:
            say(ROW % tuple(row))
    t0 = time.time() - before               # the seconds column goes on from the stopped run's
    status, epoch = 'completed', first
    if quickL:
        say('# quickL: the training columns are running figures of the training pass, '
            'not the published evaluation after each epoch')

    def request_stop(signum, frame):
        trainer.stop_requested = True
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    trainer.progress = progress = Progress(nepoch)
    if os.environ.get(SHARED_CORES) and not machine.gpu_asked():    # a sweep's run: its share of the cores
        share = CoreShare(os.environ[SHARED_CORES], machine.set_threads)
        trainer.progress = lambda *done: (share(), progress(*done))
    if first > 0:
        progress.before = first - 1 + start[0] / len(trainer.batches('L'))
    try:
        for epoch in range(first, nepoch + 1):
            progress.epoch = epoch
            if epoch == 0:
                costL, accL = trainer.evaluate('L')
            else:
                costL, accL = trainer.train_epoch('L', 'epoch %d of %d' % (epoch, nepoch),
                                                  start if epoch == first else (0, 0.0, 0.0))
            if should_log(epoch) or epoch == nepoch:
                if epoch > 0 and not quickL:
                    costL, accL = trainer.evaluate('L')
                costV, accV = trainer.evaluate('V')
                epochs.append([epoch, costL, accL, costV, accV, time.time() - t0])
                progress.clear()
                say(ROW % tuple(epochs[-1]))
                if checkpoint and not write_checkpoint(trainer, checkpoint, run_state(
                        settings, record, 'checkpoint', position(epoch + 1), time.time() - t0)):
                    checkpoint = None
        epoch = nepoch + 1                  # the test set's evaluation
        say('# NT =  %d' % (trainer.bounds['T'][1] - trainer.bounds['T'][0]))
        costT, accT = trainer.evaluate('T')
        record['test'] = [costT, accT]
        progress.clear()
        say('%d | %.6f %.2f | %.6f %.2f | %.6f %.2f *' % tuple([nepoch] + epochs[-1][1:5] + [costT, accT]))
    except KeyboardInterrupt:
        status = 'interrupted'
        progress.clear()
        say('# interrupted at epoch %d: saving what there is' % epoch)
    except TrainingDiverged as e:
        status = 'diverged'
        progress.clear()
        say('# stopped: %s' % e)
    except Exception:                       # its traceback follows; the checkpoint is what survives
        progress.clear()
        if checkpoint and os.path.exists(checkpoint):
            say('# failed in epoch %d (the error below); to go on from its last logged row: python %s.py '
                '--resume=%s' % (epoch, script, checkpoint))
        raise
    trainer.progress = None
    # in a training epoch, as far as its pass went; in epoch 0 or the test pass, nothing trained
    record['position'] = position(epoch, trainer.trained) if 0 < epoch <= nepoch else position(epoch)
    # a second Ctrl-C or SIGTERM must not cut the saving short
    for sig in previous:
        signal.signal(sig, signal.SIG_IGN)
    try:
        record['status'] = status
        record['seconds']['train'] = time.time() - t0
        record['seconds']['total'] = time.time() - t_start
        s = record['seconds']
        say('# seconds: data %.1f  compile %.1f  train %.1f  total %.1f'
            % (s['data'], s['compile'], s['train'], s['total']))
        record['memory_mib'] = used = machine.memory_used()
        gpu = ', GPU %.2f GiB in use at the end' % (used['gpu_in_use'] / 1024) if 'gpu_in_use' in used else ''
        say('# memory: peak %.2f GiB resident%s' % (used['peak_resident'] / 1024, gpu))
        saved = save_run(record, trainer, settings, outdir, script)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if saved is None:
        return 74                               # EX_IOERR (the checkpoint, if any, stays)
    if checkpoint and os.path.exists(checkpoint):
        os.remove(checkpoint)                   # the saved file is newer
    if status == 'interrupted':
        say('# to go on from here: python %s.py --resume=%s' % (script, saved))
    return {'completed': 0, 'interrupted': 130}.get(status, 1)
