"""The MNIST MLP experiment: two ReLU hidden layers and a softmax, trained with SGD.

    python mnist_mlp.py                               # CPU
    THEANO_FLAGS='device=cuda' python mnist_mlp.py    # GPU
    python mnist_mlp.py --H2=500 --nepoch=10
    python mnist_mlp.py --resume=runs/mnist_mlp-...npz    # go on from a stopped run

Edit the settings below or override them as --name=value, as in cifar10_convnet.py: every
setting is checked before any work; H1 = None or H2 = None drops that layer; relative
folders are taken from this script's folder.
"""
import time
_t_start = time.time()

import sys                              # noqa: E402

# ---- settings: the original MNIST run.  Its GPU post did not record the layer sizes;
# ---- two ReLU layers of 1000 units are our choice.
H1 = 1000                # first ReLU layer, or None: no such layer
H2 = 1000                # second ReLU layer, or None: one hidden layer
eta = 0.1
mu = 0.9
lam = 0.0
batchsize = 100
nepoch = 50
Wstd = 0.01              # initial weights: zero-mean normal of this std (b = 0)
seed = 0
datadir = None           # holds mnist/*.gz; None: $NNET_DATADIR, else ./data here
quickL = False           # False: the training columns evaluate L after the epoch, as published;
                         # True: running figures of the training pass itself (no second pass)
outdir = 'runs'          # the run's record and parameters (beside this script unless absolute)
resume = None            # a stopped run's parameter file (its log ends with the command): go on
                         # from where it stopped, with its settings; nepoch may grow

from engine import machine              # noqa: E402

machine.set_up()                        # the machine set-up, before anything loads numpy or Theano

from engine import runlog               # noqa: E402

config = runlog.config_names(globals())
runlog.apply_overrides(globals(), config, sys.argv[1:])

import numpy as np                      # noqa: E402
import nnet                             # noqa: E402
import mnist                            # noqa: E402
from engine.download import DataError, default_datadir   # noqa: E402


def main():
    out_folder = runlog.folder('outdir', outdir)
    data_folder = runlog.folder('datadir', datadir or default_datadir())
    info = runlog.print_run_info()
    machine.require_gpu_if_asked()
    try:
        data = mnist.load(data_folder, dtype=nnet.floatX)
    except DataError as e:
        sys.exit('error: %s' % e)
    t_data = time.time() - _t_start

    hidden = [h for h in (H1, H2) if h]
    net = nnet.MLP(np.random.RandomState(seed), 784, hidden, 10, Wstd)
    print('### ' + 'ReLu-' * len(hidden) + 'Softmax   Xdim: 784  ' + '  '.join(
        'H%d: %d' % (i + 1, h) for i, h in enumerate(hidden)))
    print('# eta = ', eta, ' mu = ', mu, ' lam = ', lam)
    print('### training:   NL = ', len(data['L'][1]), ' NV = ', len(data['V'][1]),
          ' K = ', 10, ' batchsize = ', batchsize)
    runlog.data_loaded(data, resume)

    with runlog.waiting('compiling (slow only the first time: Theano caches the compiled code)'):
        trainer = nnet.Trainer(net, data, batchsize, eta, mu, lam)
    machine.require_gpu_if_asked(trainer.ops()[0])
    runlog.print_ops(trainer)
    print('# compiled in %.1f s; data ready in %.1f s' % (trainer.compile_seconds, t_data), flush=True)

    return runlog.train_and_log(trainer, nepoch, 'mnist_mlp', {k: globals()[k] for k in config}, info,
                                out_folder, _t_start, t_data, quickL,
                                data_dir=data_folder, resume=resume,
                                data_fingerprint=data.fingerprint, data_sizes={k: len(y) for k, (X, y) in data.items()})


if __name__ == '__main__':
    sys.exit(runlog.run_driver(main))
