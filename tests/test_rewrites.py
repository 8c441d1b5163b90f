"""engine/rewrites.py: plain Theano expressions, in any graph, reach our CPU kernels through Theano's
optimizer; what our ops do not serve stays Theano's; excluding the tag runs stock Theano, the oracle."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import convnet
import nnet
import theano
import theano.tensor as T
from conftest import ROOT, make_cifar, stock_theano
from engine import cpublas, cpuops, rewrites
from theano.gof.opt import check_stack_trace
from theano.tensor.nnet import corr
from theano.tensor.signal import pool

OURS = (cpuops.CorrMM, cpuops.CorrMM_gradWeights, cpuops.PooledFilterGrad, cpuops.MaxPool, cpuops.MaxPoolGrad,
        cpuops.BiasReLU, cpublas.MomentumUpdate, cpublas.MomentumGemm, cpublas.Dot22, cpublas.Gemm,
        cpublas.ChannelSum)


def op_types(f):
    return {type(node.op) for node in f.maker.fgraph.apply_nodes}


def ours_and_stock(inputs, outputs, values, updates=None):
    """The outputs (and shared variables after the updates) computed with our rewrites and with
    stock Theano, from the same start, and the op classes of each compiled function."""
    results = []
    for mode in (None, stock_theano()):
        shared = [s for s, _ in updates or []]
        start = [s.get_value() for s in shared]
        f = theano.function(inputs, outputs, updates=updates, mode=mode)
        results.append((f(*values), [s.get_value() for s in shared], op_types(f)))
        for s, v in zip(shared, start):
            s.set_value(v)
    return results


def assert_close(ours, theirs):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max(initial=0))))


RNG = np.random.RandomState(0)
X4 = RNG.randn(4, 3, 12, 11).astype('float32')
W4 = RNG.randn(5, 3, 3, 2).astype('float32')


def conv_pool_relu(flip):
    """A convolution, 2x2 max-pooling and a thresholded ReLU, the output and the gradients of
    x, W and b, as anyone would write them."""
    x, W, b = T.tensor4('x'), T.tensor4('W'), T.vector('b')
    c = T.nnet.conv2d(x, W, filter_flip=flip)
    out = T.maximum(pool.pool_2d(c, ws=(2, 2), ignore_border=True) + b.dimshuffle('x', 0, 'x', 'x'), 0)
    cost = (out * np.linspace(-1, 1, 5 * 5 * 5).reshape(1, 5, 5, 5).astype('float32')).sum()
    return [x, W, b], [out] + T.grad(cost, [x, W, b])


@pytest.mark.parametrize('flip', [False, True])
def test_conv_pool_relu_written_plainly_run_on_our_ops(flip):
    inputs, outputs = conv_pool_relu(flip)
    ours, theirs = ours_and_stock(inputs, outputs, [X4, W4, RNG.randn(5).astype('float32')])
    assert {cpuops.CorrMM, cpuops.PooledFilterGrad, cpuops.MaxPool, cpuops.MaxPoolGrad, cpuops.BiasReLU} <= ours[2]
    assert not set(OURS) & theirs[2] and {corr.CorrMM, pool.Pool} <= theirs[2]
    assert_close(ours[0], theirs[0])


def test_our_ops_keep_the_stack_trace_of_what_they_replace():
    """Where the user's code built the expression: Theano's error messages point there."""
    inputs, outputs = conv_pool_relu(True)
    f = theano.function(inputs, outputs)
    assert check_stack_trace(f, ops_to_check=(cpuops.CorrMM, cpuops.PooledFilterGrad, cpuops.MaxPool, cpuops.BiasReLU))


def test_theanos_own_correlation_ops_become_ours():
    x, W = T.tensor4('x'), T.tensor4('W')
    out = corr.CorrMM('valid', (1, 1))(x, W)
    ours, theirs = ours_and_stock([x, W], [out, T.grad(out.sum(), W)], [X4, W4])
    assert {cpuops.CorrMM, cpuops.CorrMM_gradWeights} <= ours[2] and not {corr.CorrMM, corr.CorrMM_gradWeights} & ours[2]
    assert_close(ours[0], theirs[0])


@pytest.mark.parametrize('expression', [
    lambda x, b: T.maximum(x + b.dimshuffle('x', 0, 'x', 'x'), 0),
    lambda x, b: T.maximum(b.dimshuffle('x', 0, 'x', 'x') + x, 0)])
def test_relu_with_a_threshold_in_either_order_is_bias_relu(expression):
    x, b = T.tensor4('x'), T.vector('b')
    out = expression(x, b)
    ours, theirs = ours_and_stock([x, b], [out] + T.grad(out.sum(), [x, b]), [X4, RNG.randn(3).astype('float32')])
    assert cpuops.BiasReLU in ours[2] and cpuops.BiasReLU not in theirs[2]
    assert_close(ours[0], theirs[0])


@pytest.mark.parametrize('what, expression', [
    ('average pooling', lambda x: pool.pool_2d(x, ws=(2, 2), ignore_border=True, mode='average_exc_pad')),
    ('windows across the border', lambda x: pool.pool_2d(x, ws=(2, 2), ignore_border=False)),
    ('padding', lambda x: pool.pool_2d(x, ws=(2, 2), ignore_border=True, pad=(1, 1))),
    ('windows given at run time', lambda x: pool.pool_2d(x, ws=T.as_tensor_variable(T.iscalar('k')).repeat(2),
                                                         ignore_border=True)),
    ('a threshold other than 0', lambda x: T.maximum(x + T.vector('b').dimshuffle('x', 0, 'x', 'x'), 1)),
    ('a threshold along another axis', lambda x: T.maximum(x + T.vector('b').dimshuffle('x', 'x', 0, 'x'), 0)),
    ('maps of 5 axes', lambda x: pool.pool_2d(x.dimshuffle('x', 0, 1, 2, 3), ws=(2, 2), ignore_border=True)),
    ('a bias of another dtype', lambda x: T.maximum(x + T.dvector('b').dimshuffle('x', 0, 'x', 'x'), 0))])
def test_what_our_ops_do_not_serve_stays_theanos(what, expression):
    out = expression(T.tensor4('x'))
    inputs = [v for v in theano.gof.graph.inputs([out]) if not isinstance(v, theano.gof.Constant)]
    f = theano.function(inputs, out, on_unused_input='ignore')
    assert not set(OURS) & op_types(f), what


def test_the_momentum_update_as_the_trainer_writes_it_is_one_op():
    v, p = theano.shared(RNG.randn(6, 7).astype('float32'), 'v'), theano.shared(RNG.randn(6, 7).astype('float32'), 'p')
    g = T.matrix('g')
    mu, eta, lam = (theano.shared(np.float32(s)) for s in (0.9, 0.01, 0.0001))
    v_new = mu * v - eta * lam * p - eta * g
    ours, theirs = ours_and_stock([g], [], [RNG.randn(6, 7).astype('float32')], updates=[(v, v_new), (p, p + v_new)])
    assert cpublas.MomentumUpdate in ours[2] and cpublas.MomentumUpdate not in theirs[2]
    assert_close(ours[1], theirs[1])


def test_a_second_conv_pool_stage_gets_the_kernels_by_itself():
    """Two Conv-Pool stages of convnet's layers: in the Trainer's step both convolutions,
    poolings and ReLUs are ours, the first stage's input gradient Theano's CorrMM_gradInputs;
    the cost and gradients are stock Theano's to float32 rounding."""
    rng = np.random.RandomState(1)
    X, y = rng.randn(200, 3 * 20 * 20).astype('float32'), rng.randint(0, 10, 200).astype('int32')
    stages = [(6, (3, 3), (2, 2), None), (8, (3, 3), (3, 3), None)]      # 20 -> 18 -> 9 -> 7 -> 2
    net = convnet.CNN(np.random.RandomState(0), (3, 20, 20), stages, [30], 10)
    trainer = nnet.Trainer(net, {'L': (X, y)}, 100, 0.01, 0.9, 0.0001, input_shape=(3, 20, 20))
    counts = {}
    for node in trainer.train_fn.maker.fgraph.apply_nodes:
        counts[type(node.op)] = counts.get(type(node.op), 0) + 1
    assert counts[cpuops.CorrMM] == counts[cpuops.MaxPool] == counts[cpuops.PooledFilterGrad] == 2
    assert counts[cpuops.BiasReLU] == 3 and counts[corr.CorrMM_gradInputs] == 1 and counts[cpuops.MaxPoolGrad] == 1
    x, labels = T.matrix('x'), T.ivector('y')
    cost, correct = net.cost_terms(x.reshape((x.shape[0], 3, 20, 20)), labels)
    ours, theirs = ours_and_stock([x, labels], [cost, correct] + T.grad(cost, net.params), [X[:100], y[:100]])
    assert not set(OURS) & theirs[2]
    assert_close(ours[0], theirs[0])


