"""Making Theano 1.0.5 work, and fast, on today's machine: set_up(), the one machine set-up.

The drivers (and the tests) call set_up() before anything else; it is made once, and
decides, before numpy or Theano has loaded a BLAS:
  - the BLAS Theano links (blas.ldflags): the system OpenBLAS, else the one scipy's wheel
    carries (no root needed), else Theano's slow numpy fallback, with a warning;
  - the OpenBLAS kernels: if any OpenBLAS in the process would pick less than the CPU has,
    OPENBLAS_CORETYPE for all of them (engine/openblas.py);
  - the other Theano flags (floatX, openmp, allow_gc) and thread settings.
A setting the user made (THEANO_FLAGS, .theanorc, the environment) always wins.  Then it
stops a Python that cannot run Theano, a machine without g++ and a flag value Theano refuses,
each with one line naming the remedy, and imports Theano: C modules compile on every core and
are reused by later processes.  NOTES holds one line per decision for the log.  The rest
(describing the BLAS and the device, the GPU checks) imports Theano when called.
Importing this module decides nothing.
"""
import configparser
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import traceback

from . import PROJECT, gpustack, openblas

# ---------------------------------------------------------------- a Python that can run Theano

THEANO_PYTHONS = ((3, 8), (3, 11))      # Theano 1.0.5's last release runs on these
NUMPY_BEFORE = (1, 24)                  # it uses np.bool, which numpy 1.24 removed


def installed_version(package):
    """The version of an importable package ('' where it has no metadata), None if it is not importable."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ''


def theano_python_problems(python, numpy, theano):
    """What keeps a Python from running the scripts: python a version tuple, numpy and theano
    installed_version()'s answers."""
    problems = []
    if not THEANO_PYTHONS[0] <= tuple(python[:2]) <= THEANO_PYTHONS[1]:
        problems.append('Python %d.%d, and Theano 1.0.5 runs on %d.%d-%d.%d' % (tuple(python[:2]) + THEANO_PYTHONS[0]
                                                                             + THEANO_PYTHONS[1]))
    if numpy is None:
        problems.append('no numpy')
    elif numpy and tuple(int(n) for n in re.findall(r'\d+', numpy)[:2]) >= NUMPY_BEFORE:
        problems.append('numpy %s, and Theano 1.0.5 needs numpy < %d.%d' % ((numpy,) + NUMPY_BEFORE))
    if theano is None:
        problems.append('no Theano')
    return problems


def require_theano_python():
    """Stop with one line that names the remedy where this Python cannot run Theano: most often a
    plain `python cifar10_convnet.py` with the host's Python instead of setup.sh's .venv."""
    problems = theano_python_problems(sys.version_info, installed_version('numpy'), installed_version('theano'))
    if not problems:
        return
    venv = os.path.join(PROJECT, '.venv')
    venv_python = os.path.join(venv, 'bin', 'python')
    shown = os.path.relpath(venv_python)
    command = shlex.join([venv_python if shown.startswith('..') else shown] + getattr(sys, 'orig_argv', sys.argv)[1:])
    if not os.path.exists(venv_python):
        remedy = 'run `bash setup.sh` once (it makes .venv, with a Python 3.11 of its own if the host has ' \
                 'none), then: ' + command
    elif os.path.abspath(sys.executable).startswith(venv + os.sep):
        remedy = '`bash setup.sh` installs what .venv lacks'
    else:
        remedy = "use the project's own Python, which setup.sh made: " + command
    sys.exit('error: %s cannot run the scripts (%s): %s' % (sys.executable, '; '.join(problems), remedy))


def require_compiler():
    """Stop with one line where Theano has no C++ compiler: it then warns and falls back to Python
    code, which our ops do not have (the run died at its first minibatch, after loading and compiling)."""
    cxx = user_flags().get('cxx', 'g++')
    if cxx and shutil.which(cxx):
        return
    if cxx == 'g++':
        sys.exit('error: no C++ compiler (g++): Theano compiles the scripts\' ops as C++; install it: '
                 'sudo apt-get install g++ (bash setup.sh does, as root)')
    sys.exit('error: THEANO_FLAGS or .theanorc set cxx=%s, %s: Theano compiles the scripts\' ops as C++; '
             'name a compiler there (g++)' % (cxx, 'which is not found' if cxx else 'which turns it off'))


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
    flags.update(flags_in(os.environ.get('THEANO_FLAGS', '')))
    return flags


