"""Training speed: our Theano network against a PyTorch twin, in one run, same shapes.

    python bench/bench_train.py [--configs=default,64,64-overlap] [--batches=100] [--repeats=3]
    THEANO_FLAGS=device=cuda python bench/bench_train.py --only=theano      # GPU, Theano side
    python3 bench/bench_train.py --only=pytorch --torch-device=cuda         # GPU, PyTorch side

Times the training step (forward, backward, momentum/decay update) on minibatches of
100 already in memory, float32, both with the same number of threads (Theano: OpenMP
and its BLAS; PyTorch: torch.set_num_threads).  Prints seconds per training epoch of
NL = 40000 images (400 minibatches) for each and their ratio, best of --repeats
alternating rounds, so that a noisy neighbour hits both alike.  The twin is skipped
with a message when PyTorch is absent (pip install torch==2.13.0).  --only runs one side,
for machines where no Python has both (the GPU machine: Theano in the gpu-kit bundle,
PyTorch in the system Python); compare the two outputs' seconds by hand there.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

CONFIGS = {  # name: (filters, pool window, pool stride)
    'default': (16, (4, 4), None),
    '64': (64, (4, 4), None),
    '64-overlap': (64, (4, 4), (2, 2)),
}
NL, BATCH, XDIM, H2, K = 40000, 100, (3, 32, 32), 1000, 10
ETA, MU, LAM = 0.01, 0.9, 0.0001


def theano_step(config, X, y, batches):
    import convnet
    import nnet
    F, ds, st = CONFIGS[config]
    net = convnet.CNN(np.random.RandomState(0), XDIM, [(F, (5, 5), ds, st)], [H2], K)
    trainer = nnet.Trainer(net, {'L': (X, y)}, BATCH, ETA, MU, LAM, input_shape=XDIM)
    spans = trainer.batches('L')[:batches]

    def run():
        t = time.perf_counter()
        for i, j in spans:
            trainer.train_fn(i, j)
        return (time.perf_counter() - t) / len(spans)
    run()                                               # warm-up
    return run


def torch_step(config, X, y, batches, threads, device):
    import torch
    import torch.nn.functional as fn
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
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
    Xt = torch.from_numpy(X).view(-1, *XDIM).to(device)       # all data on the device, as ours
    yt = torch.from_numpy(y.astype(np.int64)).to(device)

    def step(xb, yb):
        h = fn.max_pool2d(fn.conv2d(xb, Wc), ds, st)
        h = fn.relu(h + bc.view(1, -1, 1, 1)).flatten(1)
        h = fn.relu(fn.linear(h, W2, b2))
        loss = fn.cross_entropy(fn.linear(h, W3, b3), yb)
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


def main(argv):
    opts = dict(a[2:].split('=', 1) for a in argv if a.startswith('--'))
    configs = opts.get('configs', ','.join(CONFIGS)).split(',')
    batches = int(opts.get('batches', 100))
    repeats = int(opts.get('repeats', 3))
    only = opts.get('only', 'both')
    torch_device = opts.get('torch-device', 'cpu')
    threads = os.cpu_count()
    torch = None
    if only != 'theano':      # before nnet: PyTorch's OpenMP keeps its own defaults (nnet sets GOMP_SPINCOUNT)
        try:
            import torch
            print('# PyTorch %s, %d threads, device %s' % (torch.__version__, threads, torch_device))
        except ImportError:
            print('# PyTorch not installed: skipping the twin (pip install torch==2.13.0)')
    floatX = 'float32'
    if only != 'pytorch':
        import nnet
        nnet.print_run_info()
        floatX = nnet.floatX
    rng = np.random.RandomState(0)
    X = rng.randn(batches * BATCH, 3072).astype(floatX)
    y = rng.randint(0, K, batches * BATCH).astype('int32')
    print('# seconds per training epoch (%d minibatches of %d), best of %d; %d timed minibatches'
          % (NL // BATCH, BATCH, repeats, batches))
    print('%-12s %10s %10s %8s' % ('config', 'theano', 'pytorch', 'ratio'))
    for config in configs:
        runners = {}
        if only != 'pytorch':
            runners['theano'] = theano_step(config, X, y, batches)
        if torch:
            runners['pytorch'] = torch_step(config, X, y, batches, threads, torch_device)
        best = {name: run() for name, run in runners.items()}
        for _ in range(repeats - 1):
            for name, run in runners.items():
                best[name] = min(best[name], run())
        epoch = {name: t * NL / BATCH for name, t in best.items()}
        both = len(epoch) == 2
        print('%-12s %10s %10s %8s' % (
            config, '%.2f' % epoch['theano'] if 'theano' in epoch else '-',
            '%.2f' % epoch['pytorch'] if 'pytorch' in epoch else '-',
            '%.2f' % (epoch['theano'] / epoch['pytorch']) if both else '-'), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
