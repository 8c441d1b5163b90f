"""Neural-net building blocks in Theano: layers, networks, SGD training.

    FullLayer        dense layer, W and optional bias b, linear / ReLU / softmax
    Network, MLP     a stack of layers; flat params, weight-decayed params
    Trainer          whole splits in theano.shared, minibatches picked by index inside
                     the compiled functions, SGD with momentum and weight decay

The drivers make the machine set-up (Theano's flags, the BLAS) before they import this; a
notebook's `import nnet` makes it here (engine.machine.set_up: once a process).
"""
import io
import json
import os
import time

from engine import machine

machine.set_up()                                     # at once if a driver made it: no second set-up

import numpy as np                                   # noqa: E402
import theano                                        # noqa: E402
import theano.tensor as T                            # noqa: E402

from engine.runlog import TrainingDiverged           # noqa: E402

floatX = theano.config.floatX


# ---------------------------------------------------------------- layers

# ReLU as max(a, 0): the values of T.nnet.relu's 0.5 (a + |a|), and the same gradient except
# at exactly 0, with fewer ops (no 0.5 constant folded into a Dot22Scalar).
ACTIVATIONS = {'linear': lambda a: a, 'relu': lambda a: T.maximum(a, 0), 'softmax': T.nnet.softmax}
W_STD = 0.01


def activate(activation, a, b):
    """activation(a + b), b (C,) added along axis 1 of a, or None: no bias."""
    if b is not None:
        a = a + b.dimshuffle(('x', 0) + ('x',) * (a.ndim - 2))
    return ACTIVATIONS[activation](a)


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
        return activate(self.activation, T.dot(x, self.W), self.b)

    def cost_terms(self, x, y):
        """Summed cross-entropy and number correct of this softmax layer's output against integer labels.

        One op gives both: Theano's fused, numerically stable softmax/cross-entropy (what
        its optimizer makes of categorical_crossentropy(softmax(.)); one-hot float targets,
        as first tried in the original work, gave NaN) also returns each row's argmax.  A
        separate T.argmax would run on the CPU even with device=cuda (Theano 1.0.5 has a
        GPU argmax only through cuDNN), fetching the scores from the GPU in mid-step.
        On the GPU that argmax is wrong: Theano 1.0.5's kernel starts each thread's maximum
        at NaN and compares with `>`, so a thread that holds one class never records it,
        and every row came out class 0 (10.03% correct on an H200 while the costs fell as on
        the CPU).  There a row counts as correct when its label's probability is the row's
        largest (elementwise ops and reductions, all on the GPU; a tie would count too).
        The one device test of the layers stays here, not in a graph rewrite: it computes
        another thing (a tie counts), and only because of one device's bug.
        """
        if self.activation != 'softmax':
            raise ValueError('cost_terms needs a softmax layer, not %s' % self.activation)
        b = self.b if self.b is not None else T.zeros((self.output_shape[0],), floatX)
        nll, p, predicted = T.nnet.crossentropy_softmax_argmax_1hot_with_bias(T.dot(x, self.W), b, y)
        if machine.gpu_asked():
            y = T.as_tensor_variable(y)                                              # (labels given as an array too)
            classes = T.constant(np.arange(self.output_shape[0], dtype=y.dtype))    # (a constant: no copy a step)
            label = T.eq(classes.dimshuffle('x', 0), y.dimshuffle(0, 'x'))
            return nll.sum(), T.ge((p * label).sum(axis=1), p.max(axis=1)).sum()
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

    def save(self, path, settings, more=None):
        """Parameters as plain arrays in a .npz with the settings (JSON) and `more` arrays, written
        atomically.  The archive is made in memory and written in one go: np.savez straight into
        a file on a full disk leaves a half-written zip whose clean-up fails again later, as a
        second traceback."""
        arrays = {'%02d_%s' % (i, p.name): p.get_value() for i, p in enumerate(self.params)}
        arrays.update(more or {})
        archive = io.BytesIO()
        np.savez(archive, settings=json.dumps(settings, default=str), **arrays)
        tmp = path + '.tmp.npz'
        try:
            with open(tmp, 'wb') as f:
                f.write(archive.getbuffer())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def load(self, path):
        """Set the parameters from a .npz written by save(); returns its settings."""
        with np.load(path) as f:
            names = sorted(k for k in f.files if k[:2].isdigit())
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