def flags_in(text):
    """THEANO_FLAGS' text as {name: value}, split as Theano splits it."""
    flags = {}
    splitter = shlex.shlex(text, posix=True)
    splitter.whitespace, splitter.whitespace_split = ',', True
    for item in splitter:
        if '=' in item:
            key, value = item.split('=', 1)
            flags[key.strip()] = value.strip()
    return flags


def refuse_old_gpu_back_end(user):
    """device=gpu (the 2015 post's flag) names Theano's old GPU back end, which Theano 1.0 removed;
    Theano then dies at import with a traceback.  Stop with one line that names the new flag."""
    for name in ('device', 'init_gpu_device'):
        value = user.get(name, '')
        if value.startswith('gpu'):     # what Theano 1.0.5 refuses
            sys.exit("error: %s=%s (THEANO_FLAGS or .theanorc) is Theano's old GPU back end, removed in "
                     "Theano 1.0: use %s=cuda%s (see the README's GPU section)" % (name, value, name, value[3:]))


def require_gpu_stack(device, environ):
    """device=cuda: stop with one line where pygpu does not import or a CUDA library is missing
    (Theano would log a traceback and fall back to the CPU); else link the CUDA libraries found
    now (a toolkit in CUDA_HOME, the driver of the machine a set-up was carried to) under the
    names libgpuarray opens, and say for the log where NVRTC and cuBLAS come from."""
    def refuse(cause):
        sys.exit('error: %s asks for %s, but %s' % (flag_origin('device'), device, cause))
    if importlib.util.find_spec('pygpu') is None:
        refuse('pygpu is not installed: bash setup.sh --gpu installs it and libgpuarray')
    try:
        import pygpu  # noqa: F401
    except ImportError as e:      # a libgpuarray for another C library, or none
        refuse('pygpu does not import (%s): bash setup.sh --gpu sets it up again for this host' % e)
    found = gpustack.find_cuda_libraries(gpustack.cuda_folders(environ))
    problems = gpustack.problems(found)
    if problems:
        refuse('; '.join(problems))
    try:            # where libgpuarray's rpath leads its dlopen of the CUDA libraries
        gpustack.link_cuda_libraries(gpustack.links_folder(), found)
    except OSError:
        pass        # a venv this user cannot write: the links setup.sh --gpu made serve
    logging.getLogger('theano.gpuarray').addFilter(without_traceback)
    return gpustack.origin(found)


def without_traceback(record):
    """A log record's exception as one line after its message: a GPU that does not start is
    then explained by require_gpu_if_asked's line, not by a traceback."""
    if record.exc_info:
        record.msg, record.args = '%s: %s' % (record.getMessage(), record.exc_info[1]), ()
        record.exc_info = record.exc_text = None
    return True


def can_create(folder):
    """folder is a writable folder, or could be made as one (its nearest existing ancestor is)."""
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def choose_compiledir(environ):
    """(base_compiledir, note) where Theano's own, ~/.theano, cannot be written (a HOME that is
    read-only, missing or a file: containers, batch jobs), else (None, None).  Theano would die
    at import with a traceback; a folder of this user's in the temporary folder serves instead."""
    home = environ.get('HOME') or os.path.expanduser('~')
    if can_create(os.path.join(home, '.theano')):
        return None, None
    fallback = os.path.join(tempfile.gettempdir(), 'theano-%d' % os.getuid())
    if not can_create(fallback):
        return None, None       # Theano's own error then names ~/.theano
    return fallback, ('base_compiledir=%s (%s/.theano cannot be written; the compiled code is kept '
                      'there instead, for as long as that folder lasts)' % (fallback, home))


