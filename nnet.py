"""Neural-net building blocks in Theano: layers, networks, SGD training, and the drivers' plumbing.

Import this module before Theano: it first fills in the Theano flags a current machine
needs (see theano_defaults), so that `import theano` works out of the box.

    FullLayer        dense layer, W and optional bias b, linear / ReLU / softmax
    Network, MLP     a stack of layers; flat params, weight-decayed params
    Trainer          whole splits in theano.shared, minibatches picked by index inside
                     the compiled functions, SGD with momentum and weight decay
    the drivers' common parts: --name=value overrides, the published log, results records
"""
import ast
import configparser
import ctypes.util
import datetime
import glob
import json
import os
import platform
import re
import signal
import sys
import time

import numpy as np


def _user_flags():
    """The Theano flags the user set, as {name: value}, from THEANO_FLAGS and .theanorc files."""
    flags = {}
    rc = os.environ.get('THEANORC', '~/.theanorc:~/.theanorc.txt')
    parser = configparser.ConfigParser()
    parser.read([os.path.expanduser(p) for p in rc.split(os.pathsep) if p])
    for section in parser.sections():
        for key, value in parser.items(section):
            flags[key if section == 'global' else section + '.' + key] = value
    for item in os.environ.get('THEANO_FLAGS', '').split(','):
        if '=' in item:
            key, value = item.split('=', 1)
            flags[key.strip()] = value.strip()
    return flags


def linkable_openblas(ldflags=''):
    """Path of the libopenblas.so that `-lopenblas` links (the -dev package), or None.

    Searched in g++'s order: the -L folders in ldflags, LIBRARY_PATH, the system folders.
    """
    for d in (re.findall(r'-L\s*(\S+)', ldflags) + os.environ.get('LIBRARY_PATH', '').split(os.pathsep)
              + ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib',
                 '/usr/local/lib']):
        found = glob.glob(os.path.join(d, 'libopenblas.so')) if d else []
        if found:
            return found[0]
    return None


def theano_defaults():
    """Add the flags that Theano 1.0.5 needs today to THEANO_FLAGS, never overriding the user's.

    - blas.ldflags: Theano reads numpy's BLAS description, which current numpy wheels
      no longer carry, and fails at import.  Use the system OpenBLAS when there is one
      (apt-get install libopenblas-dev); else Theano's slow numpy-C-API fallback.
    - floatX=float32: what GPUs compute in, and twice as fast as float64 on the CPU.
    - openmp=True: Theano's C ops (convolution, pooling, elementwise) then use all cores,
      and GOMP_SPINCOUNT=10000 (unless set): after each parallel op, OpenMP's idle threads
      spin for a while and steal the cores that OpenBLAS's threads need for the next dot
      product: a default training step took 19-25 ms with both threaded as is, about 9 ms
      this way on 2 cores, and it beat OPENBLAS_NUM_THREADS=1 too (RESULTS.md).
      The other way round, OPENBLAS_THREAD_TIMEOUT=4 (unless set): OpenBLAS's idle threads
      otherwise spin for 2^28 cycles (~0.1 s, i.e. all the time) after each call, taking a
      core from the pooling and elementwise ops; measured: 64 filters with overlapping
      pooling 51-55 s an epoch before, 21-22 s with both settings and allow_gc=False.
    - allow_gc=False: keep each op's output buffer from one call to the next instead of
      freeing and reallocating it (tens of MB a step, fresh pages from the kernel every
      time): the overlapping-pool network trained at 29 s an epoch instead of 51-55 s.
    Returns the notes for the log, one string per decision.
    """
    user = _user_flags()
    added, notes = [], []
    ldflags = user.get('blas.ldflags')
    if ldflags is None:
        openblas = linkable_openblas()
        ldflags = '-lopenblas' if openblas else ''
        added.append('blas.ldflags=' + ldflags)
        notes.append('blas.ldflags=-lopenblas (%s, chosen automatically)' % openblas if openblas else
                     'WARNING: no OpenBLAS found, Theano uses its slow numpy fallback for '
                     'BLAS: install libopenblas-dev (Debian/Ubuntu) or set blas.ldflags')
    if 'floatX' not in user:
        added.append('floatX=float32')
    if 'allow_gc' not in user:
        added.append('allow_gc=False')
    openmp = user.get('openmp', 'True' if ldflags.strip() else 'False').lower() in ('true', '1')
    if 'openmp' not in user:
        if openmp:
            added.append('openmp=True')
        else:   # the numpy fallback calls into Python from CorrMM's OpenMP threads: fatal
            notes.append('openmp stays off: the numpy BLAS fallback cannot run in OpenMP threads')
    if openmp and not ({'GOMP_SPINCOUNT', 'OMP_WAIT_POLICY'} & set(os.environ)):
        os.environ['GOMP_SPINCOUNT'] = '10000'      # read when Theano first loads libgomp
        notes.append('GOMP_SPINCOUNT=10000 (idle OpenMP threads leave the cores to OpenBLAS sooner)')
    if openmp and 'OPENBLAS_THREAD_TIMEOUT' not in os.environ:
        os.environ['OPENBLAS_THREAD_TIMEOUT'] = '4'  # read when Theano's modules load libopenblas
        notes.append('OPENBLAS_THREAD_TIMEOUT=4 (idle OpenBLAS threads sleep at once, '
                     'leaving the cores to the OpenMP ops)')
    if added:
        os.environ['THEANO_FLAGS'] = ','.join(filter(None, [os.environ.get('THEANO_FLAGS', '')] + added))
    if malloc_is_ours():
        notes.append('malloc: once the data are in place, mmap off and trim at 1 GiB '
                     '(buffers freed by Theano ops are reused, not unmapped)')
    return notes


