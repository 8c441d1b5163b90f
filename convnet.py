"""Convolutional layers on top of nnet.py: Conv -> Pool(+threshold, ReLU) -> Flatten -> nnet.FullLayer.

Cost, updates, evaluation, saving: nnet.Network and nnet.Trainer, unchanged.
"""
import nnet
import numpy as np
import theano.tensor as T
from theano.tensor.nnet.neighbours import images2neibs
from theano.tensor.signal.pool import pool_2d

CONV_IMPLS = ('conv2d', 'im2col')


class ConvLayer:
    """nfilter filters of C x h x w over (C, H, W) inputs: stride 1, no padding, no bias.

    A cross-correlation (filters not flipped, as in today's frameworks), so the learnt
    filters show as they are applied.  Two ways to write it, same values:
      impl='conv2d': Theano's conv2d.  Theano's optimizer makes it CorrMM on the CPU (and
        our faster CorrMM: engine/rewrites.py), GpuCorrMM on the GPU, which loops
        over the minibatch: an im2col kernel and a small cuBLAS product per image, 200
        launches for the forward pass of 100 images and 200 more for the gradient.
      impl='im2col': the patches of the whole minibatch as one matrix (Images2Neibs, one
        kernel on the GPU), times the filters in one matrix product; the gradient is one
        more product.
    """

    def __init__(self, rng, input_shape, nfilter, filter_size, Wstd=nnet.W_STD, impl='conv2d'):
        C, H, W = input_shape
        h, w = filter_size
        self.filter_shape = (nfilter, C, h, w)
        self.W = nnet.normal_weights(rng, self.filter_shape, Wstd)
        self.params = self.decay = [self.W]
        self.input_shape = tuple(input_shape)
        self.output_shape = (nfilter, H - h + 1, W - w + 1)
        if impl not in CONV_IMPLS:
            raise ValueError('convolution %r: use one of %s' % (impl, ', '.join(CONV_IMPLS)))
        self.impl = impl

    def output(self, x):
        if self.impl == 'conv2d':
            return T.nnet.conv2d(x, self.W, input_shape=(None,) + self.input_shape,
                                 filter_shape=self.filter_shape, filter_flip=False)
        F, C, h, w = self.filter_shape
        _, oh, ow = self.output_shape
        n = x.shape[0]
        # rows (image, channel, position) of h*w pixels -> rows (image, position) of C*h*w
        patches = images2neibs(x, (h, w), (1, 1), mode='valid')
        patches = patches.reshape((n, C, oh * ow, h * w)).dimshuffle(0, 2, 1, 3).reshape((n * oh * ow, C * h * w))
        filters = self.W.dimshuffle(1, 2, 3, 0).reshape((C * h * w, F))   # one column a filter
        out = T.dot(patches, filters)
        return out.reshape((n, oh, ow, F)).dimshuffle(0, 3, 1, 2)


class PoolLayer:
    """Max-pooling with window ds and stride st, then a per-channel threshold b and an activation.

    st=None means st=ds (non-overlapping); st smaller than ds overlaps.  Windows that
    would cross the border are dropped (output (H - ds) // st + 1 rows).  Theano's pool_2d;
    on the CPU rewrites (engine/rewrites.py) make it and its gradient faster ops of Theano's
    values (and, with disjoint windows after a convolution, take the filters' gradient from
    the maxima).
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
        return nnet.activate(self.activation, pooled, self.b)


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
    ReLU layers after flattening; Wstd: the initial weights' standard deviation;
    conv: how to write the convolutions (ConvLayer's impl).
    """

    def __init__(self, rng, input_shape, convpool, hidden, K, Wstd=nnet.W_STD, conv='conv2d'):
        layers, shape = [], tuple(input_shape)
        for nfilter, filter_size, ds, st in convpool:
            layers.append(ConvLayer(rng, shape, nfilter, filter_size, Wstd, conv))
            layers.append(PoolLayer(layers[-1].output_shape, ds, st))
            shape = layers[-1].output_shape
        layers.append(FlattenLayer(shape))
        self.H1 = layers[-1].output_shape[0]
        super().__init__(layers + nnet.MLP(rng, self.H1, hidden, K, Wstd).layers)