def without_spaces(path):
    """path, or a link to it whose path has no whitespace: Theano splits blas.ldflags and
    gcc.cxxflags at spaces, quotes or not, so a checkout in "My Projects/" lost its -L and -I
    folders.  The links live in the temporary folder and are made again when it is cleaned."""
    if not re.search(r'\s', path):
        return path
    link = os.path.join(tempfile.gettempdir(), 'theano-paths-%d' % os.getuid(),
                        hashlib.sha1(path.encode()).hexdigest()[:16])
    if re.search(r'\s', link):         # a temporary folder with spaces: nothing to be done
        return path
    if os.path.realpath(link) != os.path.realpath(path):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        made = '%s.%d' % (link, os.getpid())
        os.symlink(path, made)
        os.replace(made, link)          # whole, also for runs started side by side
    return link


def choose_ldflags():
    """(blas.ldflags, note): the system OpenBLAS, else scipy's wheel's, else the numpy fallback."""
    system = openblas.linkable()
    if system:
        return '-lopenblas', 'blas.ldflags=-lopenblas (%s, chosen automatically)' % system
    wheel = openblas.in_wheel('scipy')
    if wheel:
        openblas.load(wheel)     # so that Theano's compiled modules find it by its soname
        name = os.path.basename(wheel)[3:-3]
        return ('-L%s -l%s' % (without_spaces(os.path.dirname(wheel)), name),
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


def choose_settings(environ):
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
    refuse_old_gpu_back_end(user)
    added, notes = [], []
    libraries = {'the system': openblas.linkable(user.get('blas.ldflags', '')),
                 "numpy's": openblas.in_wheel('numpy'), "scipy's": openblas.in_wheel('scipy')}
    alone = {} if environ.get('OPENBLAS_CORETYPE') else openblas.probe(
        {name: path for name, path in libraries.items() if path})
    coretype, why = openblas.choose_coretype(openblas.cpu_flags(), {name: core for name, (_, core) in alone.items()}, environ)
    if coretype:
        environ['OPENBLAS_CORETYPE'] = coretype     # read by each OpenBLAS as it loads
    notes.append('OpenBLAS kernels: ' + why)

    ldflags = user.get('blas.ldflags')
    if ldflags is None:
        ldflags, note = choose_ldflags()
        added.append('blas.ldflags=' + ldflags)
        notes.append(note)
    if not {'base_compiledir', 'compiledir'} & set(user):
        compiledir, note = choose_compiledir(environ)
        if compiledir:
            added.append('base_compiledir=' + compiledir)
            notes.append(note)
    relocated = relocated_python()
    if relocated and 'gcc.cxxflags' not in user:     # a comma in a flag's value is escaped for Theano
        include, libdir = map(without_spaces, relocated)
        added.append('gcc.cxxflags=-I%s -L%s -Wl\\,-rpath\\,%s' % (include, libdir, libdir))
        notes.append('gcc.cxxflags: -I %s, -L and -rpath %s (this Python lives in %s, not where it '
                     'was built to live)' % (relocated + (sys.base_prefix,)))
    if user.get('device', '').startswith('cuda'):
        origin = require_gpu_stack(user['device'], environ)
        notes.append('GPU back end: pygpu %s, libgpuarray %s; %s' % (installed_version('pygpu'), gpustack.installed(),
                                                                    origin))
    if gpustack.installed() and 'dnn.enabled' not in user:  # cuDNN 8 and 9 removed calls that Theano 1.0.5 makes
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


NOTES = None            # set_up's decisions, one line each for the log; None before it
OPENBLAS_ALONE = {}     # what each OpenBLAS would pick on its own: {name: (version, core)}
_theano_set_up = False


def set_up(theano=True):
    """The machine set-up: the settings (choose_settings), then the checks that stop with one
    line, Theano imported, its compiling made fast (reuse_compiled_modules,
    compile_in_parallel) and our CPU kernels' rewrites registered (engine/rewrites.py).  Made before anything loads numpy or Theano; what is done is not done
    again.  theano=False: the settings only, for a process that runs numpy without Theano (the
    data's script, the PyTorch twin).  Returns NOTES."""
    global NOTES, OPENBLAS_ALONE, _theano_set_up
    if NOTES is None:
        NOTES, OPENBLAS_ALONE = choose_settings(os.environ)
    if theano and not _theano_set_up:
        require_theano_python()                      # one line with the remedy, not an ImportError
        require_compiler()                           # not a traceback at the first minibatch
        import_theano()
        reuse_compiled_modules()
        compile_in_parallel()
        from . import cpublas, cpuops  # noqa: F401  (their rewrites join Theano's optimizer)
        _theano_set_up = True
    return NOTES


def import_theano():
    """import theano, where a flag value it refuses (THEANO_FLAGS, .theanorc) stops the run with
    one line that names the flag, the value and the valid ones, not 23 lines of traceback."""
    try:
        import theano  # noqa: F401
    except ValueError as e:
        param = refused_flag(e)
        if param is None:
            raise
        sys.exit('error: %s: %s=%s is not a valid value; %s' % (
            flag_origin(param.fullname), param.fullname, user_flags().get(param.fullname, '?'), valid_values(param, e)))


def refused_flag(error):
    """The configuration parameter whose value Theano's configparser refused, from the error's traceback."""
    configparser = sys.modules.get('theano.configparser')     # left by the failed import of theano
    refused = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        for name in ('self', 'configparam'):
            if configparser and isinstance(frame.f_locals.get(name), configparser.ConfigParam):
                refused = frame.f_locals[name]
    return refused


def valid_values(param, error):
    """What a configuration parameter takes, in words."""
    said = re.search(r'Valid options (.*)', str(error), re.S)
    if said:
        return 'valid options ' + said.group(1).rstrip('.')
    if hasattr(param, 'all'):
        return 'valid options: ' + ', '.join(map(str, param.all))
    mytype = getattr(param, 'mytype', None)
    if mytype is not None and mytype.__name__ == 'booltype':
        return 'valid options: True, False'
    return 'it takes a value of type %s' % mytype.__name__ if mytype is not None else 'see theano.config'


def flag_origin(name):
    """Where a flag the user set comes from: THEANO_FLAGS, else a .theanorc file."""
    return 'THEANO_FLAGS' if name in flags_in(os.environ.get('THEANO_FLAGS', '')) else '.theanorc'


# ---------------------------------------------------------------- Theano's compile cache

def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _stable_cop_version(self):
    """COp.c_code_cache_version with a digest of the C source in place of Python's hash()."""
    digest = hashlib.sha256('\0'.join(self.func_codes).encode()).hexdigest()
    version = (int(digest[:15], 16),)
    if hasattr(self, 'params_type'):
        version += (self.params_type.c_code_cache_version(),)
    return version


def reuse_compiled_modules():
    """Let later processes reuse the C modules that Theano 1.0.5 keys so that none ever does.

    A compiled module's cache key carries version parts, and an empty one marks the module
    unversioned: g++ builds it again in every process.  Two such parts are bugs, not ops
    without a version: (1) each op's __props__, the names of its properties, is a part, and
    it is empty for ops without properties (Dot22, Dot22Scalar, ScalarFromTensor, the fused
    softmax/cross-entropy ops); (2) a COp's version is Python's hash() of its C source
    (DimShuffle), different in every process since Python 3.3 (aesara-devs/aesara#1097).
    Measured: 2-3 s of g++ on every start of the default run.  Ops without properties get
    one name, __class__, which only the cache key reads (Theano fixes equality and hashing
    when it makes the class), those made later (our ops, imported after the set-up) as they
    are made; COps get a digest of their source.  Called once Theano is imported.
    """
    import theano
    import theano.tensor.nnet      # noqa: F401  (the softmax ops, before the walk)
    for op_class in _all_subclasses(theano.gof.Op):
        _keyed_by_class(op_class)
    make_class = theano.gof.utils.MetaObject.__new__

    def make_op_class(meta, name, bases, namespace):
        made = make_class(meta, name, bases, namespace)
        return _keyed_by_class(made) if issubclass(made, theano.gof.Op) else made
    theano.gof.utils.MetaObject.__new__ = staticmethod(make_op_class)
    theano.gof.COp.c_code_cache_version = _stable_cop_version


def _keyed_by_class(op_class):
    """An op class without properties, given __class__ as the one its cache key reads."""
    if op_class.__dict__.get('__props__') == ():
        op_class.__props__ = ('__class__',)
    return op_class


_compiling = {}     # what g++ is given for a module -> Future: the scratch folder it filled, or None


def _compile_arguments(linker):
    """What CLinker.compile_cmodule hands g++ for linker's module: the same for the same module."""
    module = linker.get_dynamic_module()
    src_code = module.code()                                # sets code_hash
    return dict(module_name=module.code_hash, src_code=src_code, include_dirs=linker.header_dirs(),
                lib_dirs=linker.lib_dirs(), libs=linker.libraries(), preargs=linker.compile_args())


def _identity(arguments):
    return hashlib.sha256(repr(sorted(arguments.items())).encode()).hexdigest()


def _compile_apart(compiler, arguments):
    """g++ for one module into a scratch folder of its own; None if that failed (Theano's
    own call then compiles it again and reports the error as usual)."""
    folder = None
    try:
        folder = tempfile.mkdtemp(prefix='theano-ahead-')
        compiler.compile_str(location=folder, py_module=False, **arguments)
        return folder
    except Exception:                       # g++'s error, or no room in the temporary folder
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        return None


def _modules_to_compile(nodes):
    """(identity, compiler, g++'s arguments) of each module that making the thunks of nodes
    will compile: one per node with C code whose key the compile cache lacks, as Op.make_thunk
    would build it (a node that does not fit that mould is left to Theano)."""
    from theano.gof import FunctionGraph, Op
    from theano.gof.cc import CLinker, get_module_cache
    from theano.gof.cmodule import get_module_hash
    cache = get_module_cache()
    for node in nodes:
        op = node.op
        if type(op).make_thunk is not Op.make_thunk:          # scan, ifelse: thunks of their own
            continue
        if not getattr(op, '_f16_ok', False) and any(
                getattr(v.type, 'dtype', '') == 'float16' for v in node.inputs + node.outputs):
            continue
        try:
            op.prepare_node(node, storage_map=None, compute_map=None, impl='c')
            linker = CLinker().accept(FunctionGraph(node.inputs, node.outputs), no_recycling=[])
            key = linker.cmodule_key()
            if key is None or key in cache.entry_from_key:
                continue
            arguments = _compile_arguments(linker)
            if get_module_hash(arguments['src_code'], key) in cache.module_hash_to_key_data:
                continue
        except Exception:                   # no C code, no key, a prepare_node that wants the
            continue                        # storage map (Pool's old interface): Theano decides
        yield _identity(arguments), linker.c_compiler(), arguments


def compile_in_parallel():
    """Run the g++ of a Theano function's new C modules on every core at once.

    Theano 1.0.5 compiles a function's modules one g++ at a time while it makes the thunks
    (0.5-1 s each: the default run's 32 took 23 s on a 2-core EPYC with an empty cache, 13 s
    with this).  Before it does, this works out which modules its thunks will ask for and
    runs their g++ in threads, each into a scratch folder; Theano's own compile of such a
    module (under its cache lock, as before) then moves the finished files into the cache
    folder and loads them instead of running g++.  Modules in the cache cost one key lookup.
    Called once Theano is imported.
    """
    from concurrent.futures import ThreadPoolExecutor
    from theano.gof import vm
    from theano.gof.cc import CLinker
    from theano.gof.cmodule import dlimport, get_lib_extension
    if getattr(vm.VM_Linker.make_all, 'compiles_in_parallel', False):
        return
    pool = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix='g++')
    make_all, compile_cmodule = vm.VM_Linker.make_all, CLinker.compile_cmodule

    def make_all_compiling_ahead(self, *args, **kwargs):
        started = []
        try:
            if self.c_thunks is not False:
                for identity, compiler, arguments in _modules_to_compile(self.fgraph.toposort()):
                    if identity not in _compiling:
                        _compiling[identity] = pool.submit(_compile_apart, compiler, arguments)
                        started.append(identity)
            return make_all(self, *args, **kwargs)
        finally:                            # modules no thunk took; on Ctrl-C, g++ not yet started
            futures = [_compiling.pop(identity) for identity in started]
            for future in futures:          # all first: the workers would start the next meanwhile
                future.cancel()
            for future in futures:
                if not future.cancelled() and future.result():
                    shutil.rmtree(future.result(), ignore_errors=True)

    def compile_cmodule_compiled_ahead(self, location=None):
        # the source is generated for the lookup only while some g++ ran ahead (not for constant folding)
        arguments = _compile_arguments(self) if location and _compiling else None
        future = arguments and _compiling.get(_identity(arguments))
        folder = future.result() if future else None
        if not (folder and os.path.isdir(folder)):
            return compile_cmodule(self, location)
        for name in os.listdir(folder):
            shutil.move(os.path.join(folder, name), location)
        os.rmdir(folder)
        open(os.path.join(location, '__init__.py'), 'w').close()      # as compile_str leaves it
        return dlimport(os.path.join(location, '%s.%s' % (arguments['module_name'], get_lib_extension())))

    make_all_compiling_ahead.compiles_in_parallel = True
    vm.VM_Linker.make_all = make_all_compiling_ahead
    CLinker.compile_cmodule = compile_cmodule_compiled_ahead


