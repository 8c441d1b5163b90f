"""Training speed: our Theano network against a PyTorch twin, in one run, same shapes.

    python bench/bench_train.py [--configs=default,64,64-overlap,mnist-mlp] [--batches=100] [--repeats=3]
                                [--conv=auto|conv2d|im2col]
    THEANO_FLAGS=device=cuda python bench/bench_train.py --only=theano      # GPU, Theano side
    python3 bench/bench_train.py --only=pytorch --torch-device=cuda         # GPU, PyTorch side
    python3 bench/bench_train.py --only=pytorch --torch-device=cuda --torch-mode=graph

Times the training step (forward, backward, momentum/decay update) on minibatches of
100 already in memory, float32, both with the same number of threads (Theano: OpenMP
and its BLAS; PyTorch: torch.set_num_threads).  Prints seconds per training epoch (CIFAR-10:
NL = 40000 images, 400 minibatches; MNIST: 50000, 500) for each and their ratio, best of
--repeats rounds.  The configurations: the published CNN with 16 and 64 filters and with
overlapping pooling, and mnist_mlp.py's network (784 -> 1000 -> 1000 -> 10), each with its
driver's settings.
Each side runs in its own process, with its own OpenMP and BLAS set-up (in one process
the second library's OpenMP runtime inherits the first one's settings, which slowed
whichever side came second by up to 2x), and the processes alternate, so that a noisy
neighbour hits both alike.  The twin is skipped with a message when PyTorch is absent
(pip install torch==2.13.0).  --only=theano or --only=pytorch runs one side in this
process: on the GPU machine no Python has both (Theano lives in the gpu-kit bundle,
PyTorch in the system Python), so compare the two outputs' seconds there.
--conv picks how the Theano side computes the convolution (convnet.ConvLayer's impl).
--torch-mode=graph (GPU only) captures the twin's whole training step, forward, backward and
SGD update, once as a CUDA graph (torch.cuda.CUDAGraph) and replays it for each minibatch: at
batch 100 an eager step mostly measures kernel launches, and a graph is what a PyTorch user
would reach for.
"""
import collections
import importlib.util
import os
import subprocess
import sys
import time

USER_ENV = dict(os.environ)     # before machine adds its settings: each side's process starts from this

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from engine import machine  # noqa: E402

machine.set_up(theano=False)    # the BLAS kernels, before numpy loads its OpenBLAS; Theano's side makes the rest
import numpy as np  # noqa: E402

Setup = collections.namedtuple('Setup', 'driver xdim NL hidden eta mu lam convpool')
CIFAR10 = dict(driver='cifar10_convnet.py', xdim=(3, 32, 32), NL=40000, hidden=[1000],
               eta=0.01, mu=0.9, lam=0.0001)        # the published settings (cifar10_convnet.py)
CONFIGS = {  # convpool: (filters, pool window, pool stride), or None: no convolution
    'default': Setup(convpool=(16, (4, 4), None), **CIFAR10),
    '64': Setup(convpool=(64, (4, 4), None), **CIFAR10),
    '64-overlap': Setup(convpool=(64, (4, 4), (2, 2)), **CIFAR10),
    'mnist-mlp': Setup('mnist_mlp.py', (784,), 50000, [1000, 1000], 0.1, 0.9, 0.0, None),  # mnist_mlp.py's
}
BATCH, K, WSTD = 100, 10, 0.01
EVAL_ROWS = 500     # the driver's evaluation minibatches (nnet.EVAL_ROWS; this module imports no Theano)


def theano_trainer(config, X, y, conv):
    """The configuration's network and its compiled nnet.Trainer, as its driver builds them."""
    import convnet
    import nnet
    from engine import runlog
    setup = CONFIGS[config]
    rng = np.random.RandomState(0)
    if setup.convpool:
        F, ds, st = setup.convpool
        net = convnet.CNN(rng, setup.xdim, [(F, (5, 5), ds, st)], setup.hidden, K, conv=runlog.conv_impl(conv))
    else:
        net = nnet.MLP(rng, setup.xdim[0], setup.hidden, K, WSTD)
    return nnet.Trainer(net, {'L': (X, y)}, BATCH, setup.eta, setup.mu, setup.lam,
                        input_shape=setup.xdim if setup.convpool else None)


def theano_step(config, X, y, batches, conv):
    from engine import runlog
    trainer = theano_trainer(config, X, y, conv)
    runlog.print_ops(trainer)
    spans = trainer.batches('L')[:batches]

    def run():
        t = time.perf_counter()
        for i, j in spans:
            trainer.train_fn(i, j)
        return (time.perf_counter() - t) / len(spans)
    run()                                               # warm-up
    return run