MALLOC_SETTINGS = ('MALLOC_MMAP_MAX_', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'GLIBC_TUNABLES')


def malloc_is_ours():
    """glibc's malloc, and the user set none of its tunables."""
    return platform.libc_ver()[0] == 'glibc' and not set(MALLOC_SETTINGS) & set(os.environ)


def keep_freed_memory():
    """Make glibc's malloc serve big buffers from its heap and keep what is freed there.

    Some of Theano's C ops allocate their output afresh on every call, whatever allow_gc says
    (MaxPoolGrad always does: it compares the output's first dimension with its rank).
    glibc serves blocks over 32 MB with mmap and returns them with munmap: every training
    step then faults in fresh zeroed pages and interrupts the other cores to flush their
    TLBs.  With 256 filters (80 MB pooling gradients) a step took 222 ms, more than half of
    the CPU time in the kernel; with mmap off and no trimming, 89 ms.  Called by Trainer
    once the data sit in their shared matrix: that one big block is faster to make with
    mmap (0.07 s against 0.8-1.6 s for 737 MB from the heap, page by page).
    """
    if malloc_is_ours():
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


THEANO_NOTES = theano_defaults()

import theano                                        # noqa: E402
import theano.tensor as T                            # noqa: E402

floatX = theano.config.floatX


# ---------------------------------------------------------------- layers

# ReLU as max(a, 0): the values of T.nnet.relu's 0.5 (a + |a|), and the same gradient except
# at exactly 0; its graph has no 0.5 constant, which made a Dot22Scalar module that
# Theano 1.0.5 cannot cache and rebuilt with g++ on every start (0.5 s).
ACTIVATIONS = {'linear': lambda a: a, 'relu': lambda a: T.maximum(a, 0), 'softmax': T.nnet.softmax}
W_STD = 0.01


def normal_weights(rng, shape, std=W_STD):
    """Initial weights from a zero-mean normal of standard deviation std (default 0.01).

    The published W are zero-mean normal of an unrecorded scale; 0.01 is the era's usual
    choice (Krizhevsky et al. 2012, Caffe's examples).  Measured on the published network
    (50 epochs, rebuilt CIFAR-10): test 69.97% with 0.01, 70.07% with PyTorch's default scale
    1/sqrt(3 fan_in), 67.90% with He's sqrt(2/fan_in).
    """
    return theano.shared(rng.normal(0.0, std, shape).astype(floatX))