# ---------------------------------------------------------------- describing what runs

def blas_description():
    """One line: Theano's BLAS flags, then every OpenBLAS in the process with its version and kernels."""
    import theano
    return openblas.describe(theano.config.blas.ldflags)


def floatX():
    import theano
    return theano.config.floatX


def gpu_asked():
    """THEANO_FLAGS ask for a GPU (device=cuda...; set_up refused the old back end's gpu...)."""
    import theano
    return theano.config.device.startswith('cuda')


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
    return 'cpu: %s, %d cores%s' % (model, os.cpu_count(), vector_instructions())


def vector_instructions():
    """', AVX-512' or ', AVX2' (or ', no AVX2') on x86: CPUs of one model name differ in them,
    and the C code and the BLAS kernels with them; '' elsewhere."""
    if not openblas.is_x86():
        return ''
    flags = openblas.cpu_flags()
    return ', ' + ('AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2')


def gpu_stack_description():
    """On the GPU, one line naming the driver and the CUDA library files loaded, else None."""
    return gpustack.describe() if gpu_asked() else None


def set_threads(n):
    """OpenMP's threads for the parallel regions this thread starts from now on (Theano's C ops
    and ours size their work per call), and every loaded BLAS's: threadpoolctl's limits, kept."""
    from threadpoolctl import threadpool_limits     # here: a Python without it still gets require_theano_python's line
    threadpool_limits(n)


def memory_used():
    """What the run took, in MiB: this process's peak resident memory and, on the GPU, the device
    memory in use now (device-wide, counting the blocks libgpuarray keeps cached for reuse)."""
    import resource
    used = {'peak_resident': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}   # KiB on Linux
    if gpu_asked():
        try:
            from theano.gpuarray.type import get_context
            context = get_context(None)
            used['gpu_in_use'] = round((context.total_gmem - context.free_gmem) / 2 ** 20)
        except Exception:
            pass                                # no GPU after all: require_gpu_if_asked said so
    return used


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
            cause = 'pygpu is not installed (%s): bash setup.sh --gpu installs it and libgpuarray' % e
    elif gpu_ops is not None and not gpu_ops:
        cause = 'the compiled training function has no GPU op'
    else:
        return
    sys.exit('error: %s asks for %s, but %s' % (flag_origin('device'), theano.config.device, cause))
