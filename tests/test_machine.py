"""engine/machine.py: the BLAS and its kernels, Theano's flags and thread settings, never over the user's."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from engine import gpustack, machine, openblas
from conftest import ROOT, make_mnist, theano_flags, venv_beside

AVX512_CPU = {'sse2', 'avx', 'avx2', 'fma', 'avx512f', 'avx512dq', 'avx512cd', 'avx512bw', 'avx512vl'}
AVX2_CPU = {'sse2', 'avx', 'avx2', 'fma'}


def python(code, **environ):
    """Run code in a fresh Python in the project folder; returns its last line of output, parsed as JSON."""
    env = dict(os.environ, **environ)
    if 'OPENBLAS_CORETYPE' not in environ:
        env.pop('OPENBLAS_CORETYPE', None)
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('flags, detected, environ, arch, expected', [
    # a generic fallback on an AVX-512 CPU (numpy's 0.3.20 on a 5th-generation Xeon)
    (AVX512_CPU, {"numpy's": 'Prescott', 'the system': 'Prescott'}, {}, 'x86_64', 'SkylakeX'),
    # AVX2 kernels on an AVX-512 CPU (numpy's 0.3.20 on a Zen 4 EPYC), one library right
    (AVX512_CPU, {"numpy's": 'Zen', 'the system': 'Cooperlake'}, {}, 'x86_64', 'SkylakeX'),
    # a generic fallback on an AVX2 CPU
    (AVX2_CPU, {"numpy's": 'Prescott', "scipy's": 'Haswell'}, {}, 'x86_64', 'Haswell'),
    # correct detections are left alone
    (AVX512_CPU, {"numpy's": 'SkylakeX', 'the system': 'Cooperlake'}, {}, 'x86_64', None),
    (AVX2_CPU, {"numpy's": 'Zen', 'the system': 'Haswell'}, {}, 'x86_64', None),
    # the user's own setting wins, even a generic one
    (AVX512_CPU, {"numpy's": 'Prescott'}, {'OPENBLAS_CORETYPE': 'Prescott'}, 'x86_64', None),
    # nothing better to choose: no AVX2, or not x86 at all
    ({'sse2', 'avx'}, {"numpy's": 'Sandybridge'}, {}, 'x86_64', None),
    (set(), {"numpy's": 'ARMV8'}, {}, 'aarch64', None),
    (AVX512_CPU, {"numpy's": 'NEOVERSEN1'}, {}, 'aarch64', None),
])
def test_kernel_choice(flags, detected, environ, arch, expected):
    coretype, why = openblas.choose_coretype(flags, detected, environ, arch)
    assert coretype == expected
    if expected:                        # the log names the libraries that fell behind, and only those
        level = openblas.cpu_level(flags, arch)
        assert expected in why
        for lib, core in detected.items():
            assert (lib in why) == (openblas.KERNEL_LEVEL.get(core.lower(), 0) < level)
    elif environ:
        assert 'set by you' in why
    elif openblas.cpu_level(flags, arch) == 0:      # nothing better to choose, and why
        assert ('has no AVX2' if arch == 'x86_64' else 'not an x86 CPU') in why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f\nbugs\t\t: none\n')
    assert openblas.cpu_flags(str(cpuinfo)) == {'fpu', 'sse2', 'avx2', 'fma', 'avx512f'}
    assert openblas.cpu_flags(str(tmp_path / 'none')) == set()


def numpy_kernels_code(also=''):
    return ('import json; from engine import machine%s, openblas; machine.set_up(); import numpy; numpy.dot(numpy.ones((64, 64)), numpy.ones((64, 64))); '
            'print(json.dumps({openblas.library_label(p): core for p, (v, core) in openblas.loaded().items()}))'
            % also)


@pytest.mark.skipif(openblas.in_wheel('numpy') is None, reason="numpy's wheel carries no OpenBLAS here")
def test_numpy_runs_the_chosen_kernels_and_the_probe_tells_the_truth():
    alone = python('import json, numpy; from engine import openblas; print(json.dumps(openblas.loaded() and '
                   '{openblas.library_label(p): core for p, (v, core) in openblas.loaded().items()}))')
    # (numpy loaded before any choice is made: no set-up)
    assert machine.OPENBLAS_ALONE.get("numpy's", (None, alone["numpy's"]))[1] == alone["numpy's"]
    chosen = python(numpy_kernels_code())
    level = openblas.cpu_level(openblas.cpu_flags())
    assert openblas.KERNEL_LEVEL.get(chosen["numpy's"].lower(), 0) >= level
    if os.environ.get('OPENBLAS_CORETYPE') is None and machine.NOTES[0].startswith('OpenBLAS kernels: OPENBLAS'):
        assert chosen["numpy's"] == openblas.LEVEL_CORETYPE[level]
    assert python(numpy_kernels_code(), OPENBLAS_CORETYPE='Prescott')["numpy's"] == 'Prescott'   # the user's


@pytest.mark.skipif(openblas.in_wheel('scipy') is None, reason="scipy's wheel carries no OpenBLAS here")
def test_without_a_system_openblas_theano_links_scipys_and_computes_right():
    code = ('import json; from engine import machine, openblas; '
            'openblas.SYSTEM_LIB_DIRS[:] = []; notes = machine.set_up(); '
            'import numpy as np, theano, theano.tensor as T; a, b = T.matrices("a", "b"); '
            'f = theano.function([a, b], T.dot(a, b)); x = np.random.RandomState(0).rand(300, 200).astype("float32"); '
            'ops = [type(n.op).__name__ for n in f.maker.fgraph.toposort()]; '
            'err = float(abs(f(x, x.T) - x.astype("f8") @ x.T.astype("f8")).max()); '
            'print(json.dumps([theano.config.blas.ldflags, ops, err, notes]))')
    ldflags, ops, err, notes = python(code, THEANO_FLAGS=theano_flags(), THEANORC='/nonexistent', LIBRARY_PATH='')
    assert os.path.realpath(ldflags.split()[0][2:]).endswith('/scipy.libs')     # a link where the path has spaces
    assert ops == ['Dot22'] and err < 1e-3
    assert any("scipy's OpenBLAS" in n for n in notes)


def test_linkable_openblas_is_searched_in_the_linkers_order(tmp_path, monkeypatch):
    first, second = tmp_path / 'first', tmp_path / 'second'
    for d in (first, second):
        d.mkdir()
        (d / 'libopenblas.so').write_bytes(b'')
    monkeypatch.setenv('LIBRARY_PATH', str(second))
    assert openblas.linkable() == str(second / 'libopenblas.so')         # before the system's
    assert openblas.linkable('-L%s -lopenblas' % first) == str(first / 'libopenblas.so')


def test_theano_flags_fill_in_only_what_the_user_left_unset():
    probe = ('import json, os; from engine import machine; machine.set_up(); import theano; c = theano.config; '
             'print(json.dumps([c.blas.ldflags, c.floatX, c.openmp, c.allow_gc, '
             'os.environ.get("OPENBLAS_THREAD_TIMEOUT"), machine.NOTES]))')

    def config(flags, **environ):
        env = dict(os.environ, THEANO_FLAGS=theano_flags(flags), THEANORC='/nonexistent', **environ)
        for name in ('GOMP_SPINCOUNT', 'OPENBLAS_THREAD_TIMEOUT') + machine.MALLOC_SETTINGS:
            if name not in environ:
                env.pop(name, None)
        out = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    ldflags, floatX, openmp, allow_gc, timeout, notes = config('')
    assert ldflags == ('-lopenblas' if openblas.linkable() else machine.choose_ldflags()[0])
    assert floatX == 'float32' and openmp == bool(ldflags) and notes and allow_gc is False
    assert timeout == ('4' if openmp else None)
    if openmp:
        assert config('', OPENBLAS_THREAD_TIMEOUT='20')[4] == '20'
    glibc = platform.libc_ver()[0] == 'glibc'
    assert any(n.startswith('malloc: once the data') for n in notes) == glibc
    assert not any(n.startswith('malloc') for n in config('', MALLOC_MMAP_MAX_='65536')[-1])
    ldflags, floatX, openmp, allow_gc, timeout, notes = config('floatX=float64,blas.ldflags=,allow_gc=True')
    assert (ldflags, floatX, openmp, allow_gc) == ('', 'float64', False, True)  # the user's flags win
    assert timeout is None
    assert any('openmp stays off' in n for n in notes)


@pytest.mark.parametrize('python, numpy, theano, expected', [
    ((3, 11, 7), '1.23.5', '1.0.5', []),
    ((3, 8, 0), '', '1.0.5', []),                   # a numpy without metadata is not judged
    ((3, 12, 1), '1.23.5', '1.0.5', ['Python 3.12, and Theano 1.0.5 runs on 3.8-3.11']),
    ((3, 7, 9), '1.21.6', '1.0.5', ['Python 3.7, and Theano 1.0.5 runs on 3.8-3.11']),
    ((3, 11, 2), '1.24.0', '1.0.5', ['numpy 1.24.0, and Theano 1.0.5 needs numpy < 1.24']),
    ((3, 11, 2), '2.0.0rc1', None, ['numpy 2.0.0rc1, and Theano 1.0.5 needs numpy < 1.24', 'no Theano']),
    ((3, 13, 0), None, None, ['Python 3.13, and Theano 1.0.5 runs on 3.8-3.11', 'no numpy', 'no Theano']),
])
def test_what_keeps_a_python_from_running_theano_is_named(python, numpy, theano, expected):
    assert machine.theano_python_problems(python, numpy, theano) == expected


def test_a_python_without_theano_stops_with_the_remedy_in_one_line(tmp_path):
    """`python cifar10_convnet.py` with a Python that lacks Theano (here .venv's without its
    site-packages, -S) gave an ImportError's traceback; run from another folder, as users do."""
    for script in ('cifar10_convnet.py', 'mnist_mlp.py'):
        out = subprocess.run([sys.executable, '-S', os.path.join(ROOT, script), '--nepoch=0'], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and out.stdout == '' and out.stderr.count('\n') == 1
        assert out.stderr.startswith('error: %s cannot run the scripts (no numpy; no Theano): ' % sys.executable)
        assert 'setup.sh' in out.stderr


def test_no_cpp_compiler_stops_before_any_work_with_the_remedy(tmp_path):
    """Without g++ Theano warned, fell back to Python code, and the run died at its first minibatch."""
    make_mnist(str(tmp_path), ntrain=600, ntest=100)    # never a download, whatever happens
    for environ, expected in (
            (dict(THEANO_FLAGS=theano_flags('cxx=')), 'error: THEANO_FLAGS or .theanorc set cxx=, which turns it off: '),
            (dict(THEANO_FLAGS=theano_flags('cxx=/nonexistent/g++')),
             'error: THEANO_FLAGS or .theanorc set cxx=/nonexistent/g++, which is not found: '),
            (dict(PATH=str(tmp_path), THEANO_FLAGS=theano_flags()),     # no g++ on the PATH, none named
             "error: no C++ compiler (g++): Theano compiles the scripts' ops as C++; "
             "install it: sudo apt-get install g++ (bash setup.sh does, as root)\n")):
        out = subprocess.run([sys.executable, 'mnist_mlp.py', '--nepoch=0', '--datadir=%s' % tmp_path,
                              '--outdir=%s' % (tmp_path / 'out')], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, THEANORC='/nonexistent', **environ))
        assert out.returncode == 1 and out.stdout == '' and out.stderr.startswith(expected), out.stderr


