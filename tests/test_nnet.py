"""nnet.py: layers against numpy, gradients, the update rule, learning, save/load, NaN guard."""

import numpy as np
import pytest

import nnet
import theano
import theano.tensor as T
from conftest import small_problem

floatX = nnet.floatX


def softmax(a):
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize('activation, reference', [
    ('linear', lambda a: a), ('relu', lambda a: np.maximum(a, 0)), ('softmax', softmax)])
def test_full_layer_matches_numpy(activation, reference):
    rng = np.random.RandomState(0)
    layer = nnet.FullLayer(rng, 5, 4, activation)
    layer.b.set_value(rng.randn(4).astype(floatX))
    x = rng.randn(3, 5).astype(floatX)
    x_ = T.matrix()
    out = theano.function([x_], layer.output(x_))(x)
    np.testing.assert_allclose(out, reference(x @ layer.W.get_value() + layer.b.get_value()), rtol=1e-5, atol=1e-6)


def test_layer_without_threshold_has_no_bias_and_mlp_decays_only_weights():
    layer = nnet.FullLayer(np.random.RandomState(0), 5, 4, 'relu', bias=False)
    assert layer.b is None and layer.params == [layer.W]
    net = nnet.MLP(np.random.RandomState(0), 6, [5, 4], 3)
    assert [p.name for p in net.params] == ['W1', 'b1', 'W2', 'b2', 'W3', 'b3']
    assert [p.name for p in net.decay] == ['W1', 'W2', 'W3']
    assert abs(net.layers[0].W.get_value().mean()) < 0.005         # zero-mean normal, std Wstd
    assert net.layers[1].W.get_value().std() == pytest.approx(0.01, rel=0.5)
    big = nnet.MLP(np.random.RandomState(0), 300, [200], 3, Wstd=0.1)
    assert big.layers[0].W.get_value().std() == pytest.approx(0.1, rel=0.02)
    assert not big.layers[0].b.get_value().any()


def test_same_seed_same_weights():
    a, b = (nnet.MLP(np.random.RandomState(3), 6, [5], 3) for _ in range(2))
    for p, q in zip(a.params, b.params):
        np.testing.assert_array_equal(p.get_value(), q.get_value())


def softmax_layer_with_a_tie():
    """A softmax layer of 3 -> 4 whose classes 2 and 3 tie, five rows and their labels, the rows' probabilities."""
    layer = nnet.FullLayer(np.random.RandomState(0), 3, 4, 'softmax')
    W = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], floatX)     # classes 2 and 3 tie
    b = np.array([0.1, -0.2, 0.0, 0.0], floatX)
    layer.W.set_value(W)
    layer.b.set_value(b)
    x = np.array([[2, 0, 0], [0, 3, 0], [0, 0, 1], [0, 0, 1], [1, 1, 0]], floatX)
    y = np.array([0, 0, 2, 3, 1], 'int32')
    return layer, x, y, softmax(x @ W + b)


def test_cost_terms_are_summed_cross_entropy_and_first_argmax_hits():
    layer, x, y, p = softmax_layer_with_a_tie()
    x_, y_ = T.matrix(), T.ivector()
    cost, correct = theano.function([x_, y_], layer.cost_terms(x_, y_))(x, y)
    assert cost == pytest.approx(-np.log(p[np.arange(5), y]).sum(), rel=1e-5)
    assert correct == 2                     # rows 0 and 2: a tie counts for its first class only
    assert correct == (p.argmax(axis=1) == y).sum()
    with pytest.raises(ValueError, match='softmax'):
        nnet.FullLayer(np.random.RandomState(0), 3, 4, 'relu').cost_terms(x_, y_)