def as_pytorch_runs(user_env=USER_ENV):
    """The twin runs as PyTorch users run it: the user's environment, less the OpenMP and OpenBLAS
    thread settings that machine.set_up makes for Theano (GOMP_SPINCOUNT is read by PyTorch's OpenMP
    too); the BLAS kernels stay as chosen.  Call before importing torch."""
    for name in ('GOMP_SPINCOUNT', 'OPENBLAS_THREAD_TIMEOUT'):
        if name not in user_env:
            os.environ.pop(name, None)


def torch_twin(config, device):
    """The network and update rule in PyTorch, initialised as ours: (logits function, optimizer)."""
    as_pytorch_runs()
    import torch
    import torch.nn.functional as fn
    setup = CONFIGS[config]
    g = torch.Generator().manual_seed(0)

    def weights(*shape):
        return (torch.randn(*shape, generator=g) * WSTD).to(device).requires_grad_()

    def zeros(n):
        return torch.zeros(n, device=device, requires_grad=True)
    n_in = setup.xdim[0]
    if setup.convpool:
        F, ds, st = setup.convpool
        st = st or ds
        side = (setup.xdim[1] - 5 - ds[0] + 1) // st[0] + 1
        n_in = F * side * side
        Wc, bc = weights(F, setup.xdim[0], 5, 5), zeros(F)
    dense = []
    for n_out in setup.hidden + [K]:
        dense.append((weights(n_out, n_in), zeros(n_out)))
        n_in = n_out
    Ws = [W for W, b in dense] + ([Wc] if setup.convpool else [])
    bs = [b for W, b in dense] + ([bc] if setup.convpool else [])
    # torch's SGD: v <- mu v + (g + lam W); W <- W - eta v, i.e. our rule with dW = -eta v
    opt = torch.optim.SGD([{'params': Ws, 'weight_decay': setup.lam},
                           {'params': bs, 'weight_decay': 0.0}], lr=setup.eta, momentum=setup.mu)

    def logits(xb):
        h = xb
        if setup.convpool:
            h = fn.max_pool2d(fn.conv2d(h, Wc), ds, st)
            h = fn.relu(h + bc.view(1, -1, 1, 1)).flatten(1)
        for W, b in dense[:-1]:
            h = fn.relu(fn.linear(h, W, b))
        return fn.linear(h, *dense[-1])
    return logits, opt


