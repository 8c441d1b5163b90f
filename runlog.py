"""The drivers' common plumbing: --name=value overrides, the published log, the run's record, Ctrl-C.

Used by cifar10_convnet.py and mnist_mlp.py on top of nnet.Trainer.
"""
import ast
import datetime
import json
import os
import platform
import re
import signal
import sys
import time

import machine
from nnet import TrainingDiverged

import numpy as np                                   # noqa: E402
import theano                                        # noqa: E402


def config_names(namespace):
    """The hyperparameters of a driver: its public globals of plain types, in order."""
    return [k for k, v in namespace.items() if not k.startswith('_')
            and isinstance(v, (bool, int, float, str, tuple, type(None)))]


def apply_overrides(namespace, names, argv):
    """Apply --name=value arguments to the driver's globals; values are Python literals.

    Unknown names are rejected with the list of valid ones; each override is printed.
    --help (after any overrides) prints the settings and exits; its last two lines are
    JSON: the device, then the settings (sweep.py reads them).
    """
    for arg in argv:
        if arg == '--help':
            print(sys.modules['__main__'].__doc__ or '')
            for k in names:
                print('#   --%s=%r' % (k, namespace[k]))
            print(json.dumps({'device': machine.device_description()}))
            print(json.dumps({k: namespace[k] for k in names}))
            sys.exit(0)
        m = re.match(r'--(\w+)=(.*)$', arg, re.S)
        if not m or m.group(1) not in names:
            sys.exit('error: %r is not a setting; use --name=value with a name from:\n  %s'
                     % (arg, '  '.join('%s=%r' % (k, namespace[k]) for k in names)))
        name, text = m.groups()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text                                  # a bare string such as a path
        old = namespace[name]
        if isinstance(old, (bool, str, tuple)) and type(value) is not type(old):
            sys.exit('error: --%s needs a %s like %r, got %r' % (name, type(old).__name__, old, text))
        if isinstance(old, (int, float)) and not isinstance(old, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            sys.exit('error: --%s needs a number like %r, got %r' % (name, old, text))
        if isinstance(old, float):
            value = float(value)
        namespace[name] = value
        print('# override: %s = %r' % (name, value))


def run_info():
    """What the log's first line and the results record say about where and how this ran."""
    return {'device': machine.device_description(), 'floatX': theano.config.floatX, 'theano': theano.__version__,
            'numpy': np.__version__, 'blas': machine.blas_description(), 'python': platform.python_version(),
            'THEANO_FLAGS': os.environ.get('THEANO_FLAGS', ''),
            'host': platform.node(), 'date': datetime.datetime.now().isoformat(timespec='seconds')}


def print_ops(trainer):
    """Log lines naming the ops of the training step, the GPU's first: what ran where."""
    for where, ops in zip(('GPU', 'CPU'), trainer.ops()):
        if ops:
            print('# %s ops of the training step: %s' % (where, ', '.join(
                name + (' x%d' % n if n > 1 else '') for name, n in sorted(ops.items()))))


def should_log(epoch):
    return epoch <= 5 or epoch % 10 == 0


def print_run_info():
    """The log's first lines: where and how this runs.  Returns run_info()."""
    info = run_info()
    print('# %s | floatX %s | Theano %s | numpy %s | BLAS %s | THEANO_FLAGS=%s'
          % (info['device'], info['floatX'], info['theano'], info['numpy'], info['blas'],
             info['THEANO_FLAGS']))
    for note in machine.NOTES:
        print('# ' + note)
    return info


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def train_and_log(trainer, nepoch, script, settings, info, outdir, t_start, t_data, quickL=False, **extra):
    """The published training loop and log; ends by writing the record and the parameters.

    Rows `epoch | costL accL | costV accV | seconds` at epochs 0-5, every 10th and the
    last.  As published, each row evaluates the network after that epoch on the whole
    training set L and validation set V, in minibatches; quickL=True takes the training
    columns from the training pass itself instead (running figures while the weights
    move: cheaper, but not what the published log shows).  Then
    one JSON line appended to outdir/results.jsonl (settings, info, every logged row,
    test figures, data/compile/train/total seconds; t_start is the script's start, so
    the total explains what `time` shows) and the parameters in outdir/SCRIPT-TIME.npz.
    On Ctrl-C (or SIGTERM, as from `kill` or a job scheduler) or a diverging cost both are
    still written, marked as such.
    Returns the exit code: 0, 130 after Ctrl-C, 1 after divergence.
    """
    record = dict(script=script, settings=settings, **extra, **info)
    record['seconds'] = {'data': t_data, 'compile': trainer.compile_seconds}
    t0 = time.time()
    record['epochs'] = epochs = []
    status = 'completed'
    if quickL:
        print('# quickL: the training columns are running figures of the training pass, '
              'not the published evaluation after each epoch')
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        for epoch in range(nepoch + 1):
            if epoch == 0:
                costL, accL = trainer.evaluate('L')
            else:
                costL, accL = trainer.train_epoch('L', 'epoch %d' % epoch)
            if should_log(epoch) or epoch == nepoch:
                if epoch > 0 and not quickL:
                    costL, accL = trainer.evaluate('L')
                costV, accV = trainer.evaluate('V')
                epochs.append([epoch, costL, accL, costV, accV, time.time() - t0])
                print('%d | %.6f %.2f | %.6f %.2f | %.1f s' % tuple(epochs[-1]), flush=True)
        print('# NT = ', trainer.bounds['T'][1] - trainer.bounds['T'][0])
        costT, accT = trainer.evaluate('T')
        record['test'] = [costT, accT]
        print('%d | %.6f %.2f | %.6f %.2f | %.6f %.2f *' % (nepoch, costL, accL, costV, accV, costT, accT))
    except KeyboardInterrupt:
        status = 'interrupted'
        print('# interrupted at epoch %d: saving what there is' % epoch)
    except TrainingDiverged as e:
        status = 'diverged'
        print('# stopped: %s' % e)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    record['status'] = status
    record['seconds']['train'] = time.time() - t0
    record['seconds']['total'] = time.time() - t_start
    s = record['seconds']
    print('# seconds: data %.1f  compile %.1f  train %.1f  total %.1f'
          % (s['data'], s['compile'], s['train'], s['total']))
    os.makedirs(outdir, exist_ok=True)
    params_path = os.path.join(outdir, '%s-%s.npz' % (script, time.strftime('%Y%m%d-%H%M%S')))
    results_path = os.path.join(outdir, 'results.jsonl')
    record['params'] = os.path.basename(params_path)     # resolved from the records' folder
    trainer.net.save(params_path, dict(settings, status=status))
    with open(results_path, 'a') as f:             # one line, appended whole: old lines stay intact
        f.write(json.dumps(record, default=str) + '\n')
    print('# parameters: %s\n# record appended to %s' % (params_path, results_path))
    return {'completed': 0, 'interrupted': 130}.get(status, 1)