def joined(parts):
    """The parts' rows as one array: the array they are consecutive views of, in order, if so
    (cifar10.load gives its splits so), else their concatenation."""
    base = parts[0].base
    if isinstance(base, np.ndarray) and base.flags.c_contiguous and all(
            p.base is base and p.flags.c_contiguous and p.dtype == base.dtype and p.shape[1:] == parts[0].shape[1:]
            for p in parts):
        address = base.__array_interface__['data'][0]
        for p in parts:
            if p.__array_interface__['data'][0] != address:
                break
            address += p.nbytes
        else:
            if address == base.__array_interface__['data'][0] + base.nbytes:
                return base.reshape((-1,) + parts[0].shape[1:])        # a view
    return np.concatenate(parts)


# The evaluation passes (the log's L, V and T columns) take no gradient, so they run in larger
# minibatches than training: fewer, larger products.  Per 100 rows on the AMD EPYC of RESULTS.md,
# minibatches of 100 against 500 (measured when BiasReLU came): the default network 2.35
# against 2.46 ms, 64 filters 9.56 against 8.76, 64 with overlapping pooling 19.12 against 17.40:
# 500 for the larger networks, where the time is.  1000 gained little more at
# twice the memory (the conv output of 1000 images of 256 maps: 800 MB).
EVAL_ROWS = 500


