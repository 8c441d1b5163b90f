"""engine/cpuops.py against Theano's own ops: the same values and gradients, bit for bit, but where
an op sums in its own order (the direct correlation, PooledFilterGrad): there to rounding."""
import numpy as np
import pytest

import convnet
import nnet
from conftest import stock_theano
from engine import cpuops, rewrites
import theano
import theano.tensor as T
from theano.gof.cmodule import GCC_compiler
from theano.tensor.nnet import corr
from theano.tensor.signal.pool import pool_2d


class WithoutAVX512:
    """An op compiled as for a CPU without AVX-512 (Theano adds the detected -mavx512f after
    gcc.cxxflags, so that flag cannot take it away)."""

    def c_no_compile_args(self):            # the detected -march and AVX-512 flags
        GCC_compiler.compile_args()
        return [f for f in GCC_compiler.march_flags or [] if f.startswith(('-march=', '-mavx512'))]

    def c_compile_args(self):               # (no such flag, nor AVX-512, elsewhere: the same op there)
        return super().c_compile_args() + (['-mno-avx512f'] if cpuops.X86 else [])


CASES = [((4, 4), (4, 4), (3, 2, 28, 28)),      # the published window
         ((4, 4), (2, 2), (3, 2, 28, 28)),      # overlapping: most elements in several windows
         ((2, 3), (1, 2), (2, 3, 11, 9)),       # unequal sides, borders left out
         ((3, 2), (2, 3), (1, 2, 7, 9)),        # strides larger than the window: gaps
         ((5, 5), (1, 1), (2, 1, 5, 5)),        # one window the size of the map
         ((2, 2), (2, 2), (1, 2, 6, 70)),       # 35 windows a row: more than a vector's lanes
         ((2, 3), (1, 1), (2, 1, 4, 30)),       # overlapping, 28 windows a row: two vectors of them
         ((3, 3), (2, 2), (1, 2, 7, 40)),       # overlapping, rows wider than two vectors: the plain loop
         ((3, 2), (2, 1), (1, 1, 300, 7))]      # overlapping, more rows than the vectorised gradient keeps


def assert_same_bits(ours, theirs):
    np.testing.assert_array_equal(ours, theirs)         # a readable report first
    assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes(), 'signs of zeros differ'


def pooled_and_gradient(pool, x, weights, mode=None):
    x_ = T.tensor4()
    z = pool(x_)
    gx = T.grad((z * weights).sum(), x_)                # any upstream gradient
    return theano.function([x_], [z, gx], mode=mode)(x)


class MaxPoolGradWithoutAVX512(WithoutAVX512, cpuops.MaxPoolGrad):
    """MaxPoolGrad without AVX-512: the plain loops alone."""


class MaxPoolWithoutAVX512(WithoutAVX512, cpuops.MaxPool):
    """MaxPool and its gradient without AVX-512: the plain loops alone."""

    def L_op(self, inputs, outputs, output_grads):
        return [MaxPoolGradWithoutAVX512(self.ws, self.stride)(inputs[0], outputs[0], output_grads[0])]