def test_an_unwritable_home_gets_theano_a_compiledir_in_the_temporary_folder(tmp_path, monkeypatch):
    """Theano 1.0.5 dies at import when ~/.theano cannot be made (a HOME that is a file, read-only or
    gone: containers, batch jobs); a folder in the temporary folder serves, named in the log."""
    monkeypatch.setattr(machine.tempfile, 'tempdir', str(tmp_path / 'tmp'))
    home_file = tmp_path / 'home'
    home_file.write_text('')
    assert machine.choose_compiledir({'HOME': str(tmp_path)}) == (None, None)
    assert machine.choose_compiledir({'HOME': str(tmp_path / 'new' / 'home')}) == (None, None)   # can be made
    compiledir, note = machine.choose_compiledir({'HOME': str(home_file)})
    assert compiledir == str(tmp_path / 'tmp' / ('theano-%d' % os.getuid()))
    assert note.startswith('base_compiledir=%s (%s/.theano cannot be written' % (compiledir, home_file))
    flags, notes = python('import json, os; from engine import machine; machine.set_up(); print(json.dumps([os.environ["THEANO_FLAGS"], machine.NOTES]))',
                          HOME=str(home_file), THEANORC='/nonexistent', THEANO_FLAGS='', TMPDIR=str(tmp_path))
    assert 'base_compiledir=%s/theano-%d' % (tmp_path, os.getuid()) in flags.split(',')
    assert any(n.startswith('base_compiledir=') for n in notes)
    flags, notes = python('import json, os; from engine import machine; machine.set_up(); print(json.dumps([os.environ["THEANO_FLAGS"], machine.NOTES]))',
                          HOME=str(home_file), THEANORC='/nonexistent', THEANO_FLAGS='compiledir=%s' % (tmp_path / 'x'))
    assert 'base_compiledir' not in flags                           # the user's own setting wins


