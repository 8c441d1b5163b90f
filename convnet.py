"""Convolutional layers on top of nnet.py: Conv -> Pool(+threshold, ReLU) -> Flatten -> nnet.FullLayer.

Cost, updates, evaluation, saving: nnet.Network and nnet.Trainer, unchanged.
"""
import nnet                                  # first: it sets Theano's flags, then imports Theano
import numpy as np
import theano.tensor as T
from theano.tensor.signal.pool import pool_2d


class ConvLayer:
    """nfilter filters of C x h x w over (C, H, W) inputs: stride 1, no padding, no bias.

    A cross-correlation (filters not flipped, as in today's frameworks), so the learnt
    filters show as they are applied.
    """

    def __init__(self, rng, input_shape, nfilter, filter_size, Wstd=nnet.W_STD):
        C, H, W = input_shape
        h, w = filter_size
        self.filter_shape = (nfilter, C, h, w)
        self.W = nnet.normal_weights(rng, self.filter_shape, Wstd)
        self.params = self.decay = [self.W]
        self.input_shape = tuple(input_shape)
        self.output_shape = (nfilter, H - h + 1, W - w + 1)

    def output(self, x):
        return T.nnet.conv2d(x, self.W, input_shape=(None,) + self.input_shape,
                             filter_shape=self.filter_shape, filter_flip=False)


class PoolLayer:
    """Max-pooling with window ds and stride st, then a per-channel threshold b and an activation.

    st=None means st=ds (non-overlapping); st smaller than ds overlaps.  Windows that
    would cross the border are dropped (output (H - ds) // st + 1 rows).  Both compile
    to Theano's C pooling ops (Pool, MaxPoolGrad) on the CPU and to GpuPool and
    GpuMaxPoolGrad on the GPU.
    """

    def __init__(self, input_shape, ds, st=None, activation='relu'):
        C, H, W = input_shape
        self.ds, self.st = tuple(ds), tuple(st or ds)
        self.b = nnet.theano.shared(np.zeros(C, nnet.floatX))
        self.params, self.decay = [self.b], []
        self.activation = activation
        self.output_shape = (C,) + tuple((n - d) // s + 1 for n, d, s in zip((H, W), self.ds, self.st))

    def output(self, x):
        pooled = pool_2d(x, ws=self.ds, stride=self.st, ignore_border=True, mode='max')
        return nnet.ACTIVATIONS[self.activation](pooled + self.b.dimshuffle('x', 0, 'x', 'x'))


class FlattenLayer:
    """(N, C, H, W) feature maps -> (N, C*H*W) rows for the fully connected layers."""

    def __init__(self, input_shape):
        self.params = self.decay = []
        self.output_shape = (int(np.prod(input_shape)),)

    def output(self, x):
        return x.flatten(2)


class CNN(nnet.Network):
    """Conv-Pool stages, then fully connected ReLU layers, then a softmax over K classes.

    convpool: a list of (nfilter, (h, w), ds, st) stages; hidden: the sizes of the
    ReLU layers after flattening; Wstd: the initial weights' standard deviation.
    """

    def __init__(self, rng, input_shape, convpool, hidden, K, Wstd=nnet.W_STD):
        layers, shape = [], tuple(input_shape)
        for nfilter, filter_size, ds, st in convpool:
            layers.append(ConvLayer(rng, shape, nfilter, filter_size, Wstd))
            layers.append(PoolLayer(layers[-1].output_shape, ds, st))
            shape = layers[-1].output_shape
        layers.append(FlattenLayer(shape))
        self.H1 = layers[-1].output_shape[0]
        super().__init__(layers + nnet.MLP(rng, self.H1, hidden, K, Wstd).layers)
