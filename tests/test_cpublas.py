"""engine/cpublas.py: Theano's Dot22 and Gemm with the dense kernel, the momentum update, and the bias
gradients' sums, against numpy in float64, and where Theano's optimizer puts them."""
import numpy as np
import pytest

import convnet
import nnet
from engine import cpublas, rewrites
import theano
import theano.tensor as T
from theano.tensor import blas
from test_cpuops import WithoutAVX512


class Dot22WithoutAVX512(WithoutAVX512, cpublas.Dot22):
    """Our Dot22 built as for a CPU without AVX-512: Theano's BLAS call alone."""


def products(f, kinds=(blas.Dot22, blas.Gemm)):
    """The matrix-product ops (or other kinds) of a compiled function, by class."""
    return sorted((type(n.op).__module__, type(n.op).__name__) for n in f.maker.fgraph.apply_nodes
                  if isinstance(n.op, kinds))


def assert_product_close(ours, x, y, alpha=1.0, beta=0.0, z=None):
    """ours == alpha x y + beta z to float32 rounding of sums of len(y) terms (numpy in float64)."""
    x, y = x.astype('float64'), y.astype('float64')
    want = alpha * x.dot(y) + (beta * z.astype('float64') if beta else 0)
    scale = abs(alpha) * np.abs(x).dot(np.abs(y)) + (abs(beta) * np.abs(z) if beta else 0) + 1e-30
    worst = np.max(np.abs(ours - want) / scale)
    assert worst < 1e-5, 'off by %.3g of the summed magnitudes' % worst


SHAPES = [  # (rows of x, columns of x, columns of y)
    (100, 784, 1000),       # the published layer, forward: 31 full panels, then one of 8 columns
    (100, 1000, 784),       # its input's gradient (its weights transposed: packed 16 x 16 at a time)
    (784, 100, 1000),       # its weights' gradient
    (3, 5, 40),             # fewer rows than a tile, fewer columns than a transposed block
    (9, 2500, 33),          # three blocks of KC columns; the last panel 1 column wide
    (17, 1, 64),            # one column
    (4, 0, 48),             # no columns: zeros
    (100, 1000, 10),        # narrower than a panel: Theano's BLAS branch
    (3000, 100, 70),        # by row blocks, y packed whole; the last panel 6 columns wide
    (300, 1100, 40),        # x's block over 512 KiB, y too large to pack whole: Theano's BLAS branch
]


def stored(a, order):
    """a with the same values, stored by rows ('C') or by columns ('F')."""
    return np.ascontiguousarray(a) if order == 'C' else np.asfortranarray(a)


@pytest.mark.parametrize('orders', ['CC', 'FC', 'CF', 'FF'])
@pytest.mark.parametrize('M, K, N', SHAPES)
def test_dot_equals_numpys(M, K, N, orders):
    rng = np.random.RandomState(M + K + N)
    x, y = rng.randn(M, K).astype('float32'), rng.randn(K, N).astype('float32')
    x_, y_ = T.matrices('x', 'y')
    f = theano.function([x_, y_], T.dot(x_, y_))
    assert products(f) == [('engine.cpublas', 'Dot22')]
    assert_product_close(f(stored(x, orders[0]), stored(y, orders[1])), x, y)


ETA, MU, LAM = 0.01, 0.9, 0.0001


def momentum(p, v, g, mu, eta, lam=None):
    """(v', p') of SGD with momentum, written as nnet.Trainer writes it; scalars as graph constants."""
    mu, eta = T.constant(mu), T.constant(eta)
    v_new = mu * v - eta * T.constant(lam) * p - eta * g if lam is not None else mu * v - eta * g
    return v_new, p + v_new


def momentum_step(p0, v0, g, decay):
    """numpy's float64 step of the momentum update: (v', p', the magnitude of v's terms).  g is
    the gradient, or (x, y) for the product x y, whose float32 rounding scales with |x| |y|."""
    if isinstance(g, tuple):
        x, y = (a.astype('float64') for a in g)
        g, g_size = x.dot(y), np.abs(x).dot(np.abs(y))
    else:
        g = g.astype('float64')
        g_size = np.abs(g)
    p0, v0 = (a.astype('float64') for a in (p0, v0))
    v = MU * v0 - ETA * g - (ETA * LAM * p0 if decay else 0)
    return v, p0 + v, MU * np.abs(v0) + ETA * g_size + ETA * LAM * np.abs(p0)


