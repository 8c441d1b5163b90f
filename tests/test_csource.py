"""engine/csource.py: our C ops' compile-cache keys follow the C they compile, so that a changed
kernel is built again however warm Theano's cache is, and a broken one fails the run."""
import numpy as np
import pytest
import theano
import theano.tensor as T
from theano.gof import compilelock

from engine import cpublas, cpuops
from engine.csource import KeyedBySource, generated_c

X = np.array([[-2.0, -0.5, 0.5, 2.0]], 'float32')
B = np.zeros(4, 'float32')


def relu_function():
    x, b = T.fmatrix(), T.fvector()
    return theano.function([x, b], cpuops.BiasReLU()(x, b))


def nodes():
    """A node of each of our C ops."""
    x4, x2, v = T.ftensor4(), T.fmatrix(), T.fvector()
    pooled = cpuops.MaxPool((2, 2), (2, 2))(x4)
    scalar = T.fscalar()
    return [pooled.owner, cpuops.MaxPoolGrad((2, 2), (2, 2))(x4, pooled, pooled).owner,
            cpuops.PooledFilterGrad((2, 2), (2, 2))(x4, x4, pooled, pooled).owner,
            cpuops.CorrMM()(x4, x4).owner, cpuops.CorrMM_gradWeights()(x4, x4).owner,
            cpuops.BiasReLU()(x2, v).owner, cpublas.Dot22()(x2, x2).owner,
            cpublas.ChannelSum()(x2).owner,
            cpublas.MomentumUpdate(False)(x2, x2, x2, scalar, scalar)[0].owner]


def test_every_c_op_of_ours_is_keyed_by_its_source():
    ours = [cls for module in (cpuops, cpublas) for name, cls in vars(module).items()
            if isinstance(cls, type) and issubclass(cls, theano.gof.Op) and cls.__module__ == module.__name__
            and not name.startswith('_')]
    assert len(ours) == 11 and all(issubclass(cls, KeyedBySource) for cls in ours), ours
    ours_too = {klass for cls in ours for klass in cls.__mro__ if klass.__module__ in (cpuops.__name__, cpublas.__name__)}
    assert [klass for klass in ours_too if 'c_code_cache_version' in vars(klass)] == []    # no number raised by hand


@pytest.mark.parametrize('index', range(9))
def test_one_byte_of_the_c_changed_gives_another_key(index, monkeypatch):
    node = nodes()[index]
    key = node.op.c_code_cache_version_apply(node)
    assert key == nodes()[index].op.c_code_cache_version_apply(nodes()[index])    # the same op again: the same key
    code = type(node.op).c_code
    monkeypatch.setattr(type(node.op), 'c_code', lambda self, *a: code(self, *a).replace(';', ' ;', 1))
    assert node.op.c_code_cache_version_apply(node) != key
    assert generated_c(node.op, node).count(' ;') >= 1


def test_a_changed_kernel_runs_the_new_code_with_a_warm_cache(monkeypatch):
    """As a user who updates the project keeps ~/.theano: the kernel's new code must run."""
    np.testing.assert_array_equal(relu_function()(X, B), [[0, 0, 0.5, 2]])          # compiled, or from the cache
    code = cpuops.BiasReLU.c_code
    monkeypatch.setattr(cpuops.BiasReLU, 'c_code', lambda self, *a: code(self, *a).replace('a < 0 ? 0 : a', 'a < 0 ? 0.5f * a : a'))
    np.testing.assert_array_equal(relu_function()(X, B), [[-1, -0.25, 0.5, 2]])


def test_a_kernel_that_no_longer_compiles_fails_with_a_warm_cache(monkeypatch):
    relu_function()                                                                # in the cache now
    code = cpuops.BiasReLU.c_code
    monkeypatch.setattr(cpuops.BiasReLU, 'c_code', lambda self, *a: code(self, *a) + '\nthis is no C;\n')
    held = getattr(compilelock.get_lock, 'n_lock', 0)
    try:
        with pytest.raises(Exception, match='Compilation failed'):
            relu_function()
    finally:        # Theano 1.0.5 keeps its compile lock after a failed compile (no `finally` there)
        while getattr(compilelock.get_lock, 'n_lock', 0) > held:
            compilelock.release_lock()