class Trainer:
    """SGD with momentum and weight decay for a Network, over splits held in theano.shared.

    All splits sit in one shared matrix (on the GPU with device=cuda) and the compiled
    functions take row bounds, so no data cross the bus per minibatch.  That needs
    (NL + NV + NT) x D floats of device memory: 737 MB for CIFAR-10, far below any
    current GPU; a data set that does not fit would have to be fed in chunks.

    Update, for every parameter, with decay (lam) on the weights W only:
        dW <- mu * dW - eta * lam * W - eta * dE/dW;   W <- W + dW
    the published -eta * (dE/dW + lam * W) + mu * dW, summed so that the gradient's product is
    added last: Theano's Gemm then adds it into dW's own buffer on the GPU (the published order
    first copied W: 43 MB with 64 filters and overlapping pooling), and on the CPU the update
    becomes one op, fused with that product (a rewrite: engine/rewrites.py).
    eta, mu and lam are shared scalars: change them between epochs without recompiling.
    """

    def __init__(self, net, data, batchsize, eta, mu, lam, input_shape=None):
        self.net, self.batchsize = net, batchsize
        self.bounds, start = {}, 0
        for name, (X, y) in data.items():
            self.bounds[name] = (start, start + len(y))
            start += len(y)
        # borrow: no second 737 MB copy (the splits' own array, which training never writes, or a concatenation)
        self.X = theano.shared(joined([np.asarray(X, floatX) for X, y in data.values()]), 'X', borrow=True)
        self.y = theano.shared(np.concatenate([np.asarray(y, 'int32') for X, y in data.values()]), 'y',
                               borrow=True)
        self.eta = theano.shared(np.asarray(eta, floatX), 'eta')
        self.mu = theano.shared(np.asarray(mu, floatX), 'mu')
        self.lam = theano.shared(np.asarray(lam, floatX), 'lam')
        machine.keep_freed_memory()

        start, stop = T.lscalars('start', 'stop')
        x, y = T.matrix('x'), T.ivector('y')
        xin = x.reshape((x.shape[0],) + tuple(input_shape)) if input_shape else x
        sum_cost, ncorrect = net.cost_terms(xin, y)
        givens = {x: self.X[start:stop], y: self.y[start:stop]}
        grads = T.grad(sum_cost / x.shape[0].astype(floatX), net.params)
        updates, self.momenta = [], []
        for p, g in zip(net.params, grads):
            v = theano.shared(np.zeros_like(p.get_value()), 'd' + p.name)
            if any(p is w for w in net.decay):
                v_new = self.mu * v - self.eta * self.lam * p - self.eta * g
            else:
                v_new = self.mu * v - self.eta * g
            updates += [(v, v_new), (p, p + v_new)]
            self.momenta.append(v)
        t0 = time.time()
        self.train_fn = theano.function([start, stop], [sum_cost, ncorrect], updates=updates,
                                        givens=givens, name='train')
        self.eval_fn = theano.function([start, stop], [sum_cost, ncorrect], givens=givens, name='eval')
        self.compile_seconds = time.time() - t0
        self.progress = None        # if set, called as progress(what, minibatches done, of how many)
        self.stop_requested = False     # set (by a signal handler): stop after the current minibatch
        self.trained = (0, 0.0, 0.0)    # the training pass so far: minibatches, summed cost, correct

    def batches(self, split, size=None):
        """(start, stop) rows of the split's minibatches of `size` rows (default: batchsize)."""
        size = size or self.batchsize
        first, end = self.bounds[split]
        return [(i, min(i + size, end)) for i in range(first, end, size)]

    def _sweep(self, fn, split, what, size=None, start=(0, 0.0, 0.0)):
        """Mean cost and % correct of fn over the split's minibatches, from start = (minibatches
        done, their summed cost, their number correct).  After each minibatch: the progress
        call, and KeyboardInterrupt if a stop was requested (a safe point: every update applied)."""
        done, total_cost, total_correct = start
        batches = self.batches(split, size)
        for b in range(done, len(batches)):
            cost, correct = fn(*batches[b])
            if not np.isfinite(cost):
                raise TrainingDiverged('cost became %s in %s, minibatch %d: lower eta or check the data'
                                       % (cost, what, b))
            total_cost += float(cost)
            total_correct += float(correct)
            if fn is self.train_fn:
                self.trained = (b + 1, total_cost, total_correct)
            if self.progress:
                self.progress(what, b + 1, len(batches))
            if self.stop_requested:
                raise KeyboardInterrupt
        n = self.bounds[split][1] - self.bounds[split][0]
        return total_cost / n, 100.0 * total_correct / n

    def train_epoch(self, split='L', what='training', start=(0, 0.0, 0.0)):
        """One pass of SGD (or its rest, from start: see _sweep); returns the pass's own mean cost
        and % correct (no second pass).  self.trained follows the pass, minibatch by minibatch."""
        self.trained = start
        return self._sweep(self.train_fn, split, what, start=start)

    def save(self, path, settings):
        """The network's parameters (Network.save) and the momenta, which a resumed run needs."""
        self.net.save(path, settings, {'momentum_%02d_%s' % (i, v.name): v.get_value()
                                       for i, v in enumerate(self.momenta)})

    def restore(self, path):
        """Parameters and momenta from a file save() wrote; returns its settings."""
        settings = self.net.load(path)
        with np.load(path) as f:
            names = sorted(k for k in f.files if k.startswith('momentum_'))
            if len(names) != len(self.momenta):
                raise ValueError('%s holds no momenta (saved before runs could be resumed)' % path)
            for name, v in zip(names, self.momenta):
                v.set_value(f[name].astype(floatX))
        return settings

    def evaluate(self, split):
        """Mean cost and % correct over a split, in minibatches of EVAL_ROWS (or batchsize, if more)
        rows (a short last one is weighted right)."""
        return self._sweep(self.eval_fn, split, 'evaluating ' + split, max(self.batchsize, EVAL_ROWS))

    def ops(self):
        """The op classes of the compiled training function: ({GPU op: count}, {other op: count})."""
        on_gpu, other = {}, {}
        for node in self.train_fn.maker.fgraph.apply_nodes:
            op = type(node.op)
            where = on_gpu if op.__module__.startswith('theano.gpuarray') else other
            where[op.__name__] = where.get(op.__name__, 0) + 1
        return on_gpu, other