def first_rows(log):
    """The epoch rows' figures: [(epoch, costL, accL, costV, accV)]."""
    return [tuple(float(v) for v in m.groups()) for m in
            re.finditer(r'^(\d+) \| (\S+) (\S+) \| (\S+) (\S+) \| [\d.]+ s$', log, re.M)]


def test_excluding_the_tag_runs_stock_theano_and_agrees(tmp_path):
    """THEANO_FLAGS=optimizer_excluding=cpu_kernels: none of our ops in the training step, and
    the rows of the first epochs as with them, to float32 rounding (stock Theano is the oracle)."""
    make_cifar(str(tmp_path), rows=200, learnable=True)
    logs = []
    for flags in ('', 'optimizer_excluding=' + rewrites.TAG):
        env = dict(os.environ, THEANO_FLAGS=','.join(filter(None, [os.environ['THEANO_FLAGS'], flags])))
        result = subprocess.run([sys.executable, 'cifar10_convnet.py', '--W1dim=(4,5,5)', '--H2=32', '--nepoch=1',
                                 '--datadir=%s' % tmp_path, '--outdir=%s' % (tmp_path / 'runs')],
                                cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        logs.append(result.stdout)
    ops = [re.search(r'^# CPU ops of the training step: (.*)$', log, re.M).group(1) for log in logs]
    assert 'BiasReLU' in ops[0] and 'MaxPool' in ops[0] and 'PooledFilterGrad' in ops[0]
    assert not re.search(r'BiasReLU|MaxPool\b|PooledFilterGrad|Momentum|ChannelSum', ops[1]) and 'Pool' in ops[1]
    ours, stock = first_rows(logs[0]), first_rows(logs[1])
    assert [row[0] for row in ours] == [row[0] for row in stock] == [0.0, 1.0]
    for a, b in zip(ours, stock):
        assert abs(a[1] - b[1]) <= 2e-5 and abs(a[3] - b[3]) <= 2e-5     # costs: 6 decimals, float32 sums
        assert abs(a[2] - b[2]) <= 100 / 800 + 1e-9 and abs(a[4] - b[4]) <= 100 / 200 + 1e-9   # one image at most