@pytest.mark.parametrize('op', [cpuops.MaxPool, MaxPoolWithoutAVX512])
@pytest.mark.parametrize('openmp', [False, True])
@pytest.mark.parametrize('ws, st, shape', CASES)
@pytest.mark.parametrize('values', ['normal', 'ties', 'nan'])
def test_max_pool_and_its_gradient_equal_theanos_bit_for_bit(ws, st, shape, values, openmp, op):
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(nnet.floatX)
    if values == 'ties':            # maxima held twice or more (+0 and -0 too): the gradient goes to every copy
        x = np.round(x)
    if values == 'nan':             # NaN kept where it comes first in its window, as Theano's
        x.flat[::7] = np.nan
        x.flat[3::11] = np.inf
    zshape = shape[:2] + tuple((n - w) // s + 1 for n, w, s in zip(shape[2:], ws, st))
    weights = rng.randn(*zshape).astype(nnet.floatX)
    weights.flat[::5] = -0.0        # Theano adds gz to a zeroed gx: a gradient of -0 lands as +0
    ours = pooled_and_gradient(lambda v: op(ws, st, openmp=openmp)(v), x, weights)
    theirs = pooled_and_gradient(lambda v: pool_2d(v, ws=ws, stride=st, ignore_border=True), x, weights, stock_theano())
    assert ours[0].shape == zshape
    assert_same_bits(ours[0], theirs[0])
    assert_same_bits(ours[1], theirs[1])
    if values == 'ties' and st == ws:       # disjoint windows: more gradients than windows = copies served
        assert (ours[1] != 0).sum() > np.prod(zshape)


@pytest.mark.parametrize('ws, st, shape', [((7, 7), (1, 2), (2, 3, 8, 5)), ((9, 9), (1, 1), (1, 2, 8, 5)),
                                           ((4, 4), (4, 4), (1, 1, 3, 8)), ((2, 2), (2, 2), (1, 1, 1, 1))])
def test_windows_larger_than_the_maps_give_theanos_empty_output(ws, st, shape):
    """No window fits a side: no output along it, a zero gradient, the shape inferred so (Theano's
    Pool with ignore_border=True; its test_pool.py has such cases)."""
    x = np.random.RandomState(0).randn(*shape).astype(nnet.floatX)
    zshape = shape[:2] + tuple(max((n - w) // s + 1, 0) for n, w, s in zip(shape[2:], ws, st))
    weights = np.ones(zshape, nnet.floatX)
    ours = pooled_and_gradient(lambda v: cpuops.MaxPool(ws, st)(v), x, weights)
    theirs = pooled_and_gradient(lambda v: pool_2d(v, ws=ws, stride=st, ignore_border=True), x, weights, stock_theano())
    assert ours[0].shape == theirs[0].shape == zshape
    assert_same_bits(ours[1], theirs[1])
    x_ = T.tensor4()
    assert tuple(theano.function([x_], cpuops.MaxPool(ws, st)(x_).shape)(x)) == zshape


@pytest.mark.parametrize('ws', [(1, 1), (2, 2), (3, 3), (2, 3), (3, 2)])
def test_pooling_shapes_are_inferred_without_pooling(ws):
    """What Theano's test_pool.py test_infer_shape checks of Pool and MaxPoolGrad (borders left
    out, no padding), of ours: the shapes computed without running the op, and right."""
    x_ = T.tensor4()
    z = cpuops.MaxPool(ws, ws)(x_)
    outputs = [z, cpuops.MaxPoolGrad(ws, ws)(x_, z, z)]
    x = np.random.RandomState(0).rand(4, 6, 7, 9).astype(nnet.floatX)
    shapes = theano.function([x_], [o.shape for o in outputs])
    assert not {cpuops.MaxPool, cpuops.MaxPoolGrad} & {type(n.op) for n in shapes.maker.fgraph.apply_nodes}
    assert [tuple(s) for s in shapes(x)] == [o.shape for o in theano.function([x_], outputs)(x)]


def test_max_pool_takes_non_contiguous_input_and_says_what_is_wrong():
    x_ = T.tensor4()
    f = theano.function([x_], cpuops.MaxPool((4, 4), (4, 4))(x_))
    x = np.random.RandomState(0).randn(2, 8, 8, 3).astype(nnet.floatX).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(f(x), x.reshape(2, 3, 2, 4, 2, 4).max(axis=(3, 5)))
    with pytest.raises(TypeError, match='4-d tensors'):
        cpuops.MaxPool((2, 2), (2, 2))(T.matrix())
    with pytest.raises(ValueError, match='two positive sizes'):
        cpuops.MaxPool((2, 0), (1, 1))


@pytest.mark.parametrize('border_mode, subsample, shape', [
    ('valid', (1, 1), (5, 3, 32, 32)),          # the published convolution: rows copied whole
    ('valid', (1, 1), (3, 2, 7, 6)),
    ('valid', (1, 1), (2, 1, 5, 40)),           # 38 columns out: Theano's CorrMM, not the direct one
    ((1, 2), (1, 1), (3, 2, 7, 6)),             # padding and strides: Theano's own im2col
    ('valid', (2, 1), (3, 2, 7, 6))])
def test_correlation_and_its_filter_gradient_equal_corrmms_bit_for_bit(border_mode, subsample, shape):
    """Bit for bit, but for the direct correlation (AVX-512, at most 32 columns out): its sums run in
    another order than the BLAS kernels', so it and CorrMM are each held to float rounding."""
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(nnet.floatX)
    W = rng.randn(4, shape[1], 5, 3).astype(nnet.floatX)
    x_, W_ = T.tensor4(), T.tensor4()
    shape_out = corr.CorrMM(border_mode, subsample)(x_, W_).eval({x_: x, W_: W}).shape
    weights = rng.randn(*shape_out).astype(nnet.floatX)               # any upstream gradient
    results = []
    for op, grad_op, mode in ((cpuops.CorrMM, cpuops.CorrMM_gradWeights, None),
                              (corr.CorrMM, corr.CorrMM_gradWeights, stock_theano())):
        out = op(border_mode, subsample)(x_, W_)
        f = theano.function([x_, W_], [out, T.grad((out * weights).sum(), W_)], mode=mode)
        assert {op, grad_op} <= {type(node.op) for node in f.maker.fgraph.apply_nodes}
        results.append(f(x, W))
    (ours, ours_grad), (theirs, theirs_grad) = results
    assert_same_bits(ours_grad, theirs_grad)
    if border_mode == 'valid' and subsample == (1, 1) and shape[3] - 3 < 32:     # the direct correlation
        x64, W64 = T.dtensor4s('x', 'W')
        in_float64 = theano.function([x64, W64], corr.CorrMM()(x64, W64), mode=stock_theano())
        exact, magnitude = in_float64(x, W), in_float64(abs(x), abs(W))
        # a float32 sum of n products in any order: within n float32 epsilons of their magnitudes' sum
        bound = np.prod(W.shape[1:]) * np.finfo(np.float32).eps * magnitude
        for result in (ours, theirs):
            assert (abs(result - exact) <= bound).all()
    else:
        assert_same_bits(ours, theirs)


def np_correlate(x, W):
    """The valid correlation in float64, from numpy's sliding windows."""
    patches = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), W.shape[2:], axis=(2, 3))
    return np.einsum('nchwij,fcij->nfhw', patches, W.astype(np.float64))


class CorrMMWithoutAVX512(WithoutAVX512, cpuops.CorrMM):
    """CorrMM without AVX-512: Theano's path, the direct one left out."""


class PooledFilterGradWithoutAVX512(WithoutAVX512, cpuops.PooledFilterGrad):
    """PooledFilterGrad without AVX-512: the maxima found 8 at a time, as bits."""


@pytest.mark.parametrize('op', [cpuops.CorrMM, CorrMMWithoutAVX512])
@pytest.mark.parametrize('openmp', [False, True])
@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('shape, filters', [
    ((5, 3, 32, 32), (16, 5, 5)),               # the published layer: 28 columns, 2 blocks of 8 filters
    ((3, 2, 36, 37), (13, 5, 6)),               # 32 columns, filters not a multiple of 8
    ((2, 1, 9, 16), (3, 4, 1)),                 # 16 columns, one filter row
    ((2, 2, 6, 5), (9, 6, 5)),                  # one output element a map
    ((1, 1, 3, 8), (1, 1, 1))])                 # 1x1 filter: 8 columns
def test_direct_correlation_equals_numpys(shape, filters, dtype, openmp, op):
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(dtype)
    W = rng.randn(filters[0], shape[1], *filters[1:]).astype(dtype)
    x_, W_ = T.tensor4(dtype=dtype), T.tensor4(dtype=dtype)
    f = theano.function([x_, W_], op('valid', (1, 1), openmp=openmp)(x_, W_))
    rtol = 1e-5 if dtype == 'float32' else 1e-12
    np.testing.assert_allclose(f(x, W), np_correlate(x, W), rtol=rtol, atol=rtol * 10)
    x_strided = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)     # not C-contiguous
    np.testing.assert_allclose(f(x_strided, W[:, :, ::-1]), np_correlate(x, W[:, :, ::-1]), rtol=rtol, atol=rtol * 10)


