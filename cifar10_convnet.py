"""The published CIFAR-10 experiment: Conv-Pool-ReLU-Softmax trained with SGD.

    python cifar10_convnet.py                               # CPU, the published run
    THEANO_FLAGS='device=cuda' python cifar10_convnet.py    # the same on the GPU
    python cifar10_convnet.py --W1dim="(64,5,5)" --st1="(2,2)" --H3=1000
    python cifar10_convnet.py --resume=runs/cifar10_convnet-...npz    # go on from a stopped run

Edit the settings below, or override any of them as --name=value (Python literals).
Every setting is checked before any work; a bad one stops the run with one `error:` line.
To drop a ReLU layer set it to None: H3 = None (the published run), and H2 = None too
for softmax straight after the conv-pool stage.  Relative folders (datadir, outdir) are
taken from this script's folder; ~ and $VARS are expanded.
Prints the published log; writes a record of the run, runs/cifar10_convnet-<time>-<pid>.record.json,
and the trained parameters beside it, runs/cifar10_convnet-<time>-<pid>.npz.
"""
import time
_t_start = time.time()                  # the log's total explains what `time` shows

import sys                              # noqa: E402

# ---- settings (the published run); names follow the published log
W1dim = (16, 5, 5)       # conv filters: count, height, width (input 3 x 32 x 32, stride 1, no padding)
ds1 = (4, 4)             # max-pool window
st1 = None               # pool stride; None = the window (no overlap), (2, 2) overlaps a 4x4 window
H2 = 1000                # ReLU units after the conv-pool stage, or None: no such layer
H3 = None                # a second ReLU layer of that many units, or None: no such layer
eta = 0.01               # learning rate
mu = 0.9                 # momentum
lam = 0.0001             # weight decay, on W only
batchsize = 100
nepoch = 50
ZCAwhitening = True
Wstd = 0.01              # initial weights: zero-mean normal of this std (b = 0)
seed = 0                 # weight initialisation
conv = 'auto'            # how the convolution is computed, same values: 'conv2d' (Theano's CorrMM),
                         # 'im2col' (one product a minibatch); auto: im2col on the GPU, else conv2d
datadir = None           # holds cifar-10-batches-py/; None: $NNET_DATADIR, else ./data here
quickL = False           # False: the training columns evaluate L after the epoch, as published;
                         # True: running figures of the training pass itself (no second pass)
outdir = 'runs'          # the run's record and parameters (beside this script unless absolute)
datanote = ''            # free text kept with the record, e.g. where the data came from
resume = None            # a stopped run's parameter file (its log ends with the command): go on
                         # from where it stopped, with its settings; nepoch may grow

from engine import machine              # noqa: E402

machine.set_up()                        # the machine set-up, before anything loads numpy or Theano

from engine import runlog               # noqa: E402
import cifar10                          # noqa: E402


def check_shapes():
    """Refuse filters larger than the image and pool windows larger than the map they pool."""
    C, H, W = cifar10.XDIM
    if W1dim[1] > H or W1dim[2] > W:
        runlog.refuse('W1dim', W1dim, 'filters of at most %dx%d, the image' % (H, W))
    mh, mw = H - W1dim[1] + 1, W - W1dim[2] + 1
    if ds1[0] > mh or ds1[1] > mw:
        runlog.refuse('ds1', ds1, 'a window of at most %dx%d, the map that %dx%d filters leave'
                      % (mh, mw, W1dim[1], W1dim[2]))


config = runlog.config_names(globals())
runlog.apply_overrides(globals(), config, sys.argv[1:], check_shapes)

import numpy as np                      # noqa: E402
import nnet                             # noqa: E402
import convnet                          # noqa: E402
from engine.download import DataError, default_datadir   # noqa: E402


def main():
    conv_used = runlog.conv_impl(conv)
    out_folder = runlog.folder('outdir', outdir)
    data_folder = runlog.folder('datadir', datadir or default_datadir())
    info = runlog.print_run_info()
    machine.require_gpu_if_asked()
    try:
        data = cifar10.load(data_folder, zca=ZCAwhitening, dtype=nnet.floatX,
                            log=lambda line: print('# ' + line, flush=True))
    except DataError as e:
        sys.exit('error: %s' % e)
    t_data = time.time() - _t_start

    net = convnet.CNN(np.random.RandomState(seed), cifar10.XDIM, [(W1dim[0], W1dim[1:], ds1, st1)],
                      [h for h in (H2, H3) if h], len(cifar10.CLASSES), Wstd, conv_used)
    print('### Conv-Pool-ReLu-Softmax   Xdim:', cifar10.XDIM)
    print('#   W1dim:', W1dim, ' ds1:', ds1, ' st1:', st1, ' H1:', net.H1)
    print('#   H2:', H2, *(['  H3:', H3] if H3 else []))
    print('# eta = ', eta, ' mu = ', mu, ' lam = ', lam)
    print('# ZCAwhitening = ', ZCAwhitening)
    print('# convolution: %s' % conv_used)
    print('### training:   NL = ', len(data['L'][1]), ' NV = ', len(data['V'][1]),
          ' K = ', len(cifar10.CLASSES), ' batchsize = ', batchsize)
    runlog.data_loaded(data, resume)

    with runlog.waiting('compiling (slow only the first time: Theano caches the compiled code)'):
        trainer = nnet.Trainer(net, data, batchsize, eta, mu, lam, input_shape=cifar10.XDIM)
    machine.require_gpu_if_asked(trainer.ops()[0])
    runlog.print_ops(trainer)
    print('# compiled in %.1f s; data ready in %.1f s' % (trainer.compile_seconds, t_data), flush=True)

    return runlog.train_and_log(trainer, nepoch, 'cifar10_convnet', {k: globals()[k] for k in config}, info,
                                out_folder, _t_start, t_data, quickL, H1=net.H1, conv_impl=conv_used,
                                data_dir=data_folder, resume=resume,
                                data_fingerprint=data.fingerprint, data_sizes={k: len(y) for k, (X, y) in data.items()})


if __name__ == '__main__':
    sys.exit(runlog.run_driver(main))