def test_cost_terms_on_the_gpu_count_the_rows_whose_label_is_most_probable(monkeypatch):
    """The GPU's graph (Theano's GPU argmax of the fused op is wrong), compiled here on the CPU:
    the same cost, and the rows whose label has the largest probability, a tie for each class."""
    monkeypatch.setattr(nnet.machine, 'gpu_asked', lambda: True)
    layer, x, y, p = softmax_layer_with_a_tie()
    x_, y_ = T.matrix(), T.ivector()
    f = theano.function([x_, y_], layer.cost_terms(x_, y_))
    cost, correct = f(x, y)
    assert cost == pytest.approx(-np.log(p[np.arange(5), y]).sum(), rel=1e-5)
    assert correct == 3                     # rows 0, 2 and 3 (the tie)
    assert theano.function([x_], layer.cost_terms(x_, y)[1])(x) == 3     # labels as an array (the gradient tests)
    rng = np.random.RandomState(1)          # no ties: as the argmax
    layer.W.set_value(rng.randn(3, 4).astype(floatX))
    x, y = rng.randn(50, 3).astype(floatX), rng.randint(0, 4, 50).astype('int32')
    assert f(x, y)[1] == (softmax(x @ layer.W.get_value() + layer.b.get_value()).argmax(axis=1) == y).sum()


def test_cost_gradient_matches_finite_differences():
    rng = np.random.RandomState(1)
    x = rng.randn(7, 4)
    y = rng.randint(0, 3, 7).astype('int32')
    out = nnet.FullLayer(rng, 5, 3, 'softmax')

    def mean_cost(W1, b1, W2, b2):
        out.W, out.b = W2, b2                   # the layer's graph with these as the variables
        return out.cost_terms(T.nnet.relu(T.dot(x, W1) + b1), y)[0] / 7
    theano.gradient.verify_grad(mean_cost, [rng.randn(4, 5), rng.randn(5) + 0.5, rng.randn(5, 3), rng.randn(3)],
                                rng=rng, eps=1e-3, abs_tol=1e-3, rel_tol=1e-3)


def test_one_step_follows_the_update_rule():
    X, y = small_problem(20)
    net = nnet.MLP(np.random.RandomState(0), 6, [5], 3)
    eta, mu, lam = 0.1, 0.9, 0.01
    trainer = nnet.Trainer(net, {'L': (X, y)}, 10, eta, mu, lam)
    W1, b1, W2, b2 = [p.get_value().astype(np.float64) for p in net.params]

    def grads(W1, b1, W2, b2, X, y):          # numpy backprop of the mean cross-entropy
        a = X @ W1 + b1
        h = np.maximum(a, 0)
        p = softmax(h @ W2 + b2)
        d2 = (p - np.eye(3)[y]) / len(y)
        d1 = (d2 @ W2.T) * (a > 0)
        return [X.T @ d1, d1.sum(0), h.T @ d2, d2.sum(0)]
    params = [W1, b1, W2, b2]
    velocity = [np.zeros_like(p) for p in params]
    for start in (0, 10):                     # two steps: the second one uses the momentum
        g = grads(*params, X[start:start + 10], y[start:start + 10])
        for i in range(4):
            decay = lam * params[i] if i in (0, 2) else 0
            velocity[i] = -eta * (g[i] + decay) + mu * velocity[i]
            params[i] = params[i] + velocity[i]
        trainer.train_fn(start, start + 10)
    for p, expected in zip(net.params, params):
        np.testing.assert_allclose(p.get_value(), expected, rtol=1e-4, atol=1e-5)


def test_weight_gradients_accumulate_into_the_momentum_in_place():
    net = nnet.MLP(np.random.RandomState(0), 6, [5], 3)
    X, y = small_problem(20)
    trainer = nnet.Trainer(net, {'L': (X, y)}, 10, 0.1, 0.9, 0.01)
    gemms = [node for node in trainer.train_fn.maker.fgraph.apply_nodes
             if isinstance(node.op, theano.tensor.blas.Gemm)]
    # one product per weight matrix, added to the momentum's buffer, which is then added to W
    # in the same op (cpublas.MomentumGemm): no copy of W each step, no pass of its own
    assert sorted((node.inputs[0].name, node.inputs[5].name) for node in gemms) == [('dW1', 'W1'), ('dW2', 'W2')]
    assert all(node.op.destroy_map == {0: [0], 1: [5]} for node in gemms)