def test_folders_with_spaces_reach_theanos_flags_through_links(tmp_path, monkeypatch):
    """Theano splits blas.ldflags and gcc.cxxflags at spaces: "My Projects/" lost its folders."""
    monkeypatch.setattr(machine.tempfile, 'tempdir', str(tmp_path / 'tmp'))
    folder = tmp_path / 'My Projects' / 'lib'
    folder.mkdir(parents=True)
    link = machine.without_spaces(str(folder))
    assert ' ' not in link and os.path.realpath(link) == os.path.realpath(folder)
    assert machine.without_spaces(str(folder)) == link                  # the same link again
    other = tmp_path / 'Other Projects'
    other.mkdir()
    assert os.path.realpath(machine.without_spaces(str(other))) == os.path.realpath(other)
    assert machine.without_spaces(str(tmp_path)) == str(tmp_path)       # no spaces: as it is


def test_the_old_gpu_back_ends_flag_stops_with_the_new_one_named(tmp_path):
    """The 2015 post ran device=gpu; Theano 1.0.5 dies at import on it with a traceback."""
    theanorc = tmp_path / 'theanorc'
    theanorc.write_text('[global]\ndevice = gpu0\n')
    for environ, flag, remedy in ((dict(THEANO_FLAGS='floatX=float32,device=gpu', THEANORC='/nonexistent'),
                                   'device=gpu', 'use device=cuda '),
                                  (dict(THEANORC=str(theanorc)), 'device=gpu0', 'use device=cuda0 '),
                                  (dict(THEANO_FLAGS='init_gpu_device=gpu1', THEANORC='/nonexistent'),
                                   'init_gpu_device=gpu1', 'use init_gpu_device=cuda1 ')):
        out = subprocess.run([sys.executable, 'mnist_mlp.py', '--nepoch=0'], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=dict(os.environ, **environ))
        assert out.returncode == 1 and 'Traceback' not in out.stderr and out.stdout == ''
        assert out.stderr.startswith('error: %s (THEANO_FLAGS or .theanorc) is Theano\'s old GPU back end' % flag)
        assert remedy in out.stderr