def torch_step(config, X, y, batches, threads, device, mode='eager'):
    as_pytorch_runs()
    import torch
    import torch.nn.functional as fn
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    logits, opt = torch_twin(config, device)
    Xt = torch.from_numpy(X).view(-1, *CONFIGS[config].xdim).to(device)   # all data on the device, as ours
    yt = torch.from_numpy(y.astype(np.int64)).to(device)

    def eager(xb, yb):
        loss = fn.cross_entropy(logits(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step = eager if mode == 'eager' else captured(eager, Xt[:BATCH].clone(), yt[:BATCH].clone(), opt)

    def run():
        sync()
        t = time.perf_counter()
        for b in range(batches):
            step(Xt[b * BATCH:(b + 1) * BATCH], yt[b * BATCH:(b + 1) * BATCH])
        sync()
        return (time.perf_counter() - t) / batches
    run()
    return run


def captured(eager, xb, yb, opt):
    """eager's whole step captured as one CUDA graph on the inputs xb, yb (PyTorch's recipe: a few
    eager steps on a side stream first, which also make SGD's momentum buffers); returns a step
    that copies a minibatch into them and replays the graph."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager(xb, yb)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        eager(xb, yb)

    def replay(x, y):
        xb.copy_(x)
        yb.copy_(y)
        graph.replay()
    return replay


def measure(side, config, batches, rounds, torch_device, conv, torch_mode='eager'):
    """Seconds per minibatch, best of `rounds`, for one side in this process."""
    rng = np.random.RandomState(0)
    X = rng.randn(batches * BATCH, int(np.prod(CONFIGS[config].xdim)))
    if side == 'theano':
        import nnet
        X = X.astype(nnet.floatX)
    else:
        X = X.astype('float32')
    y = rng.randint(0, K, batches * BATCH).astype('int32')
    run = (theano_step(config, X, y, batches, conv) if side == 'theano'
           else torch_step(config, X, y, batches, os.cpu_count(), torch_device, torch_mode))
    return min(run() for _ in range(rounds))


def options(argv, usage, defaults):
    """The --name=value arguments over defaults (name: default): a whole number where the default
    is one, configs a list of CONFIGS' names.  -h or --help prints the usage; anything else stops
    with one line."""
    if any(a in ('-h', '--help') for a in argv):
        print(usage)
        sys.exit(0)
    wrong = [a for a in argv if not (a.startswith('--') and '=' in a)]
    if wrong:
        sys.exit('error: %s: arguments are --name=value (see --help)' % ' '.join(wrong))
    opts = dict(defaults, configs=list(CONFIGS))
    for name, value in (a[2:].split('=', 1) for a in argv):
        if name not in opts:
            sys.exit('error: --%s: not an option here; they are --%s (see --help)' % (name, ', --'.join(opts)))
        if name == 'configs':
            value = value.split(',')
            if not set(value) <= set(CONFIGS):
                sys.exit('error: --configs=%s: needs names from %s' % (','.join(value), ', '.join(CONFIGS)))
        elif type(defaults[name]) is int:
            if not value.isdigit() or int(value) < 1:
                sys.exit('error: --%s=%s: needs a positive whole number' % (name, value))
            value = int(value)
        opts[name] = value
    return opts


def main(argv):
    opts = options(argv, __doc__, {'batches': 100, 'repeats': 3, 'torch-device': 'cpu', 'conv': 'auto',
                                   'only': None, 'torch-mode': 'eager'})
    configs, batches, repeats = opts['configs'], opts['batches'], opts['repeats']
    torch_device, conv, torch_mode = opts['torch-device'], opts['conv'], opts['torch-mode']
    if opts['only'] not in (None, 'theano', 'pytorch'):
        sys.exit('error: --only=%s: needs theano or pytorch' % opts['only'])
    if torch_mode not in ('eager', 'graph') or (torch_mode == 'graph' and not torch_device.startswith('cuda')):
        sys.exit('error: --torch-mode=%s: needs eager, or graph with --torch-device=cuda' % torch_mode)
    if opts['only']:                            # one side, in this process
        if opts['only'] == 'theano':
            machine.set_up()
            import convnet
            from engine import runlog
            runlog.print_run_info()
            machine.require_gpu_if_asked()  # not CPU figures under a GPU label
            print('# convolution: %s' % runlog.conv_impl(conv))
        else:
            as_pytorch_runs()
            import torch
            print('# PyTorch %s, %d threads, device %s, %s' % (
                torch.__version__, os.cpu_count(), torch_device, 'one CUDA graph a step' if torch_mode == 'graph'
                else 'eager'))
        for config in configs:
            seconds = measure(opts['only'], config, batches, repeats, torch_device, conv,
                              torch_mode) * CONFIGS[config].NL / BATCH
            print('%-12s %s %.3f' % (config, opts['only'], seconds), flush=True)
        return
    machine.set_up()
    from engine import runlog
    runlog.print_run_info()
    sides = ['theano']
    if importlib.util.find_spec('torch'):
        sides.append('pytorch')
    else:
        print('# PyTorch not installed: skipping the twin (pip install torch==2.13.0)')
    print('# seconds per training epoch (NL / %d minibatches: %s), best of %d rounds in %d alternating '
          'processes a side; %d timed minibatches a round' % (
              BATCH, ', '.join('%s %d' % (c, CONFIGS[c].NL // BATCH) for c in configs), 2 * repeats, repeats, batches))
    print('%-12s %10s %10s %8s' % ('config', 'theano', 'pytorch', 'ratio'))
    for config in configs:
        best = {}
        for _ in range(repeats):
            for side in sides:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), '--only=' + side,
                                      '--configs=' + config, '--batches=%d' % batches, '--repeats=2',
                                      '--conv=' + conv],
                                     env=USER_ENV, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(out.stdout + out.stderr)
                lines = out.stdout.strip().splitlines()
                if side == 'pytorch' and config == configs[0] and 'pytorch' not in best:
                    print(lines[0])                               # the twin's version line
                seconds = float(lines[-1].split()[-1])
                best[side] = min(best.get(side, seconds), seconds)
        print('%-12s %10.2f %10s %8s' % (
            config, best['theano'], '%.2f' % best['pytorch'] if 'pytorch' in best else '-',
            '%.2f' % (best['theano'] / best['pytorch']) if 'pytorch' in best else '-'), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
