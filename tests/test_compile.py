"""machine.compile_in_parallel: a function's new C modules built by g++ on every core at once."""
import os
import tempfile
import time

import numpy as np
import pytest

import theano
import theano.tensor as T
from theano.gof import cmodule, compilelock

from engine import machine


class Doubled(theano.gof.Op):
    """2 x in C whose source carries nonce: a module no compile cache holds yet."""
    __props__ = ('nonce', 'broken')

    def __init__(self, nonce, broken=False):
        self.nonce, self.broken = nonce, broken

    def make_node(self, x):
        x = T.as_tensor_variable(x)
        return theano.Apply(self, [x], [x.type()])

    def c_code_cache_version(self):
        return (1,)

    def c_code(self, node, name, inputs, outputs, sub):
        z = outputs[0]
        return """/* %d */ %s
        Py_XDECREF(%s); %s = (PyArrayObject*)PyArray_NewCopy(%s, NPY_CORDER); if (!%s) %s
        for (npy_intp i = 0; i < PyArray_SIZE(%s); ++i) ((npy_float32*)PyArray_DATA(%s))[i] *= 2;
        """ % (self.nonce, 'no C++ at all' if self.broken else '', z, z, inputs[0], z, sub['fail'], z, z)


class DoubledOldStyle(Doubled):
    """As Theano's Pool from an old pickle: prepare_node adds an input and its storage."""
    def prepare_node(self, node, storage_map, compute_map, impl):
        if len(node.inputs) == 1:
            node.inputs.append(T.constant(2.0))
            storage_map[node.inputs[1]] = [node.inputs[1].data]
            compute_map[node.inputs[1]] = [True]


def doubled(x, op=Doubled, **kwargs):
    return op(np.random.randint(2 ** 62), **kwargs)(x)


def run(f, values=(1, 2)):
    return f(np.array(values, 'float32')).tolist()


class Runs(list):
    """(folder, loaded by Theano) of each g++ run, and .spans: their (start, end) times."""


@pytest.fixture
def g_plus_plus_runs(monkeypatch, tmp_path):
    """Each g++ run of Theano's compiler as (its folder, whether Theano loads the module itself);
    the scratch folders of the modules compiled ahead go to tmp_path.  Theano's own helper module,
    which it builds once per compile folder at its first compiled thunk, is there before counting:
    the counts then do not depend on what earlier processes left in the compile folder."""
    import theano.gof.cutils  # noqa: F401
    runs, compile_str = Runs(), cmodule.GCC_compiler.compile_str

    def timed(*args, **kwargs):
        runs.append((kwargs['location'], kwargs.get('py_module', True)))
        start = time.monotonic()
        try:
            return compile_str(*args, **kwargs)
        finally:
            spans.append((start, time.monotonic()))
    spans = runs.spans = []     # (start, end) of each g++ run, in the order they ended
    monkeypatch.setattr(cmodule.GCC_compiler, 'compile_str', staticmethod(timed))
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    return runs


def test_new_c_modules_are_compiled_all_at_once_before_theano_loads_them(g_plus_plus_runs, tmp_path):
    """Theano ran g++ for a function's modules one after the other (23 s of the default run's
    first start on 2 cores); they now run in threads, into scratch folders that Theano's cache takes."""
    x, nonce = T.fvector(), np.random.randint(2 ** 62)
    f = theano.function([x], Doubled(nonce)(Doubled(nonce + 1)(x)))
    assert run(f) == [4, 8]
    assert [(os.path.dirname(folder), loads) for folder, loads in g_plus_plus_runs] == [(str(tmp_path), False)] * 2
    (first_start, first_end), (second_start, second_end) = sorted(g_plus_plus_runs.spans)
    if len(os.sched_getaffinity(0)) > 1:
        assert second_start < first_end                    # the two g++ ran at the same time
    assert list(tmp_path.iterdir()) == []                  # moved into the cache
    runs = len(g_plus_plus_runs)
    theano.function([x], Doubled(nonce)(x))                # the cache has it now
    assert len(g_plus_plus_runs) == runs


def test_a_module_that_fails_ahead_is_compiled_and_reported_by_theano_as_before(g_plus_plus_runs, tmp_path):
    x, held = T.fvector(), getattr(compilelock.get_lock, 'n_lock', 0)
    with pytest.raises(Exception, match='Compilation failed'):
        theano.function([x], doubled(x, broken=True))
    # Theano 1.0.5's lock_ctx has no `finally`: a failed compile keeps its compile lock, and
    # the next process to compile (another test's) waits two minutes for it to go stale
    while compilelock.get_lock.n_lock > held:
        compilelock.release_lock()
    assert [loads for folder, loads in g_plus_plus_runs] == [False, True]
    assert not list(tmp_path.glob('theano-ahead-*'))        # (g++'s report is there twice: rare enough)


def test_a_node_that_prepares_only_with_theanos_storage_map_is_compiled_by_theano(g_plus_plus_runs):
    x = T.fvector()
    assert run(theano.function([x], doubled(x, DoubledOldStyle))) == [2, 4]
    assert [loads for folder, loads in g_plus_plus_runs] == [True]


def test_without_a_temporary_folder_theano_compiles_as_before(g_plus_plus_runs, monkeypatch):
    mkdtemp = tempfile.mkdtemp

    def none_for_scratch(prefix=None, **kwargs):       # Theano's own folders still come
        if prefix == 'theano-ahead-':
            raise OSError(28, 'No space left on device')
        return mkdtemp(prefix=prefix, **kwargs)
    monkeypatch.setattr(tempfile, 'mkdtemp', none_for_scratch)
    x = T.fvector()
    assert run(theano.function([x], doubled(x))) == [2, 4]
    assert [loads for folder, loads in g_plus_plus_runs] == [True]


def test_modules_compiled_ahead_that_no_thunk_asks_for_leave_nothing_behind(g_plus_plus_runs, tmp_path,
                                                                             monkeypatch):
    modules_to_compile = machine._modules_to_compile

    def and_one_more(nodes):
        for identity, compiler, arguments in modules_to_compile(nodes):
            yield identity, compiler, arguments
            yield 'no thunk asks for this', compiler, arguments
    monkeypatch.setattr(machine, '_modules_to_compile', and_one_more)
    x = T.fvector()
    theano.function([x], doubled(x))
    assert len(g_plus_plus_runs) == 2
    assert list(tmp_path.iterdir()) == [] and machine._compiling == {}


def test_ctrl_c_while_compiling_starts_no_more_g_plus_plus_and_leaves_nothing_behind(g_plus_plus_runs, tmp_path,
                                                                                  monkeypatch):
    """The first version went on with every queued g++ (5-8 s after Ctrl-C, a folder left)."""
    modules_to_compile, workers = machine._modules_to_compile, len(os.sched_getaffinity(0))

    def then_ctrl_c(nodes):
        for identity, compiler, arguments in modules_to_compile(nodes):
            for copy in range(workers + 4):
                yield '%s %d' % (identity, copy), compiler, arguments
        raise KeyboardInterrupt
    monkeypatch.setattr(machine, '_modules_to_compile', then_ctrl_c)
    x = T.fvector()
    with pytest.raises(KeyboardInterrupt):
        theano.function([x], doubled(x))
    assert len(g_plus_plus_runs) <= workers
    assert list(tmp_path.iterdir()) == [] and machine._compiling == {}
