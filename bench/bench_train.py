"""Training speed: our Theano network against a PyTorch twin, in one run, same shapes.

    python bench/bench_train.py [--configs=default,64,64-overlap] [--batches=100] [--repeats=3]
                                [--conv=auto|conv2d|im2col]
    THEANO_FLAGS=device=cuda python bench/bench_train.py --only=theano      # GPU, Theano side
    python3 bench/bench_train.py --only=pytorch --torch-device=cuda         # GPU, PyTorch side

Times the training step (forward, backward, momentum/decay update) on minibatches of
100 already in memory, float32, both with the same number of threads (Theano: OpenMP
and its BLAS; PyTorch: torch.set_num_threads).  Prints seconds per training epoch of
NL = 40000 images (400 minibatches) for each and their ratio, best of --repeats rounds.
Each side runs in its own process, with its own OpenMP and BLAS set-up (in one process
the second library's OpenMP runtime inherits the first one's settings, which slowed
whichever side came second by up to 2x), and the processes alternate, so that a noisy
neighbour hits both alike.  The twin is skipped with a message when PyTorch is absent
(pip install torch==2.13.0).  --only=theano or --only=pytorch runs one side in this
process: on the GPU machine no Python has both (Theano lives in the gpu-kit bundle,
PyTorch in the system Python), so compare the two outputs' seconds there.
--conv picks how the Theano side computes the convolution (convnet.ConvLayer's impl).
"""
import importlib.util
import os
import subprocess
import sys
import time

USER_ENV = dict(os.environ)     # before machine adds its settings: each side's process starts from this

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import machine  # noqa: E402,F401  (first: the BLAS kernels, before numpy loads its OpenBLAS)
import numpy as np  # noqa: E402

CONFIGS = {  # name: (filters, pool window, pool stride)
    'default': (16, (4, 4), None),
    '64': (64, (4, 4), None),
    '64-overlap': (64, (4, 4), (2, 2)),
}
NL, BATCH, XDIM, H2, K = 40000, 100, (3, 32, 32), 1000, 10
EVAL_ROWS = 500     # the driver's evaluation minibatches (nnet.EVAL_ROWS; this module imports no Theano)
ETA, MU, LAM = 0.01, 0.9, 0.0001