def assert_momentum_step(v, p, want_v, want_p, scale, p0):
    """v, p as momentum_step's to float32 rounding (of sums of products: scale bounds them)."""
    assert np.all(np.abs(v - want_v) <= 1e-5 * scale)
    assert np.all(np.abs(p - want_p) <= 1e-6 * (np.abs(p0) + scale))


MOMENTUM_OPS = {'MomentumUpdate': cpublas.MomentumUpdate, 'MomentumGemm': cpublas.MomentumGemm}


def momentum_ops(f):
    """The momentum ops of a compiled function: [(kind, destroy_map)]."""
    return [(kind, getattr(n.op, 'destroy_map', {})) for n in f.maker.fgraph.toposort()
            for kind, op in MOMENTUM_OPS.items() if isinstance(n.op, op)]


@pytest.mark.parametrize('decay', [True, False])
@pytest.mark.parametrize('orders', ['CC', 'FF', 'CF'])
@pytest.mark.parametrize('M, K, N', [(784, 100, 1000), (40, 30, 35), (33, 1100, 8), (3000, 100, 70), (40, 0, 35)])
def test_momentum_with_a_product_is_one_op_in_place(M, K, N, orders, decay):
    """v <- mu v - eta x y (- eta lam p), p <- p + v, as the Trainer's update of a weight matrix:
    one MomentumGemm in v's and p's own buffers; p stored as v goes into the kernel's stores (v
    stored by columns too: then computed transposed), p stored otherwise gets a pass after."""
    rng = np.random.RandomState(M + N)
    x, y = rng.randn(M, K).astype('float32'), rng.randn(K, N).astype('float32')
    v0, p0 = (stored(rng.randn(M, N).astype('float32'), order) for order in orders)
    v, p = (theano.shared(a.copy(order='A'), borrow=True) for a in (v0, p0))
    v_buffer, p_buffer = v.get_value(borrow=True), p.get_value(borrow=True)
    x_, y_ = T.matrices('x', 'y')
    f = theano.function([x_, y_], [], updates=list(zip((v, p), momentum(p, v, T.dot(x_, y_), np.float32(MU), np.float32(ETA), np.float32(LAM) if decay else None))))
    assert momentum_ops(f) == [('MomentumGemm', {0: [0], 1: [5]})]
    f(x, y)
    assert v.get_value(borrow=True) is v_buffer and p.get_value(borrow=True) is p_buffer
    assert_momentum_step(v_buffer, p_buffer, *momentum_step(p0, v0, (x, y), decay), p0)


class MomentumGemmWithoutAVX512(WithoutAVX512, cpublas.MomentumGemm):
    """Our MomentumGemm built as for a CPU without AVX-512: Theano's BLAS call, then the pass."""


def test_momentum_gemm_without_avx512(monkeypatch):
    built = []
    monkeypatch.setattr(cpublas, 'MomentumGemm', lambda decay: built.append(decay) or MomentumGemmWithoutAVX512(decay))
    test_momentum_with_a_product_is_one_op_in_place(784, 100, 1000, 'CC', True)
    assert built == [True]


@pytest.mark.parametrize('decay', [True, False])
@pytest.mark.parametrize('shape, order', [((1000,), 'C'), ((16, 3, 5, 5), 'C'), ((7, 9), 'F'), ((0, 4), 'C')])
def test_momentum_of_other_gradients_is_one_op_in_place(shape, order, decay):
    """Biases, filters: gradients that are no product; stored by columns: element by element."""
    rng = np.random.RandomState(len(shape))
    g0, v0, p0 = (stored(rng.randn(*shape).astype('float32'), order) for _ in range(3))
    v, p = (theano.shared(a.copy(order='A'), borrow=True) for a in (v0, p0))
    g = T.tensor(dtype='float32', broadcastable=(False,) * len(shape))
    f = theano.function([g], [], updates=list(zip((v, p), momentum(p, v, 2 * g, np.float32(MU), np.float32(ETA), np.float32(LAM) if decay else None))))
    assert momentum_ops(f) == [('MomentumUpdate', {0: [0], 1: [1]})]
    f(g0)
    assert_momentum_step(v.get_value(), p.get_value(), *momentum_step(p0, v0, 2 * g0, decay), p0)