def test_mlp_learns_a_separable_problem_and_eta_changes_without_recompiling():
    X, y = small_problem(400)
    net = nnet.MLP(np.random.RandomState(0), 6, [20], 3)
    trainer = nnet.Trainer(net, {'L': (X[:300], y[:300]), 'V': (X[300:], y[300:])}, 25, 0.05, 0.9, 0.0)
    cost0, _ = trainer.evaluate('L')
    for _ in range(20):
        trainer.train_epoch()
    cost, acc = trainer.evaluate('V')
    assert cost < cost0 / 4 and acc > 95
    before = [p.get_value() for p in net.params]
    trainer.eta.set_value(np.asarray(0, floatX))
    trainer.mu.set_value(np.asarray(0, floatX))
    trainer.train_epoch()
    for p, q in zip(net.params, before):
        np.testing.assert_array_equal(p.get_value(), q)


def test_evaluation_in_minibatches_weights_a_short_last_batch_right():
    n = 2 * nnet.EVAL_ROWS + 107
    X, y = small_problem(n)
    net = nnet.MLP(np.random.RandomState(0), 6, [5], 3)
    trainer = nnet.Trainer(net, {'V': (X, y)}, 25, 0.1, 0.9, 0.0)
    assert trainer.batches('V')[-1] == (n - 7, n)                   # training: batchsize rows
    compiled, calls = trainer.eval_fn, []
    trainer.eval_fn = lambda i, j: calls.append((i, j)) or compiled(i, j)
    W1, b1, W2, b2 = [p.get_value() for p in net.params]
    p = softmax(np.maximum(X @ W1 + b1, 0) @ W2 + b2)
    cost, acc = trainer.evaluate('V')
    e = nnet.EVAL_ROWS                                              # evaluation: EVAL_ROWS rows
    assert calls == [(0, e), (e, 2 * e), (2 * e, n)]
    assert cost == pytest.approx(-np.log(p[np.arange(n), y]).mean(), rel=1e-4)
    assert acc == pytest.approx(100.0 * (p.argmax(1) == y).mean())


def test_evaluation_takes_the_training_batchsize_when_larger():
    X, y = small_problem(1300)
    trainer = nnet.Trainer(nnet.MLP(np.random.RandomState(0), 6, [5], 3), {'V': (X, y)}, 650, 0.1, 0.9, 0.0)
    compiled, calls = trainer.eval_fn, []
    trainer.eval_fn = lambda i, j: calls.append((i, j)) or compiled(i, j)
    trainer.evaluate('V')
    assert calls == [(0, 650), (650, 1300)]


def test_save_and_load_round_trip(tmp_path):
    a = nnet.MLP(np.random.RandomState(0), 6, [5], 3)
    b = nnet.MLP(np.random.RandomState(1), 6, [5], 3)
    path = str(tmp_path / 'net.npz')
    a.save(path, {'eta': 0.1, 'H2': (5,)})
    with np.load(path) as f:                      # plain arrays, no pickled Theano objects
        assert all(f[k].dtype != object for k in f.files)
    assert b.load(path) == {'eta': 0.1, 'H2': [5]}
    for p, q in zip(a.params, b.params):
        np.testing.assert_array_equal(p.get_value(), q.get_value())
    with pytest.raises(ValueError, match='shape'):
        nnet.MLP(np.random.RandomState(0), 6, [4], 3).load(path)


def test_nan_guard_names_the_epoch():
    X, y = small_problem(40)
    X[25, 2] = np.inf
    trainer = nnet.Trainer(nnet.MLP(np.random.RandomState(0), 6, [5], 3), {'L': (X, y)}, 10, 0.1, 0.9, 0.0)
    with pytest.raises(nnet.TrainingDiverged, match='epoch 3, minibatch 2'):
        trainer.train_epoch('L', 'epoch 3')


def test_joined_takes_the_array_its_parts_are_consecutive_views_of():
    rows = np.arange(60, dtype=floatX).reshape(12, 5)
    whole = nnet.joined([rows[:7], rows[7:9], rows[9:]])
    assert np.shares_memory(whole, rows) and np.array_equal(whole, rows)     # no copy
    for parts in ([rows[:7], rows[9:], rows[7:9]],        # out of order
                  [rows[:7], rows[8:]],                   # a row left out
                  [rows[:7], rows[7:9]],                  # not the whole array
                  [rows[:7].copy(), rows[7:]],            # another array
                  [rows[:, :2], rows[:, 2:4]]):           # columns
        out = nnet.joined(parts)
        assert not np.shares_memory(out, rows) and np.array_equal(out, np.concatenate(parts))
