"""engine/csource.py: our C ops' source is read from engine/c/, and their compile-cache keys follow
the C they compile, so that a changed kernel is built again however warm Theano's cache is, and a
broken one fails the run."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import theano
import theano.tensor as T
from theano.gof import compilelock

from conftest import ROOT, make_mnist
from engine import cpublas, cpuops, csource
from engine.csource import KeyedBySource, c_sections, generated_c

X = np.array([[-2.0, -0.5, 0.5, 2.0]], 'float32')
B = np.zeros(4, 'float32')


def relu_function():
    x, b = T.fmatrix(), T.fvector()
    return theano.function([x, b], cpuops.BiasReLU()(x, b))


def nodes():
    """Nodes of each of our C ops, which between them compile every section of engine/c/."""
    x4, x2, v, d4 = T.ftensor4(), T.fmatrix(), T.fvector(), T.dtensor4()
    pooled, overlapping = cpuops.MaxPool((2, 2), (2, 2))(x4), cpuops.MaxPool((3, 3), (2, 2))(x4)
    scalar = T.fscalar()
    return [pooled.owner, cpuops.MaxPoolGrad((2, 2), (2, 2))(x4, pooled, pooled).owner,
            cpuops.MaxPoolGrad((3, 3), (2, 2))(x4, overlapping, overlapping).owner,
            cpuops.PooledFilterGrad((2, 2), (2, 2))(x4, x4, pooled, pooled).owner,
            cpuops.CorrMM()(x4, x4).owner, cpuops.CorrMM()(d4, d4).owner, cpuops.CorrMM_gradWeights()(x4, x4).owner,
            cpuops.BiasReLU()(x2, v).owner, cpuops.BiasReLU(inplace=True)(x2, v).owner, cpublas.Dot22()(x2, x2).owner,
            cpublas.ChannelSum()(x2).owner,
            cpublas.MomentumUpdate(False)(x2, x2, x2, scalar, scalar)[0].owner,
            cpublas.MomentumGemm(True)(T.fmatrix(), scalar, x2, x2, scalar, T.fmatrix(), scalar)[0].owner]


SECTIONS = [(module, name) for module in (cpuops, cpublas) for name in sorted(module.C)]


def test_every_section_of_every_c_file_is_read_by_one_module():
    files = sorted(f for f in os.listdir(csource.C_FOLDER) if f.endswith('.c'))
    assert len(files) >= 9 and sorted(c_sections(*files)) == sorted(name for _, name in SECTIONS)
    assert len(SECTIONS) == len({name for _, name in SECTIONS})


def test_c_sections_cut_a_file_as_documented(tmp_path, monkeypatch):
    (tmp_path / 'k.c').write_text('/* the file */\n#section a\n\nint a;\n/// about b\n#section b\n  b(%(x)s);\n\n')
    monkeypatch.setattr(csource, 'C_FOLDER', str(tmp_path))
    assert c_sections('k.c') == {'a': '\nint a;', 'b': '  b(%(x)s);\n'}
    (tmp_path / 'twice.c').write_text('#section a\nx\n')
    with pytest.raises(ValueError, match='a second section a'):
        c_sections('k.c', 'twice.c')


def test_every_c_op_of_ours_is_keyed_by_its_source():
    ours = [cls for module in (cpuops, cpublas) for name, cls in vars(module).items()
            if isinstance(cls, type) and issubclass(cls, theano.gof.Op) and cls.__module__ == module.__name__
            and not name.startswith('_')]
    assert len(ours) == 11 and all(issubclass(cls, KeyedBySource) for cls in ours), ours
    ours_too = {klass for cls in ours for klass in cls.__mro__ if klass.__module__ in (cpuops.__name__, cpublas.__name__)}
    assert [klass for klass in ours_too if 'c_code_cache_version' in vars(klass)] == []    # no number raised by hand


@pytest.mark.parametrize('module, section', SECTIONS, ids=[name for _, name in SECTIONS])
def test_one_byte_of_a_c_file_changed_gives_another_key(module, section, monkeypatch):
    """Each section of engine/c/ with one byte changed: the key of some op that compiles it changes."""
    keys = [node.op.c_code_cache_version_apply(node) for node in nodes()]
    assert keys == [node.op.c_code_cache_version_apply(node) for node in nodes()]    # the same ops again: the same keys
    code = module.C[section]
    changed = code.replace(';', ' ;', 1) if ';' in code else code + ' '
    monkeypatch.setitem(module.C, section, changed)
    assert [node.op.c_code_cache_version_apply(node) for node in nodes()] != keys


def test_a_changed_kernel_runs_the_new_code_with_a_warm_cache(monkeypatch):
    """As a user who updates the project keeps ~/.theano: the kernel's new code must run."""
    np.testing.assert_array_equal(relu_function()(X, B), [[0, 0, 0.5, 2]])          # compiled, or from the cache
    monkeypatch.setitem(cpuops.C, 'bias_relu', cpuops.C['bias_relu'].replace('a < 0 ? 0 : a', 'a < 0 ? 0.5f * a : a'))
    np.testing.assert_array_equal(relu_function()(X, B), [[-1, -0.25, 0.5, 2]])