@pytest.mark.parametrize('op', [cpuops.PooledFilterGrad, PooledFilterGradWithoutAVX512])
@pytest.mark.parametrize('openmp', [False, True])
@pytest.mark.parametrize('ws, st, shape, filters, values', [
    ((4, 4), (4, 4), (5, 3, 32, 32), (16, 5, 5), 'normal'),     # the published layer
    ((4, 4), (4, 4), (5, 3, 32, 32), (16, 5, 5), 'ties'),       # maxima held twice or more
    ((3, 2), (3, 3), (3, 2, 12, 11), (4, 2, 3), 'normal'),      # gaps between windows, borders left out
    ((2, 2), (2, 2), (2, 2, 14, 14), (3, 3, 9), 'normal'),      # a filter wider than 8: the plain loop
    ((2, 3), (2, 4), (2, 1, 9, 150), (2, 2, 3), 'normal'),      # 147 columns under windows: 3 words of bits, 10 vectors
    ((2, 2), (2, 2), (2, 1, 10, 10), (2, 3, 3), 'float64')])
def test_pooled_filter_gradient_equals_theanos_pair(ws, st, shape, filters, values, openmp, op):
    rng = np.random.RandomState(0)
    dtype = 'float64' if values == 'float64' else nnet.floatX
    x = rng.randn(*shape).astype(dtype)
    W = rng.randn(filters[0], shape[1], *filters[1:]).astype(dtype)
    if values == 'ties':            # integer pixels and filters: equal sums in many windows
        x, W = np.round(x), np.round(W)
    x_, W_, gz_ = T.tensor4(dtype=dtype), T.tensor4(dtype=dtype), T.tensor4(dtype=dtype)
    c = corr.CorrMM('valid', (1, 1))(x_, W_)
    z = cpuops.MaxPool(ws, st)(c)
    dense = corr.CorrMM_gradWeights('valid', (1, 1))(x_, cpuops.MaxPoolGrad(ws, st)(c, z, gz_), W_.shape[-2:])
    sparse = op(ws, st, openmp=openmp)(x_, c, z, gz_)
    gz = rng.randn(*z.eval({x_: x, W_: W}).shape).astype(dtype)
    theirs, ours = theano.function([x_, W_, gz_], [dense, sparse], mode=stock_theano())(x, W, gz)
    assert ours.shape == theirs.shape == W.shape
    # other summation order: equal to rounding (the published layer's values reach ~200)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-6 * np.abs(theirs).max())
    if values == 'ties':            # some windows hold their maximum twice or more
        windows = c.eval({x_: x, W_: W}).reshape(shape[0], filters[0], 7, 4, 7, 4)
        assert ((windows == windows.max(axis=(3, 5), keepdims=True)).sum(axis=(3, 5)) > 1).any()


