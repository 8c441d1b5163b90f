"""Making Theano 1.0.5 work, and fast, on today's machine.  Every entry point imports this first.

At import, before numpy or Theano has loaded a BLAS:
  - the BLAS Theano links (blas.ldflags): the system OpenBLAS, else the one scipy's wheel
    carries (no root needed), else Theano's slow numpy fallback, with a warning;
  - the OpenBLAS kernels: a process holds up to three OpenBLAS builds (Theano's, numpy's,
    scipy's), and an older build that does not know the CPU falls back to generic or
    older kernels (numpy 1.23.5's OpenBLAS 0.3.20: Prescott on a 5th-generation Xeon,
    Zen's AVX2 kernels on an AVX-512 EPYC).  Each is asked in a subprocess what it would
    pick; if any picks less than the CPU has, OPENBLAS_CORETYPE is set for all of them;
  - the other Theano flags (floatX, openmp, allow_gc) and thread settings.
A setting the user made (THEANO_FLAGS, .theanorc, the environment) always wins.  NOTES
holds one line per decision for the log.  The rest (describing the BLAS and the device,
the GPU checks) imports Theano when called.
"""
import configparser
import ctypes
import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys

import gpustack

# ---------------------------------------------------------------- the BLAS and its kernels

SYSTEM_LIB_DIRS = ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib',
                   '/usr/local/lib']
AVX512 = {'avx512f', 'avx512dq', 'avx512cd', 'avx512bw', 'avx512vl'}   # what SkylakeX kernels use
AVX2 = {'avx2', 'fma'}                                                 # what Haswell kernels use
# OpenBLAS core names (as openblas_get_corename answers, lower-cased) by the vector width they use
KERNEL_LEVEL = {'skylakex': 2, 'cooperlake': 2, 'sapphirerapids': 2, 'haswell': 1, 'zen': 1}
LEVEL_CORETYPE = {2: 'SkylakeX', 1: 'Haswell'}
LEVEL_NAME = {2: 'AVX-512', 1: 'AVX2', 0: 'generic'}


def cpu_flags(cpuinfo='/proc/cpuinfo'):
    """The CPU's feature flags (an empty set where /proc/cpuinfo has none, e.g. on ARM)."""
    try:
        with open(cpuinfo) as f:
            m = re.search(r'^flags\s*:(.*)$', f.read(), re.M)
    except OSError:
        return set()
    return set(m.group(1).split()) if m else set()


def cpu_level(flags, arch=None):
    """2 for AVX-512, 1 for AVX2 + FMA, 0 otherwise and on anything not x86-64."""
    if (arch or platform.machine()).lower() not in ('x86_64', 'amd64'):
        return 0
    return 2 if AVX512 <= flags else 1 if AVX2 <= flags else 0


def choose_coretype(flags, detected, environ, arch=None):
    """The OPENBLAS_CORETYPE to set, or None, and why.

    detected: {library: core name it picks when left alone}.  The user's own
    OPENBLAS_CORETYPE wins; a non-x86 or pre-AVX2 CPU is left alone; otherwise, if any
    library picks kernels of less than the CPU's level, all are set to the CPU's level.
    """
    if environ.get('OPENBLAS_CORETYPE'):
        return None, 'OPENBLAS_CORETYPE=%s, set by you' % environ['OPENBLAS_CORETYPE']
    level = cpu_level(flags, arch)
    if level == 0:
        return None, 'as OpenBLAS picks them (this CPU has no AVX2)'
    behind = sorted(lib for lib, core in detected.items() if KERNEL_LEVEL.get(core.lower(), 0) < level)
    if not behind:
        return None, 'as OpenBLAS picks them (%s, fit for this %s CPU)' % (
            ', '.join(sorted(set(detected.values()))) or 'none found', LEVEL_NAME[level])
    why = 'OPENBLAS_CORETYPE=%s for every OpenBLAS: left alone, %s would run %s kernels on this %s CPU'
    return LEVEL_CORETYPE[level], why % (LEVEL_CORETYPE[level], ' and '.join(behind),
                                         '/'.join(sorted({detected[lib] for lib in behind})), LEVEL_NAME[level])


