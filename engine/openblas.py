"""Which OpenBLAS kernels run, and the OPENBLAS_CORETYPE that makes them fit the CPU.

A process holds up to three OpenBLAS builds (the one Theano links, numpy's, scipy's), and
an older build that does not know the CPU falls back to generic or older kernels (numpy
1.23.5's OpenBLAS 0.3.20: Prescott on a 5th-generation Xeon, Zen's AVX2 kernels on an
AVX-512 EPYC).  machine.choose_settings asks each, in a subprocess, what it would pick
(probe), and choose_coretype decides: that choice is ours alone.  The libraries loaded, their
kernels and their threads are threadpoolctl's to find and set.  Nothing here imports numpy or Theano.
"""
import ctypes
import glob
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys

from . import PROJECT

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


def is_x86(arch=None):
    """Whether this machine (or arch, as platform.machine() names one) is 64-bit x86."""
    return (arch or platform.machine()).lower() in ('x86_64', 'amd64')


def cpu_level(flags, arch=None):
    """2 for AVX-512, 1 for AVX2 + FMA, 0 otherwise and on anything not x86-64."""
    if not is_x86(arch):
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
        return None, 'as OpenBLAS picks them (%s)' % ('this CPU has no AVX2' if is_x86(arch) else 'not an x86 CPU')
    behind = sorted(lib for lib, core in detected.items() if KERNEL_LEVEL.get(core.lower(), 0) < level)
    if not behind:
        return None, 'as OpenBLAS picks them (%s, fit for this %s CPU)' % (
            ', '.join(sorted(set(detected.values()))) or 'none found', LEVEL_NAME[level])
    why = 'OPENBLAS_CORETYPE=%s for every OpenBLAS: left alone, %s would run %s kernels on this %s CPU'
    return LEVEL_CORETYPE[level], why % (LEVEL_CORETYPE[level], ' and '.join(behind),
                                         '/'.join(sorted({detected[lib] for lib in behind})), LEVEL_NAME[level])


def linkable(ldflags=''):
    """Path of the libopenblas.so that `-lopenblas` links (the -dev package), or None.

    Searched in g++'s order: the -L folders in ldflags, LIBRARY_PATH, the system folders.
    """
    for d in (re.findall(r'-L\s*(\S+)', ldflags) + os.environ.get('LIBRARY_PATH', '').split(os.pathsep)
              + SYSTEM_LIB_DIRS):
        found = glob.glob(os.path.join(d, 'libopenblas.so')) if d else []
        if found:
            return found[0]
    return None


def in_wheel(package):
    """The OpenBLAS that a package's wheel carries (numpy.libs/, scipy.libs/), found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(glob.glob(os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]),
                                          package + '.libs', 'libopenblas*.so')))
    return found[0] if found else None


def load(path):
    """dlopen an OpenBLAS (its wheel's own libgfortran first, which it needs but cannot find alone).

    RTLD_LOCAL: loaded globally, its symbols (gotoblas, the kernel table) would take the place
    of those of every OpenBLAS loaded after it."""
    folder = os.path.dirname(path)
    for dep in sorted(glob.glob(os.path.join(folder, 'libquadmath*'))) + sorted(
            glob.glob(os.path.join(folder, 'libgfortran*'))):
        ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)


def answers(lib):
    """(version, core name) of a loaded OpenBLAS; numpy's ILP64 build suffixes its symbols 64_."""
    for suffix in ('', '64_'):
        get_config = getattr(lib, 'openblas_get_config' + suffix, None)
        get_corename = getattr(lib, 'openblas_get_corename' + suffix, None)
        if get_config and get_corename:
            get_config.restype = get_corename.restype = ctypes.c_char_p
            config = get_config().decode().split()
            return (config[1] if len(config) > 1 else '?'), get_corename().decode()
    return '?', '?'


def probe(libraries):
    """{name: (version, core)} each OpenBLAS picks on its own, asked in a subprocess (a loaded
    library keeps its kernels, so this process must not load them before deciding)."""
    if not libraries:
        return {}
    env = dict(os.environ, OPENBLAS_NUM_THREADS='1')
    env.pop('OPENBLAS_CORETYPE', None)
    code = ('import json, sys; from engine import openblas; print(json.dumps({name: openblas.answers('
            'openblas.load(path)) for name, path in json.loads(sys.argv[1]).items()}))')
    try:
        out = subprocess.run([sys.executable, '-c', code, json.dumps(libraries)], env=env, timeout=60,
                             capture_output=True, text=True, cwd=PROJECT)
        return {name: tuple(answer) for name, answer in json.loads(out.stdout).items()}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}


def loaded():
    """{path: (version, core)} of every OpenBLAS this process has loaded, as they answer now
    (threadpoolctl finds them), in the order of their paths."""
    from threadpoolctl import threadpool_info       # here: a Python without it still gets require_theano_python's line
    return {info['filepath']: (info['version'] or '?', info['architecture'] or '?')
            for info in sorted(threadpool_info(), key=lambda info: info['filepath'])
            if info['internal_api'] == 'openblas'}


def library_label(path):
    """Whose OpenBLAS a path is: numpy's, scipy's (their wheels' copies) or the system's."""
    for package in ('numpy', 'scipy'):
        if '/%s.libs/' % package in path:
            return package + "'s"
    return 'system'


def describe(flags):
    """One line: Theano's BLAS flags, then every OpenBLAS in the process with its version and kernels."""
    linked = linkable(flags)
    if linked:                      # loaded now rather than with the first compiled BLAS op
        load(linked)
    kernels = ', '.join('%s %s %s' % (library_label(path), version, core)
                        for path, (version, core) in loaded().items())
    forced = os.environ.get('OPENBLAS_CORETYPE')
    return "%s; OpenBLAS kernels: %s%s" % (flags or "numpy C-API fallback (blas.ldflags='')", kernels or 'none loaded',
                                          ' (OPENBLAS_CORETYPE=%s)' % forced if forced else '')