def test_a_child_process_decides_again_and_keeps_what_its_caller_changed():
    """sweep.py's runs and the benchmarks' sides inherit this process's settings: they are not the user's."""
    code = 'import json; from engine import machine; print(json.dumps(machine.set_up()))'

    def child_notes(**changes):
        out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, **changes))
        return json.loads(out.stdout.strip().splitlines()[-1])
    assert machine.SET_BY_US in os.environ
    assert child_notes() == machine.NOTES
    assert child_notes(OPENBLAS_CORETYPE='Prescott')[0] == 'OpenBLAS kernels: OPENBLAS_CORETYPE=Prescott, set by you'


def test_cuda_libraries_get_the_unversioned_names_libgpuarray_opens(tmp_path):
    driver, toolkit, wheel = tmp_path / 'driver', tmp_path / 'cuda-13' / 'lib64', tmp_path / 'nvidia' / 'cu13' / 'lib'
    for folder, files in ((driver, ['libcuda.so.1', 'libnvidia-ml.so.1']), (toolkit, ['libnvrtc.so.12']),
                          (wheel, ['libnvrtc.so.13', 'libnvrtc-builtins.so.13.0', 'libcublas.so.13',
                                   'libcublasLt.so.13', 'libcufft.so.12'])):
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_bytes(b'')
    found = gpustack.find_cuda_libraries([str(driver), str(wheel), str(toolkit)])
    assert found == {'libcuda.so': str(driver / 'libcuda.so.1'), 'libnvrtc.so': str(wheel / 'libnvrtc.so.13'),
                     'libcublas.so': str(wheel / 'libcublas.so.13')}
    assert gpustack.find_cuda_libraries([str(toolkit), str(wheel)])['libnvrtc.so'] == str(toolkit / 'libnvrtc.so.12')
    links = tmp_path / 'links'
    gpustack.link_cuda_libraries(str(links), found)
    assert sorted(os.listdir(links)) == ['libcublas.so', 'libcublas.so.13', 'libcublasLt.so.13', 'libcuda.so',
                                         'libnvrtc-builtins.so.13.0', 'libnvrtc.so', 'libnvrtc.so.13']
    assert os.readlink(links / 'libcublasLt.so.13') == str(wheel / 'libcublasLt.so.13')   # found from the links
    gpustack.link_cuda_libraries(str(links), dict(found, **{'libnvrtc.so': str(toolkit / 'libnvrtc.so.12')}))
    assert os.readlink(links / 'libnvrtc.so') == str(toolkit / 'libnvrtc.so.12')
    assert not (links / 'libnvrtc-builtins.so.13.0').exists()          # the earlier choice's companions go