def test_pooled_filter_gradient_refuses_what_it_cannot_do():
    assert cpuops.PooledFilterGrad.serves((4, 4), (4, 4)) and cpuops.PooledFilterGrad.serves((3, 2), (3, 3))
    assert cpuops.PooledFilterGrad.serves((9, 8), (9, 8))
    assert not cpuops.PooledFilterGrad.serves((4, 4), (2, 2))       # overlapping: an element under two windows
    assert not cpuops.PooledFilterGrad.serves((4, 4), (4, 3))
    with pytest.raises(ValueError, match='disjoint windows only'):
        cpuops.PooledFilterGrad((4, 4), (2, 2))(*[T.tensor4()] * 4)
    with pytest.raises(TypeError, match='4-d'):
        cpuops.PooledFilterGrad((2, 2), (2, 2))(T.matrix(), *[T.tensor4()] * 3)
    x_ = T.tensor4()
    f = theano.function([x_], cpuops.PooledFilterGrad((2, 2), (2, 2))(x_, x_, x_, x_))
    with pytest.raises(ValueError, match='shapes of x, c, z and gz disagree'):
        f(np.zeros((1, 1, 4, 4), nnet.floatX))


def layer_ops(use_gpu, monkeypatch, st=None):
    monkeypatch.setattr(rewrites, 'cpu_graph', lambda: not use_gpu)
    x_ = T.tensor4()
    conv = convnet.ConvLayer(np.random.RandomState(0), (2, 9, 9), 3, (2, 2))
    pool = convnet.PoolLayer(conv.output_shape, (2, 2), st)
    grads = T.grad(pool.output(conv.output(x_)).sum(), [x_, conv.W])
    return {type(node.op) for node in theano.function([x_], grads).maker.fgraph.apply_nodes}


def test_layers_use_these_ops_on_the_cpu_and_theanos_with_a_gpu(monkeypatch):
    from theano.tensor.signal import pool
    ours = {cpuops.CorrMM, cpuops.PooledFilterGrad, cpuops.MaxPool, cpuops.MaxPoolGrad, cpuops.BiasReLU}
    assert ours <= layer_ops(False, monkeypatch)
    assert cpuops.CorrMM_gradWeights not in layer_ops(False, monkeypatch)          # disjoint windows
    assert {cpuops.CorrMM_gradWeights, cpuops.MaxPoolGrad} <= layer_ops(False, monkeypatch, st=(1, 1))
    ours |= {cpuops.CorrMM_gradWeights}
    # Theano's conv2d and pooling have GPU versions (GpuCorrMM, GpuPool...); these ops have none
    theirs = layer_ops(True, monkeypatch)
    assert {pool.Pool, pool.MaxPoolGrad, corr.CorrMM, corr.CorrMM_gradWeights} <= theirs and not ours & theirs