class FullLayer:
    """Fully connected: activation(x W + b); with bias=False no b is created at all."""

    def __init__(self, rng, n_in, n_out, activation='relu', bias=True, Wstd=W_STD):
        self.W = normal_weights(rng, (n_in, n_out), Wstd)
        self.b = theano.shared(np.zeros(n_out, floatX)) if bias else None
        self.activation = activation
        self.params = [self.W] + ([self.b] if bias else [])
        self.decay = [self.W]
        self.output_shape = (n_out,)

    def output(self, x):
        a = T.dot(x, self.W)
        return ACTIVATIONS[self.activation](a + self.b if self.b is not None else a)

    def cost_terms(self, x, y):
        """Summed cross-entropy and number correct of this softmax layer's output against integer labels.

        One op gives both: Theano's fused, numerically stable softmax/cross-entropy (what
        its optimizer makes of categorical_crossentropy(softmax(.)); one-hot float targets,
        as first tried in the original work, gave NaN) also returns each row's argmax.  A
        separate T.argmax would run on the CPU even with device=cuda (Theano 1.0.5 has a
        GPU argmax only through cuDNN), fetching the scores from the GPU in mid-step.
        """
        if self.activation != 'softmax':
            raise ValueError('cost_terms needs a softmax layer, not %s' % self.activation)
        b = self.b if self.b is not None else T.zeros((self.output_shape[0],), floatX)
        nll, _, predicted = T.nnet.crossentropy_softmax_argmax_1hot_with_bias(T.dot(x, self.W), b, y)
        return nll.sum(), T.eq(predicted, y).sum()


class Network:
    """A stack of layers, each with .output(x), .params, .decay (weights to decay) and .output_shape."""

    def __init__(self, layers):
        self.layers = layers
        for i, layer in enumerate(layers):
            for p in layer.params:
                p.name = '%s%d' % ('W' if any(p is w for w in layer.decay) else 'b', i + 1)
        self.params = [p for layer in layers for p in layer.params]
        self.decay = [p for layer in layers for p in layer.decay]

    def output(self, x):
        for layer in self.layers:
            x = layer.output(x)
        return x

    def cost_terms(self, x, y):
        """Summed cross-entropy and number correct against integer labels y (the last layer's cost_terms)."""
        for layer in self.layers[:-1]:
            x = layer.output(x)
        return self.layers[-1].cost_terms(x, y)

    def save(self, path, settings):
        """Parameters as plain arrays in a .npz with the settings (JSON), written atomically."""
        arrays = {'%02d_%s' % (i, p.name): p.get_value() for i, p in enumerate(self.params)}
        tmp = path + '.tmp.npz'
        np.savez(tmp, settings=json.dumps(settings, default=str), **arrays)
        os.replace(tmp, path)

    def load(self, path):
        """Set the parameters from a .npz written by save(); returns its settings."""
        with np.load(path) as f:
            names = sorted(k for k in f.files if k != 'settings')
            if len(names) != len(self.params):
                raise ValueError('%s holds %d parameters, this network has %d'
                                 % (path, len(names), len(self.params)))
            for name, p in zip(names, self.params):
                if f[name].shape != p.get_value(borrow=True).shape:
                    raise ValueError('%s: %s has shape %s, the network expects %s'
                                     % (path, name, f[name].shape, p.get_value(borrow=True).shape))
                p.set_value(f[name].astype(floatX))
            return json.loads(str(f['settings']))


class MLP(Network):
    """Fully connected ReLU layers of the sizes in `hidden`, then a softmax over K classes."""

    def __init__(self, rng, n_in, hidden, K, Wstd=W_STD):
        sizes = [n_in] + list(hidden)
        layers = [FullLayer(rng, a, b, 'relu', Wstd=Wstd) for a, b in zip(sizes[:-1], sizes[1:])]
        super().__init__(layers + [FullLayer(rng, sizes[-1], K, 'softmax', Wstd=Wstd)])