def test_a_toolkit_the_user_names_comes_first_then_this_venvs_wheels(tmp_path):
    (tmp_path / 'lib64').mkdir()
    folders = gpustack.cuda_folders({'CUDA_HOME': str(tmp_path)})
    assert folders[0] == str(tmp_path / 'lib64')
    venv = [i for i, f in enumerate(folders) if f.startswith(os.path.join(sys.prefix, 'lib'))]
    system = [i for i, f in enumerate(folders) if f.startswith(('/usr/', '/lib'))]
    assert all(i < j for i in venv for j in system)


@pytest.mark.parametrize('driver, major', [(None, 12), ((470, 256, 2), None), ((525, 60, 13), 12),
                                           ((575, 64), 12), ((580, 65, 6), 13), ((590, 1), 13)])
def test_the_cuda_wheels_fit_the_driver(driver, major):
    """CUDA 12's libraries run on drivers from 525, CUDA 13's from 580; no driver seen: CUDA 12."""
    assert gpustack.cuda_major_for(driver) == major


def test_device_cuda_names_each_missing_piece_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(gpustack, 'driver_version', lambda: (535, 1))

    def problems():
        return gpustack.problems(gpustack.find_cuda_libraries([str(tmp_path)]))
    assert [p.split(' (')[0] for p in problems()] == ['no NVIDIA driver here', 'no NVRTC', 'no cuBLAS']
    for name in ('libcuda.so.1', 'libnvrtc.so.13', 'libcublas.so.12'):
        (tmp_path / name).write_bytes(b'')
    assert [p.split(' (')[0] for p in problems()] == ['NVRTC is CUDA 13']
    assert 'needs driver 580 or newer, and this one is 535.1' in problems()[0]