def thresholds_and_inputs(shape, rng):
    """b (C,) and x of `shape` with NaN, infinities and -0 + -0 (-0 out) among normal values."""
    x = rng.randn(*shape).astype('float32')
    b = rng.randn(shape[1]).astype('float32')
    if x.size:
        b[0] = -0.0
        x.reshape(-1)[:3] = [np.nan, np.inf, -np.inf]
        x[:, 0] = -0.0                      # -0 + -0: -0, kept by max(a, 0) as by Theano's maximum
    return x, b


@pytest.mark.parametrize('linker', ['c', 'py'])
@pytest.mark.parametrize('openmp', [False, True])
@pytest.mark.parametrize('shape', [(5, 7), (3, 4, 5, 6), (600, 1000), (200, 16, 7, 7), (0, 3)])
def test_relu_with_bias_equals_theanos_bit_for_bit(shape, openmp, linker):
    x, b = thresholds_and_inputs(shape, np.random.RandomState(len(shape)))
    x_, b_ = T.tensor(dtype='float32', broadcastable=(False,) * len(shape)), T.vector(dtype='float32')
    gz = np.random.RandomState(1).randn(*shape).astype('float32')
    ours = cpuops.BiasReLU(openmp=openmp)(x_, b_)
    mode = theano.Mode(linker=linker)
    z, gx, gb = theano.function([x_, b_], [ours] + T.grad((ours * gz).sum(), [x_, b_]), mode=mode)(x, b)
    theirs = T.maximum(x_ + b_.dimshuffle(('x', 0) + ('x',) * (len(shape) - 2)), 0)
    assert_same_bits(z, theano.function([x_, b_], theirs, mode=stock_theano())(x, b))
    # the gradient where the output is positive (not at exactly 0: PyTorch's ReLU's), b's summed
    np.testing.assert_array_equal(gx, gz * (z > 0))
    np.testing.assert_allclose(gb, (gz * (z > 0)).astype('float64').sum(axis=(0,) + tuple(range(2, len(shape)))),
                               rtol=1e-5, atol=1e-5)


def test_relu_with_bias_takes_strided_input_and_says_what_is_wrong():
    rng = np.random.RandomState(2)
    x, b = rng.randn(6, 10).astype('float32'), rng.randn(5).astype('float32')
    x_, b_ = T.matrix(), T.vector()
    f = theano.function([x_, b_], cpuops.BiasReLU()(x_, b_))
    np.testing.assert_array_equal(f(x[:, ::2], b), np.maximum(x[:, ::2] + b, 0))
    with pytest.raises(ValueError, match='10 channels, 5 thresholds'):
        f(x, b)
    with pytest.raises(TypeError, match=r'x \(N, C\) or \(N, C, H, W\)'):
        cpuops.BiasReLU()(T.tensor3(), b_)


def test_layers_use_one_op_for_threshold_and_relu():
    """The published network's evaluation pass: no Elemwise op left between the products."""
    rng = np.random.RandomState(0)
    X, y = rng.randn(200, 3072).astype('float32'), rng.randint(0, 10, 200).astype('int32')
    net = convnet.CNN(rng, (3, 32, 32), [(16, (5, 5), (4, 4), None)], [1000], 10)
    trainer = nnet.Trainer(net, {'L': (X, y)}, 100, 0.01, 0.9, 0.0001, input_shape=(3, 32, 32))
    ops = [type(n.op).__name__ for n in trainer.eval_fn.maker.fgraph.toposort()]
    compute = [op for op in ops if op in ('CorrMM', 'MaxPool', 'BiasReLU', 'Dot22', 'Elemwise')]
    conv = compute.index('CorrMM')      # (before it, Elemwise ops of the shapes)
    assert compute[conv:conv + 6] == ['CorrMM', 'MaxPool', 'BiasReLU', 'Dot22', 'BiasReLU', 'Dot22']
    # in place, but in training where the pooled maps are read again (the filter gradient's maxima)
    def in_place(f):
        return [n.op.inplace for n in f.maker.fgraph.toposort() if isinstance(n.op, cpuops.BiasReLU)]
    assert in_place(trainer.eval_fn) == [True, True] and in_place(trainer.train_fn) == [False, True]