def test_momentum_stays_out_of_place_where_its_inputs_are_not_its_own():
    """Plain inputs, not updated shared variables: Theano's destroy handler refuses the in-place
    versions, and the op returns new arrays, the inputs untouched."""
    rng = np.random.RandomState(5)
    v0, p0, x0, y0 = (rng.randn(*s).astype('float32') for s in ((40, 64), (40, 64), (40, 8), (8, 64)))
    v, p, x, y = T.matrices('v', 'p', 'x', 'y')
    f = theano.function([v, p, x, y], momentum(p, v, T.dot(x, y), np.float32(MU), np.float32(ETA),
                                                       np.float32(LAM)))
    assert momentum_ops(f) == [('MomentumUpdate', {})]
    kept = [a.copy() for a in (v0, p0)]
    v1, p1 = f(v0, p0, x0, y0)
    np.testing.assert_array_equal(v0, kept[0])
    np.testing.assert_array_equal(p0, kept[1])
    assert_momentum_step(v1, p1, *momentum_step(p0, v0, (x0, y0), True), p0)


def test_momentum_in_python_as_in_c():
    """perform(), for Theano without a C compiler: both ops, the same step."""
    rng = np.random.RandomState(6)
    x0, y0 = rng.randn(50, 20).astype('float32'), rng.randn(20, 40).astype('float32')
    v0, p0, b0, u0 = (rng.randn(*s).astype('float32') for s in ((50, 40), (50, 40), (40,), (40,)))
    shared = [theano.shared(a.copy()) for a in (v0, p0, u0, b0)]
    x, y = T.matrices('x', 'y')
    updates = list(zip(shared[:2], momentum(shared[1], shared[0], T.dot(x, y), np.float32(MU),
                                                    np.float32(ETA), np.float32(LAM))))
    updates += zip(shared[2:], momentum(shared[3], shared[2], x[0, 0] * y[0, :], np.float32(MU),
                                                 np.float32(ETA)))
    f = theano.function([x, y], [], updates=updates, mode=theano.Mode(linker='py'))
    assert [name for name, _ in momentum_ops(f)] == ['MomentumGemm', 'MomentumUpdate']
    f(x0, y0)
    assert_momentum_step(*(s.get_value() for s in shared[:2]), *momentum_step(p0, v0, (x0, y0), True), p0)
    assert_momentum_step(*(s.get_value() for s in shared[2:]), *momentum_step(b0, u0, x0[0, 0] * y0[0], False), b0)


@pytest.mark.parametrize('decay', [True, False])
def test_momentum_on_the_gpu_is_theanos_elementwise_ops(monkeypatch, decay):
    """With device=cuda no CPU op in the step: the same rule from Theano's ops (GpuGemm there)."""
    monkeypatch.setattr(rewrites, 'cpu_graph', lambda: False)
    rng = np.random.RandomState(7)
    v0, p0, g0 = (rng.randn(30, 40).astype('float32') for _ in range(3))
    v, p = theano.shared(v0.copy()), theano.shared(p0.copy())
    g = T.matrix('g')
    f = theano.function([g], [], updates=list(zip((v, p), momentum(p, v, g, np.float32(MU), np.float32(ETA), np.float32(LAM) if decay else None))))
    assert momentum_ops(f) == []
    f(g0)
    assert_momentum_step(v.get_value(), p.get_value(), *momentum_step(p0, v0, g0, decay), p0)


def test_beta_zero_ignores_old_values():
    """As BLAS: with b = 0, z's old values are not read (NaN in z does not spread)."""
    rng = np.random.RandomState(1)
    x, y = rng.randn(20, 30).astype('float32'), rng.randn(30, 64).astype('float32')
    z_, a_, x_, y_, b_ = T.matrix(), T.scalar(), T.matrix(), T.matrix(), T.scalar()
    f = theano.function([z_, a_, x_, y_, b_], cpublas.Gemm(inplace=False)(z_, a_, x_, y_, b_))
    out = f(np.full((20, 64), np.nan, 'float32'), np.float32(2), x, y, np.float32(0))
    assert_product_close(out, x, y, alpha=2.0)