def test_libgpuarray_opens_the_driver_through_the_links_without_a_restart(tmp_path):
    """setup.sh --gpu gives libgpuarray an rpath to the venv's links: a stand-in driver library
    (no CUDA functions in it) is opened from there, and the failed start is one line."""
    pytest.importorskip('pygpu')
    found = gpustack.find_cuda_libraries(gpustack.cuda_folders())
    if not (found['libnvrtc.so'] and found['libcublas.so']):
        pytest.skip('no NVRTC or cuBLAS here (bash setup.sh --gpu installs them)')
    (tmp_path / 'lib64').mkdir()
    (tmp_path / 'stub.c').write_text('int cuDriverGetVersion(int *v) { *v = 12080; return 0; }\n')
    subprocess.run(['gcc', '-shared', '-fPIC', '-o', str(tmp_path / 'lib64' / 'libcuda.so.1'), str(tmp_path / 'stub.c')],
                   check=True)
    python = venv_beside(tmp_path / 'venv')         # its links are made there, this venv's left alone
    out = subprocess.run([python, 'mnist_mlp.py', '--datadir=%s' % tmp_path], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CUDA_HOME=str(tmp_path), THEANO_FLAGS=theano_flags('device=cuda')))
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    opened = re.search(r'(\S+/cuda-links/libcuda\.so): undefined symbol', out.stderr)
    assert opened and os.path.normpath(opened.group(1)) == str(tmp_path / 'venv' / 'cuda-links' / 'libcuda.so')
    assert "NVRTC and cuBLAS from NVIDIA's wheels in this venv" in out.stdout
    # the log names the files and the versions they report (NVRTC and cuBLAS answer without a GPU)
    stack = next(line for line in out.stdout.splitlines() if line.startswith('# GPU stack: '))
    assert 'libcuda %s (CUDA 12.8)' % (tmp_path / 'lib64' / 'libcuda.so.1') in stack
    assert re.search(r'NVRTC \S+/libnvrtc\.so\.1[23] \(1[23]\.\d+\); cuBLAS \S+/libcublas\.so\.1[23] \(1[23]\.\d+\.\d+\)$', stack)
    assert out.stderr.strip().splitlines()[-1].startswith('error: THEANO_FLAGS asks for cuda, but the GPU did not')


def test_a_pygpu_that_does_not_import_leaves_the_cpu_run_alone_and_stops_device_cuda_in_one_line(tmp_path):
    """A libgpuarray built for a newer C library than the host's: the CPU run must not notice."""
    (tmp_path / 'pygpu').mkdir()
    (tmp_path / 'pygpu' / '__init__.py').write_text(
        "raise ImportError(\"/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.33' not found\")\n")
    make_mnist(str(tmp_path), ntrain=300, ntest=50)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = [sys.executable, 'mnist_mlp.py', '--datadir=%s' % tmp_path, '--nepoch=1', '--H1=8', '--H2=None',
           '--outdir=%s' % (tmp_path / 'runs')]
    out = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(env, THEANO_FLAGS=theano_flags('device=cuda')))
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines() == ["error: THEANO_FLAGS asks for cuda, but pygpu does not import "
                                               "(/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.33' not found): "
                                               "bash setup.sh --gpu sets it up again for this host"]


def test_a_second_process_compiles_no_c_code_for_the_same_network():
    """Theano 1.0.5 keyed five of the CNN's modules so that every process built them again with
    g++ (2-3 s of each start); machine.reuse_compiled_modules lets later processes load them."""
    code = ('import json; from engine import machine; machine.set_up(); import numpy as np, convnet, nnet; from theano.gof import cmodule; built = []; '
            'compile_str = cmodule.GCC_compiler.compile_str; '
            'cmodule.GCC_compiler.compile_str = staticmethod(lambda *a, **k: built.append(1) or '
            'compile_str(*a, **k)); rng = np.random.RandomState(0); '
            'data = {s: (rng.rand(8, 75).astype("float32"), np.arange(8) % 3) for s in "LV"}; '
            'net = convnet.CNN(rng, (3, 5, 5), [(2, (3, 3), (2, 2), None)], [4], 3); '
            'nnet.Trainer(net, data, 4, 0.1, 0.9, 1e-4, input_shape=(3, 5, 5)); print(json.dumps(built))')
    python(code)                                  # fills the cache where this network is new
    assert python(code) == []


@pytest.mark.skipif(openblas.in_wheel('numpy') is None, reason="numpy's wheel carries no OpenBLAS here")
def test_the_log_line_names_each_loaded_openblas_with_its_kernels():
    line, chosen = python('import json; from engine import machine, openblas; machine.set_up(); import numpy; numpy.ones(3).dot(numpy.ones(3)); '
                          'print(json.dumps([machine.blas_description(), {openblas.library_label(p): v + " " + core '
                          'for p, (v, core) in openblas.loaded().items()}]))')
    assert "numpy's" in chosen and "numpy's %s" % chosen["numpy's"] in line