def linkable_openblas(ldflags=''):
    """Path of the libopenblas.so that `-lopenblas` links (the -dev package), or None.

    Searched in g++'s order: the -L folders in ldflags, LIBRARY_PATH, the system folders.
    """
    for d in (re.findall(r'-L\s*(\S+)', ldflags) + os.environ.get('LIBRARY_PATH', '').split(os.pathsep)
              + SYSTEM_LIB_DIRS):
        found = glob.glob(os.path.join(d, 'libopenblas.so')) if d else []
        if found:
            return found[0]
    return None


def wheel_openblas(package):
    """The OpenBLAS that a package's wheel carries (numpy.libs/, scipy.libs/), found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(glob.glob(os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]),
                                          package + '.libs', 'libopenblas*.so')))
    return found[0] if found else None


def load_openblas(path):
    """dlopen an OpenBLAS (its wheel's own libgfortran first, which it needs but cannot find alone).

    RTLD_LOCAL: loaded globally, its symbols (gotoblas, the kernel table) would take the place
    of those of every OpenBLAS loaded after it."""
    folder = os.path.dirname(path)
    for dep in sorted(glob.glob(os.path.join(folder, 'libquadmath*'))) + sorted(
            glob.glob(os.path.join(folder, 'libgfortran*'))):
        ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)


def openblas_answers(lib):
    """(version, core name) of a loaded OpenBLAS; numpy's ILP64 build suffixes its symbols 64_."""
    for suffix in ('', '64_'):
        get_config = getattr(lib, 'openblas_get_config' + suffix, None)
        get_corename = getattr(lib, 'openblas_get_corename' + suffix, None)
        if get_config and get_corename:
            get_config.restype = get_corename.restype = ctypes.c_char_p
            config = get_config().decode().split()
            return (config[1] if len(config) > 1 else '?'), get_corename().decode()
    return '?', '?'


def probe_openblas(libraries):
    """{name: (version, core)} each OpenBLAS picks on its own, asked in a subprocess (a loaded
    library keeps its kernels, so this process must not load them before deciding)."""
    if not libraries:
        return {}
    env = dict(os.environ, OPENBLAS_NUM_THREADS='1', MACHINE_PROBE='1')   # the probe skips set_up
    env.pop('OPENBLAS_CORETYPE', None)
    code = ('import json, sys, machine; print(json.dumps({name: machine.openblas_answers('
            'machine.load_openblas(path)) for name, path in json.loads(sys.argv[1]).items()}))')
    try:
        out = subprocess.run([sys.executable, '-c', code, json.dumps(libraries)], env=env, timeout=60,
                             capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        return {name: tuple(answer) for name, answer in json.loads(out.stdout).items()}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}


# ---------------------------------------------------------------- Theano's flags, threads, malloc

def user_flags():
    """The Theano flags the user set, as {name: value}, from THEANO_FLAGS and .theanorc files."""
    flags = {}
    rc = os.environ.get('THEANORC', '~/.theanorc:~/.theanorc.txt')
    parser = configparser.ConfigParser()
    parser.read([os.path.expanduser(p) for p in rc.split(os.pathsep) if p])
    for section in parser.sections():
        for key, value in parser.items(section):
            flags[key if section == 'global' else section + '.' + key] = value
    splitter = shlex.shlex(os.environ.get('THEANO_FLAGS', ''), posix=True)   # as Theano splits them
    splitter.whitespace, splitter.whitespace_split = ',', True
    for item in splitter:
        if '=' in item:
            key, value = item.split('=', 1)
            flags[key.strip()] = value.strip()
    return flags


def choose_ldflags():
    """(blas.ldflags, note): the system OpenBLAS, else scipy's wheel's, else the numpy fallback."""
    system = linkable_openblas()
    if system:
        return '-lopenblas', 'blas.ldflags=-lopenblas (%s, chosen automatically)' % system
    wheel = wheel_openblas('scipy')
    if wheel:
        load_openblas(wheel)     # so that Theano's compiled modules find it by its soname
        name = os.path.basename(wheel)[3:-3]
        return ('-L%s -l%s' % (os.path.dirname(wheel), name),
                "blas.ldflags: scipy's OpenBLAS (%s; no system libopenblas-dev)" % wheel)
    return '', ('WARNING: no OpenBLAS found, Theano uses its slow numpy fallback for BLAS: '
                'pip install scipy, or apt-get install libopenblas-dev, or set blas.ldflags')


def relocated_python():
    """(include folder, libpython folder) when this Python runs away from where it was built for
    (setup.sh's private copy of Debian's python3.11), else None.  Theano compiles against
    sysconfig's INCLUDEPY and links -lpython3.11 from its LIBDIR, both absolute paths."""
    import sysconfig
    include, libdir = sysconfig.get_config_var('INCLUDEPY'), sysconfig.get_config_var('LIBDIR')
    built_for = sysconfig.get_config_var('prefix') or '/usr'
    if not include or os.path.exists(os.path.join(include, 'Python.h')) or not libdir:
        return None
    moved = [os.path.join(sys.base_prefix, os.path.relpath(path, built_for)) for path in (include, libdir)]
    return tuple(moved) if os.path.exists(os.path.join(moved[0], 'Python.h')) else None


MALLOC_SETTINGS = ('MALLOC_MMAP_MAX_', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'GLIBC_TUNABLES')


def malloc_is_ours():
    """glibc's malloc, and the user set none of its tunables."""
    return platform.libc_ver()[0] == 'glibc' and not set(MALLOC_SETTINGS) & set(os.environ)


def keep_freed_memory():
    """Make glibc's malloc serve big buffers from its heap and keep what is freed there.

    Some of Theano's C ops allocate their output afresh on every call, whatever allow_gc says
    (MaxPoolGrad always does: it compares the output's first dimension with its rank).
    glibc serves blocks over 32 MB with mmap and returns them with munmap: every training
    step then faults in fresh zeroed pages and interrupts the other cores to flush their
    TLBs.  With 256 filters (80 MB pooling gradients) a step took 222 ms, more than half of
    the CPU time in the kernel; with mmap off and no trimming, 89 ms.  Called by Trainer
    once the data sit in their shared matrix: that one big block is faster to make with
    mmap (0.07 s against 0.8-1.6 s for 737 MB from the heap, page by page).
    """
    if malloc_is_ours():
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


SET_BY_US = 'NNET_MACHINE_SET'      # {variable: [the user's value or None, ours]}, for child processes
OURS = ('OPENBLAS_CORETYPE', 'GOMP_SPINCOUNT', 'OPENBLAS_THREAD_TIMEOUT', 'THEANO_FLAGS')


def undo_inherited(environ):
    """A child of a set-up process (sweep.py's runs, a benchmark's sides) inherits our settings as
    if the user had made them: give back the user's own values, where the parent's are unchanged."""
    try:
        inherited = json.loads(environ.pop(SET_BY_US, '{}'))
    except ValueError:
        return
    for name, (users, ours) in inherited.items():
        if environ.get(name) == ours:
            if users is None:
                environ.pop(name, None)
            else:
                environ[name] = users


def set_up(environ=os.environ):
    """Fill in what the user has not set; returns (notes for the log, what each OpenBLAS picks alone).

    - blas.ldflags: Theano reads numpy's BLAS description, which current numpy wheels
      no longer carry, and fails at import.  See choose_ldflags.
    - OPENBLAS_CORETYPE: see choose_coretype.
    - floatX=float32: what GPUs compute in, and twice as fast as float64 on the CPU.
    - openmp=True: Theano's C ops (convolution, pooling, elementwise) then use all cores,
      and GOMP_SPINCOUNT=10000 (unless set): after each parallel op, OpenMP's idle threads
      spin for a while and steal the cores that OpenBLAS's threads need for the next dot
      product: a default training step took 19-25 ms with both threaded as is, about 9 ms
      this way on 2 cores, and it beat OPENBLAS_NUM_THREADS=1 too (RESULTS.md).
      The other way round, OPENBLAS_THREAD_TIMEOUT=4 (unless set): OpenBLAS's idle threads
      otherwise spin for 2^28 cycles (~0.1 s, i.e. all the time) after each call, taking a
      core from the pooling and elementwise ops; measured: 64 filters with overlapping
      pooling 51-55 s an epoch before, 21-22 s with both settings and allow_gc=False.
    - allow_gc=False: keep each op's output buffer from one call to the next instead of
      freeing and reallocating it (tens of MB a step, fresh pages from the kernel every
      time): the overlapping-pool network trained at 29 s an epoch instead of 51-55 s.
    """
    undo_inherited(environ)
    users = {name: environ.get(name) for name in OURS}
    user = user_flags()
    added, notes = [], []
    libraries = {'the system': linkable_openblas(user.get('blas.ldflags', '')),
                 "numpy's": wheel_openblas('numpy'), "scipy's": wheel_openblas('scipy')}
    alone = {} if environ.get('OPENBLAS_CORETYPE') else probe_openblas(
        {name: path for name, path in libraries.items() if path})
    coretype, why = choose_coretype(cpu_flags(), {name: core for name, (_, core) in alone.items()}, environ)
    if coretype:
        environ['OPENBLAS_CORETYPE'] = coretype     # read by each OpenBLAS as it loads
    notes.append('OpenBLAS kernels: ' + why)

    ldflags = user.get('blas.ldflags')
    if ldflags is None:
        ldflags, note = choose_ldflags()
        added.append('blas.ldflags=' + ldflags)
        notes.append(note)
    relocated = relocated_python()
    if relocated and 'gcc.cxxflags' not in user:     # a comma in a flag's value is escaped for Theano
        include, libdir = relocated
        added.append('gcc.cxxflags=-I%s -L%s -Wl\\,-rpath\\,%s' % (include, libdir, libdir))
        notes.append('gcc.cxxflags: -I %s, -L and -rpath %s (this Python lives in %s, not where it '
                     'was built to live)' % (include, libdir, sys.base_prefix))
    gpu = gpustack.folder()
    if gpu and user.get('device', '').startswith(('cuda', 'gpu')):
        gpustack.restart_with_cuda_libraries(gpu, environ)
    if gpu:
        gpustack.use(gpu, environ)
        notes.append('GPU back end: libgpuarray and its headers from %s' % gpu)
        if 'dnn.enabled' not in user:   # cuDNN 8 and 9 removed calls that Theano 1.0.5 makes
            added.append('dnn.enabled=False')
    if 'floatX' not in user:
        added.append('floatX=float32')
    if 'allow_gc' not in user:
        added.append('allow_gc=False')
    openmp = user.get('openmp', 'True' if ldflags.strip() else 'False').lower() in ('true', '1')
    if 'openmp' not in user:
        if openmp:
            added.append('openmp=True')
        else:   # the numpy fallback calls into Python from CorrMM's OpenMP threads: fatal
            notes.append('openmp stays off: the numpy BLAS fallback cannot run in OpenMP threads')
    if openmp and not ({'GOMP_SPINCOUNT', 'OMP_WAIT_POLICY'} & set(environ)):
        environ['GOMP_SPINCOUNT'] = '10000'      # read when Theano first loads libgomp
        notes.append('GOMP_SPINCOUNT=10000 (idle OpenMP threads leave the cores to OpenBLAS sooner)')
    if openmp and 'OPENBLAS_THREAD_TIMEOUT' not in environ:
        environ['OPENBLAS_THREAD_TIMEOUT'] = '4'  # read when each OpenBLAS loads
        notes.append('OPENBLAS_THREAD_TIMEOUT=4 (idle OpenBLAS threads sleep at once, '
                     'leaving the cores to the OpenMP ops)')
    if added:
        environ['THEANO_FLAGS'] = ','.join(filter(None, [environ.get('THEANO_FLAGS', '')] + added))
    environ[SET_BY_US] = json.dumps({name: [users[name], environ.get(name)] for name in OURS
                                     if environ.get(name) != users[name]})
    if malloc_is_ours():
        notes.append('malloc: once the data are in place, mmap off and trim at 1 GiB '
                     '(buffers freed by Theano ops are reused, not unmapped)')
    return notes, alone


NOTES, OPENBLAS_ALONE = ([], {}) if os.environ.get('MACHINE_PROBE') else set_up()


# ---------------------------------------------------------------- describing what runs

def loaded_openblas():
    """{path: (version, core)} of every OpenBLAS this process has loaded, as they answer now."""
    try:
        with open('/proc/self/maps') as f:
            paths = sorted(set(re.findall(r'(/\S*libopenblas[^/\s]*\.so[^/\s]*)$', f.read(), re.M)))
    except OSError:
        return {}
    return {path: openblas_answers(ctypes.CDLL(path)) for path in paths}


def library_label(path):
    """Whose OpenBLAS a path is: numpy's, scipy's (their wheels' copies) or the system's."""
    for package in ('numpy', 'scipy'):
        if '/%s.libs/' % package in path:
            return package + "'s"
    return 'system'


def blas_description():
    """One line: Theano's BLAS flags, then every OpenBLAS in the process with its version and kernels."""
    import theano
    flags = theano.config.blas.ldflags
    linked = linkable_openblas(flags)
    if linked:                      # loaded now rather than with the first compiled BLAS op
        load_openblas(linked)
    loaded = ', '.join('%s %s %s' % (library_label(path), version, core)
                       for path, (version, core) in loaded_openblas().items())
    forced = os.environ.get('OPENBLAS_CORETYPE')
    return "%s; OpenBLAS kernels: %s%s" % (flags or "numpy C-API fallback (blas.ldflags='')", loaded or 'none loaded',
                                          ' (OPENBLAS_CORETYPE=%s)' % forced if forced else '')


def floatX():
    import theano
    return theano.config.floatX


def gpu_asked():
    """THEANO_FLAGS ask for a GPU (device=cuda...; Theano's old back end said gpu...)."""
    import theano
    return theano.config.device.startswith(('cuda', 'gpu'))


def device_description():
    import theano
    device = theano.config.device
    if gpu_asked():
        try:
            from theano.gpuarray.type import get_context
            return '%s (%s)' % (get_context(None).devname, device)
        except Exception:
            return device + ' (not initialised)'
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = re.search(r'model name\s*:\s*(.*)', f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return 'cpu: %s, %d cores' % (model, os.cpu_count())


def require_gpu_if_asked(gpu_ops=None):
    """Theano falls back to the CPU silently when the GPU cannot start: refuse to run mislabelled.

    Drivers call it before loading data (did the GPU back end start?) and again with the
    GPU ops of the compiled training function (does it run on the GPU?).
    """
    if not gpu_asked():
        return
    import theano
    import theano.gpuarray
    if not theano.gpuarray.pygpu_activated:
        try:
            import pygpu  # noqa: F401
            cause = 'the GPU did not initialise (see the ERROR line above: driver, libcuda, nvrtc)'
        except ImportError as e:
            cause = 'pygpu is not installed (%s): install libgpuarray/pygpu, see the README' % e
    elif gpu_ops is not None and not gpu_ops:
        cause = 'the compiled training function has no GPU op'
    else:
        return
    sys.exit('error: THEANO_FLAGS asks for %s, but %s' % (theano.config.device, cause))