@pytest.mark.parametrize('M, K, N', [(100, 784, 1000), (3, 5, 40),
                                     (4, 0, 48)])    # no terms: zeros (Theano's own call refuses it)
def test_without_avx512_theanos_branch(M, K, N):
    rng = np.random.RandomState(2)
    x, y = rng.randn(M, K).astype('float32'), rng.randn(K, N).astype('float32')
    x_, y_ = T.matrices('x', 'y')
    f = theano.function([x_, y_], Dot22WithoutAVX512()(x_, y_))
    assert_product_close(f(x, y), x, y)


def test_float64_keeps_theanos_ops():
    x_, y_ = T.dmatrices('x', 'y')
    f = theano.function([x_, y_], T.dot(x_, y_))
    assert products(f) == [('theano.tensor.blas', 'Dot22')]


def test_the_published_step_uses_the_kernel():
    """The training step's dense products: the three of the 784 x 1000 layer and the softmax
    layer's are ours (the softmax layer's, 10 columns wide, then take Theano's branch)."""
    rng = np.random.RandomState(0)
    X, y = rng.randn(200, 3072).astype('float32'), rng.randint(0, 10, 200).astype('int32')
    net = convnet.CNN(rng, (3, 32, 32), [(16, (5, 5), (4, 4), None)], [1000], 10)
    trainer = nnet.Trainer(net, {'L': (X, y)}, 100, 0.01, 0.9, 0.0001, input_shape=(3, 32, 32))
    # forward and input gradient: Dot22; the weights' gradients in the momentum update: MomentumGemm
    assert products(trainer.train_fn) == [('engine.cpublas', 'Dot22')] * 4 + [('engine.cpublas', 'MomentumGemm')] * 2
    assert [name for name, _ in momentum_ops(trainer.train_fn)].count('MomentumUpdate') == 4   # W1, b2, b4, b5
    assert products(trainer.eval_fn) == [('engine.cpublas', 'Dot22')] * 2
    # the bias gradients (the conv stage's threshold, the two dense layers' b) are ours; the
    # cost's and the correct answers' sums over everything stay Theano's
    sums = products(trainer.train_fn, (cpublas.ChannelSum, T.Sum))
    assert sums == [('engine.cpublas', 'ChannelSum')] * 3 + [('theano.tensor.elemwise', 'Sum')] * 2


@pytest.mark.parametrize('shape', [(100, 1000), (100, 16, 7, 7), (3, 5), (2, 3, 1, 4), (0, 4), (4, 0, 2, 2)])
def test_channel_sum_equals_numpys(shape):
    """Every axis but 1 summed in float64, then rounded: numpy's float64 sum, rounded, exactly."""
    axes = (0,) + tuple(range(2, len(shape)))
    x = np.random.RandomState(3).randn(*shape).astype('float32') * 100
    x_ = T.tensor(dtype='float32', broadcastable=(False,) * len(shape))
    f = theano.function([x_], x_.sum(axis=axes))
    assert products(f, (cpublas.ChannelSum, T.Sum)) == [('engine.cpublas', 'ChannelSum')]
    want = x.astype('float64').sum(axis=axes).astype('float32')
    np.testing.assert_array_equal(f(x), want)
    if len(shape) == 2 and x.size:                  # strided: summed from a contiguous copy
        np.testing.assert_array_equal(f(x[::2, ::-1]), x[::2, ::-1].astype('float64').sum(axis=0).astype('float32'))


def test_other_sums_keep_theanos_op():
    x, x4, d = T.matrix(), T.tensor4(), T.dmatrix()
    for out in (x.sum(axis=1), x4.sum(axis=(0, 1)), x.sum(), d.sum(axis=0), x.sum(axis=0, acc_dtype='float32')):
        assert products(theano.function([v for v in (x, x4, d) if v in theano.gof.graph.inputs([out])], out),
                        (cpublas.ChannelSum, T.Sum)) == [('theano.tensor.elemwise', 'Sum')]