# ---------------------------------------------------------------- cost and training

class TrainingDiverged(Exception):
    pass


class Trainer:
    """SGD with momentum and weight decay for a Network, over splits held in theano.shared.

    All splits sit in one shared matrix (on the GPU with device=cuda) and the compiled
    functions take row bounds, so no data cross the bus per minibatch.  That needs
    (NL + NV + NT) x D floats of device memory: 737 MB for CIFAR-10, far below any
    current GPU; a data set that does not fit would have to be fed in chunks.

    Update, for every parameter, with decay (lam) on the weights W only:
        dW <- -eta * (dE/dW + lam * W) + mu * dW;   W <- W + dW
    eta, mu and lam are shared scalars: change them between epochs without recompiling.
    """

    def __init__(self, net, data, batchsize, eta, mu, lam, input_shape=None):
        self.net, self.batchsize = net, batchsize
        self.bounds, start = {}, 0
        for name, (X, y) in data.items():
            self.bounds[name] = (start, start + len(y))
            start += len(y)
        # borrow: the concatenation is ours alone, so no second 737 MB copy
        self.X = theano.shared(np.concatenate([np.asarray(X, floatX) for X, y in data.values()]), 'X',
                               borrow=True)
        self.y = theano.shared(np.concatenate([np.asarray(y, 'int32') for X, y in data.values()]), 'y',
                               borrow=True)
        self.eta = theano.shared(np.asarray(eta, floatX), 'eta')
        self.mu = theano.shared(np.asarray(mu, floatX), 'mu')
        self.lam = theano.shared(np.asarray(lam, floatX), 'lam')
        keep_freed_memory()

        start, stop = T.lscalars('start', 'stop')
        x, y = T.matrix('x'), T.ivector('y')
        xin = x.reshape((x.shape[0],) + tuple(input_shape)) if input_shape else x
        sum_cost, ncorrect = net.cost_terms(xin, y)
        givens = {x: self.X[start:stop], y: self.y[start:stop]}
        grads = T.grad(sum_cost / x.shape[0].astype(floatX), net.params)
        updates = []
        for p, g in zip(net.params, grads):
            v = theano.shared(np.zeros_like(p.get_value()), 'd' + p.name)
            if any(p is w for w in net.decay):
                g = g + self.lam * p
            v_new = -self.eta * g + self.mu * v
            updates += [(v, v_new), (p, p + v_new)]
        t0 = time.time()
        self.train_fn = theano.function([start, stop], [sum_cost, ncorrect], updates=updates,
                                        givens=givens, name='train')
        self.eval_fn = theano.function([start, stop], [sum_cost, ncorrect], givens=givens, name='eval')
        self.compile_seconds = time.time() - t0

    def batches(self, split):
        first, end = self.bounds[split]
        return [(i, min(i + self.batchsize, end)) for i in range(first, end, self.batchsize)]

    def _sweep(self, fn, split, what):
        total_cost = total_correct = 0.0
        for b, (i, j) in enumerate(self.batches(split)):
            cost, correct = fn(i, j)
            if not np.isfinite(cost):
                raise TrainingDiverged('cost became %s in %s, minibatch %d: lower eta or check the data'
                                       % (cost, what, b))
            total_cost += float(cost)
            total_correct += float(correct)
        n = self.bounds[split][1] - self.bounds[split][0]
        return total_cost / n, 100.0 * total_correct / n

    def train_epoch(self, split='L', what='training'):
        """One pass of SGD; returns the pass's own mean cost and % correct (no second pass)."""
        return self._sweep(self.train_fn, split, what)

    def evaluate(self, split):
        """Mean cost and % correct over a split, in minibatches (a short last one is weighted right)."""
        return self._sweep(self.eval_fn, split, 'evaluating ' + split)

    def ops(self):
        """The op classes of the compiled training function: ({GPU op: count}, {other op: count})."""
        on_gpu, other = {}, {}
        for node in self.train_fn.maker.fgraph.apply_nodes:
            op = type(node.op)
            where = on_gpu if op.__module__.startswith('theano.gpuarray') else other
            where[op.__name__] = where.get(op.__name__, 0) + 1
        return on_gpu, other