def theano_step(config, X, y, batches, conv):
    import convnet
    import nnet
    import runlog
    F, ds, st = CONFIGS[config]
    net = convnet.CNN(np.random.RandomState(0), XDIM, [(F, (5, 5), ds, st)], [H2], K, conv=conv)
    trainer = nnet.Trainer(net, {'L': (X, y)}, BATCH, ETA, MU, LAM, input_shape=XDIM)
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
    thread settings that machine.py makes for Theano (GOMP_SPINCOUNT is read by PyTorch's OpenMP
    too); the BLAS kernels stay as chosen.  Call before importing torch."""
    for name in ('GOMP_SPINCOUNT', 'OPENBLAS_THREAD_TIMEOUT'):
        if name not in user_env:
            os.environ.pop(name, None)


def torch_twin(config, device):
    """The network and update rule in PyTorch, initialised as ours: (logits function, optimizer)."""
    as_pytorch_runs()
    import torch
    import torch.nn.functional as fn
    F, ds, st = CONFIGS[config]
    st = st or ds
    side = (28 - ds[0]) // st[0] + 1
    H1 = F * side * side
    g = torch.Generator().manual_seed(0)
    Wc = (torch.randn(F, 3, 5, 5, generator=g) * 0.01).to(device).requires_grad_()
    bc = torch.zeros(F, device=device, requires_grad=True)
    W2 = (torch.randn(H2, H1, generator=g) * 0.01).to(device).requires_grad_()
    b2 = torch.zeros(H2, device=device, requires_grad=True)
    W3 = (torch.randn(K, H2, generator=g) * 0.01).to(device).requires_grad_()
    b3 = torch.zeros(K, device=device, requires_grad=True)
    # torch's SGD: v <- mu v + (g + lam W); W <- W - eta v, i.e. our rule with dW = -eta v
    opt = torch.optim.SGD([{'params': [Wc, W2, W3], 'weight_decay': LAM},
                           {'params': [bc, b2, b3], 'weight_decay': 0.0}], lr=ETA, momentum=MU)

    def logits(xb):
        h = fn.max_pool2d(fn.conv2d(xb, Wc), ds, st)
        h = fn.relu(h + bc.view(1, -1, 1, 1)).flatten(1)
        return fn.linear(fn.relu(fn.linear(h, W2, b2)), W3, b3)
    return logits, opt


def torch_step(config, X, y, batches, threads, device):
    as_pytorch_runs()
    import torch
    import torch.nn.functional as fn
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    logits, opt = torch_twin(config, device)
    Xt = torch.from_numpy(X).view(-1, *XDIM).to(device)       # all data on the device, as ours
    yt = torch.from_numpy(y.astype(np.int64)).to(device)

    def step(xb, yb):
        loss = fn.cross_entropy(logits(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run():
        sync()
        t = time.perf_counter()
        for b in range(batches):
            step(Xt[b * BATCH:(b + 1) * BATCH], yt[b * BATCH:(b + 1) * BATCH])
        sync()
        return (time.perf_counter() - t) / batches
    run()
    return run


def measure(side, config, batches, rounds, torch_device, conv):
    """Seconds per minibatch, best of `rounds`, for one side in this process."""
    rng = np.random.RandomState(0)
    if side == 'theano':
        import nnet
        X = rng.randn(batches * BATCH, 3072).astype(nnet.floatX)
    else:
        X = rng.randn(batches * BATCH, 3072).astype('float32')
    y = rng.randint(0, K, batches * BATCH).astype('int32')
    run = (theano_step(config, X, y, batches, conv) if side == 'theano'
           else torch_step(config, X, y, batches, os.cpu_count(), torch_device))
    return min(run() for _ in range(rounds))


def options(argv, usage):
    """The --name=value arguments as a dict; -h or --help prints the usage, anything else stops."""
    if any(a in ('-h', '--help') for a in argv):
        print(usage)
        sys.exit(0)
    wrong = [a for a in argv if not (a.startswith('--') and '=' in a)]
    if wrong:
        sys.exit('error: %s: arguments are --name=value (see --help)' % ' '.join(wrong))
    return dict(a[2:].split('=', 1) for a in argv)


def main(argv):
    opts = options(argv, __doc__)
    configs = opts.get('configs', ','.join(CONFIGS)).split(',')
    batches = int(opts.get('batches', 100))
    repeats = int(opts.get('repeats', 3))
    torch_device = opts.get('torch-device', 'cpu')
    conv = opts.get('conv', 'auto')
    if 'only' in opts:                          # one side, in this process
        if opts['only'] == 'theano':
            import convnet
            import runlog
            runlog.print_run_info()
            print('# convolution: %s' % convnet.conv_impl(conv))
        else:
            as_pytorch_runs()
            import torch
            print('# PyTorch %s, %d threads, device %s' % (torch.__version__, os.cpu_count(), torch_device))
        for config in configs:
            seconds = measure(opts['only'], config, batches, repeats, torch_device, conv) * NL / BATCH
            print('%-12s %s %.3f' % (config, opts['only'], seconds), flush=True)
        return
    import runlog
    runlog.print_run_info()
    sides = ['theano']
    if importlib.util.find_spec('torch'):
        sides.append('pytorch')
    else:
        print('# PyTorch not installed: skipping the twin (pip install torch==2.13.0)')
    print('# seconds per training epoch (%d minibatches of %d), best of %d rounds in %d alternating '
          'processes a side; %d timed minibatches a round' % (NL // BATCH, BATCH, 2 * repeats, repeats, batches))
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