@pytest.mark.skipif(openblas.in_wheel('numpy') is None, reason="numpy's wheel carries no OpenBLAS here (Debian's "
                    "or conda's numpy): the test copies it into a folder with a space")
def test_an_openblas_in_a_folder_with_a_space_is_found_and_asked(tmp_path):
    """A checkout in "My Projects/": the log line cut the path at the space and died loading the rest."""
    wheels = openblas.in_wheel('numpy')
    folder = tmp_path / 'My Projects' / 'numpy.libs'
    shutil.copytree(os.path.dirname(wheels), folder)          # with the libgfortran it needs
    copy = folder / os.path.basename(wheels)
    found = python('import json; from engine import openblas; openblas.load(%r); print(json.dumps(openblas.loaded()))' % str(copy))
    assert found[str(copy)][0] == openblas.probe({'copy': str(copy)})['copy'][0]


def test_memory_used_names_the_gpus_memory_in_use_on_the_gpu(monkeypatch):
    import types
    pytest.importorskip('pygpu')
    import theano.gpuarray.type
    assert list(machine.memory_used()) == ['peak_resident']          # on the CPU
    monkeypatch.setattr(machine, 'gpu_asked', lambda: True)
    monkeypatch.setattr(theano.gpuarray.type, 'get_context',
                        lambda name: types.SimpleNamespace(total_gmem=141 * 2 ** 30, free_gmem=139 * 2 ** 30))
    assert machine.memory_used()['gpu_in_use'] == 2048


def test_setup_says_ready_only_when_the_venv_imports_what_it_set_up(tmp_path):
    """It said `ready` with nothing after it on a .venv whose pygpu did not import.  Run in a copy of
    the project whose .venv sees this one's packages: this .venv is left alone, and no apt-get runs."""
    project, stubs = tmp_path / 'project', tmp_path / 'bin'
    tracked = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip('not a git checkout: the project\'s files are not known')
    for name in tracked.stdout.split():
        os.makedirs(project / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), project / name)
    venv_beside(project / '.venv', pip=True)
    stubs.mkdir()
    for tool in ('apt-get', 'sudo'):
        (stubs / tool).write_text('#!/bin/sh\necho "%s: not in this test" >&2\nexit 1\n' % tool)
        (stubs / tool).chmod(0o755)
    (tmp_path / 'theano').mkdir()
    (tmp_path / 'theano' / '__init__.py').write_text('raise ImportError("libpython3.11.so.1.0: cannot open")\n')
    out = subprocess.run(['bash', 'setup.sh'], cwd=project, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path), PATH='%s:%s' % (stubs, os.environ['PATH']),
                                  PIP_NO_INDEX='1'))
    assert out.returncode == 1 and 'ready:' not in out.stdout, out.stderr
    assert out.stderr.strip().splitlines()[-1] == ('setup.sh: NOT ready: .venv/bin/python cannot do what was asked: '
                                                   'ImportError: libpython3.11.so.1.0: cannot open')


def test_set_threads_reaches_openmp_and_every_loaded_openblas():
    import ctypes
    import numpy as np
    np.dot(np.ones((300, 300)), np.ones((300, 300)))                # numpy's OpenBLAS loaded and started
    gomp = ctypes.CDLL('libgomp.so.1')

    def threads():
        counts = [gomp.omp_get_max_threads()]
        for path in openblas.loaded():
            lib = ctypes.CDLL(path)
            counts += [getattr(lib, name)() for name in ('openblas_get_num_threads', 'openblas_get_num_threads64_')
                       if hasattr(lib, name)]
        return counts
    before = threads()
    assert len(before) >= 2                                           # OpenMP and at least numpy's OpenBLAS
    try:
        machine.set_threads(1)
        assert threads() == [1] * len(before)
        machine.set_threads(3)
        assert threads() == [3] * len(before)
    finally:
        machine.set_threads(before[0])