# ---------------------------------------------------------------- the drivers' common parts

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
            print(json.dumps({'device': device_description()}))
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


def blas_description():
    flags = theano.config.blas.ldflags
    if 'openblas' in flags:
        try:
            lib = ctypes.CDLL(linkable_openblas(flags) or ctypes.util.find_library('openblas'))
            lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
            forced = os.environ.get('OPENBLAS_CORETYPE')
            return 'OpenBLAS %s, %s kernels%s (%s)' % (
                lib.openblas_get_config().decode().split()[1], lib.openblas_get_corename().decode(),
                ' forced by OPENBLAS_CORETYPE' if forced else '', flags)
        except (OSError, AttributeError, IndexError):
            pass
    return flags or "numpy C-API fallback (blas.ldflags='')"


def gpu_asked():
    """THEANO_FLAGS ask for a GPU (device=cuda...; Theano's old back end said gpu...)."""
    return theano.config.device.startswith(('cuda', 'gpu'))


def device_description():
    device = theano.config.device
    if gpu_asked():
        try:
            from theano.gpuarray.type import get_context
            return '%s (%s)' % (get_context(None).devname, device)
        except Exception:
            return device + ' (not initialised)'
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = re.search(r'model name\s*:\s*(.*)', f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return 'cpu: %s, %d cores' % (model, os.cpu_count())


def run_info():
    """What the log's first line and the results record say about where and how this ran."""
    return {'device': device_description(), 'floatX': floatX, 'theano': theano.__version__,
            'numpy': np.__version__, 'blas': blas_description(), 'python': platform.python_version(),
            'THEANO_FLAGS': os.environ.get('THEANO_FLAGS', ''),
            'host': platform.node(), 'date': datetime.datetime.now().isoformat(timespec='seconds')}


def require_gpu_if_asked(trainer=None):
    """Theano falls back to the CPU silently when the GPU cannot start: refuse to run mislabelled.

    Drivers call it before loading data (did the GPU back end start?) and again with the
    compiled Trainer (does its training function run on the GPU?).
    """
    if not gpu_asked():
        return
    import theano.gpuarray
    if not theano.gpuarray.pygpu_activated:
        try:
            import pygpu  # noqa: F401
            cause = 'the GPU did not initialise (see the ERROR line above: driver, libcuda, nvrtc)'
        except ImportError as e:
            cause = 'pygpu is not installed (%s): install libgpuarray/pygpu, see the README' % e
    elif trainer is not None and not trainer.ops()[0]:
        cause = 'the compiled training function has no GPU op'
    else:
        return
    sys.exit('error: THEANO_FLAGS asks for %s, but %s' % (theano.config.device, cause))


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
    for note in THEANO_NOTES:
        print('# ' + note)
    return info


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def train_and_log(trainer, nepoch, script, settings, info, outdir, t_start, t_data, **extra):
    """The published training loop and log; ends by writing the record and the parameters.

    Rows `epoch | costL accL | costV accV | seconds` at epochs 0-5, every 10th and the
    last; the training figures of epoch >= 1 come from the training pass itself.  Then
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
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        for epoch in range(nepoch + 1):
            if epoch == 0:
                costL, accL = trainer.evaluate('L')
            else:
                costL, accL = trainer.train_epoch('L', 'epoch %d' % epoch)
            if should_log(epoch) or epoch == nepoch:
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
    record['params'] = params_path
    trainer.net.save(params_path, dict(settings, status=status))
    with open(results_path, 'a') as f:             # one line, appended whole: old lines stay intact
        f.write(json.dumps(record, default=str) + '\n')
    print('# parameters: %s\n# record appended to %s' % (params_path, results_path))
    return {'completed': 0, 'interrupted': 130}.get(status, 1)