def test_a_kernel_that_no_longer_compiles_fails_with_a_warm_cache(monkeypatch):
    relu_function()                                                                # in the cache now
    monkeypatch.setitem(cpuops.C, 'bias_relu', cpuops.C['bias_relu'] + '\nthis is no C;\n')
    held = getattr(compilelock.get_lock, 'n_lock', 0)
    try:
        with pytest.raises(Exception, match='Compilation failed'):
            relu_function()
    finally:        # Theano 1.0.5 keeps its compile lock after a failed compile (no `finally` there)
        while getattr(compilelock.get_lock, 'n_lock', 0) > held:
            compilelock.release_lock()


def test_an_edited_c_file_runs_and_a_broken_one_fails_the_next_run(tmp_path):
    """The scripts in a copy of the project, one compile folder: the published ReLU, then
    engine/c/bias_relu.c edited (negative values times 0.5: other rows), then broken (the run
    fails, naming the compile error), each in a new process, as a user who edits the file."""
    project = tmp_path / 'project'
    shutil.copytree(os.path.join(ROOT, 'engine'), project / 'engine', ignore=shutil.ignore_patterns('__pycache__'))
    for script in ('mnist_mlp.py', 'mnist.py', 'nnet.py'):
        shutil.copy(os.path.join(ROOT, script), project)
    make_mnist(str(tmp_path))
    kernel = project / 'engine' / 'c' / 'bias_relu.c'
    published = kernel.read_text()

    def rows():
        done = subprocess.run([sys.executable, 'mnist_mlp.py', '--nepoch=1', '--H1=20', '--H2=None', '--datadir=%s' % tmp_path,
                               '--outdir=%s' % (tmp_path / 'runs')], cwd=project, capture_output=True, text=True, timeout=600)
        return done.returncode, re.findall(r'^\d+ \| .*(?= \| [\d.]+ s$)', done.stdout, re.M), done.stderr

    code, first, _ = rows()
    assert code == 0 and len(first) == 2
    kernel.write_text(published.replace('a < 0 ? 0 : a', 'a < 0 ? 0.5f * a : a'))
    code, edited, _ = rows()
    assert code == 0 and edited[0] != first[0]
    kernel.write_text(published.replace('a < 0 ? 0 : a', 'a < 0 ? 0 : a +'))
    code, _, stderr = rows()
    assert code != 0 and 'Compilation failed' in stderr


def test_without_a_node_the_key_follows_the_c_files_too(monkeypatch):
    """Theano's cache clean-up asks for a version without a node: it must change with the C."""
    op = cpuops.BiasReLU()
    key = op.c_code_cache_version()
    monkeypatch.setitem(cpuops.C, 'bias_relu', cpuops.C['bias_relu'] + ' ')
    assert op.c_code_cache_version() != key
