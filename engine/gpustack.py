"""The GPU back end's libraries: setup.sh --gpu's libgpuarray 0.7.6 in the venv, and the CUDA
driver, NVRTC and cuBLAS it opens.  Standard library only: engine/machine.py calls it before Theano
loads pygpu, and setup.sh runs it (`python gpustack.py cuda-wheels`) before anything is installed.
"""
import ctypes
import glob
import os
import re
import subprocess
import sys


def installed():
    """setup.sh --gpu's libgpuarray (in the venv's lib folder, where pygpu's modules look for it
    by their rpath and where Theano points g++ for the GPU ops), or None."""
    found = glob.glob(os.path.join(sys.prefix, 'lib', 'libgpuarray.so.*'))
    return found[0] if found else None


# libgpuarray 0.7.6 opens the CUDA libraries by their unversioned names, which the driver and
# CUDA 12/13 installs (or NVIDIA's pip wheels) do not provide: {name it opens: versioned files}
CUDA_LIBRARIES = {'libcuda.so': ['libcuda.so.1'],
                  'libnvrtc.so': ['libnvrtc.so.13', 'libnvrtc.so.12', 'libnvrtc.so.11.2'],
                  'libcublas.so': ['libcublas.so.13', 'libcublas.so.12', 'libcublas.so.11']}

# NVIDIA's wheels of NVRTC and cuBLAS for each CUDA major, and the oldest driver that runs them
CUDA_WHEELS = {13: ('nvidia-cuda-nvrtc>=13,<14', 'nvidia-cublas>=13,<14'),
               12: ('nvidia-cuda-nvrtc-cu12', 'nvidia-cublas-cu12')}
OLDEST_DRIVER = {13: (580,), 12: (525,)}


def cuda_folders(environ=os.environ):
    """Where the CUDA libraries may be, in the order they are taken: a toolkit the user names
    (CUDA_HOME, CUDA_PATH), then this venv's NVIDIA wheels, which setup.sh --gpu chose for the
    driver, then container driver mounts, the system, CUDA toolkits, other Pythons' wheels."""
    toolkits = [environ[name] for name in ('CUDA_HOME', 'CUDA_PATH') if environ.get(name)]
    patterns = ([os.path.join(t, sub) for t in toolkits for sub in ('lib64', 'lib', 'targets/*/lib')] +
                [os.path.join(sys.prefix, 'lib', 'python3*', 'site-packages', 'nvidia', '*', 'lib')] +
                ['/usr/local/nvidia/lib64', '/usr/local/nvidia/lib', '/usr/lib/x86_64-linux-gnu',
                 '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib/wsl/lib', '/usr/local/cuda*/lib64',
                 '/usr/local/cuda*/targets/*/lib', '/usr/local/lib/python3*/dist-packages/nvidia/*/lib',
                 '/usr/lib/python3/dist-packages/nvidia/*/lib'])
    folders = []
    for pattern in patterns:
        for folder in sorted(glob.glob(pattern), reverse=True):
            if folder not in folders:
                folders.append(folder)
    return folders


def find_cuda_libraries(folders):
    """{unversioned name: the versioned file taken}: for each, the first folder that has any
    version of it, the newest there."""
    found = {}
    for name, versions in CUDA_LIBRARIES.items():
        found[name] = next((os.path.join(d, v) for d in folders for v in versions
                            if os.path.exists(os.path.join(d, v))), None)
    return found


def links_folder():
    """Where the unversioned names live: libgpuarray's rpath (set by setup.sh --gpu) names it."""
    return os.path.join(sys.prefix, 'cuda-links')


def link_cuda_libraries(links, found):
    """In `links`, each unversioned name libgpuarray opens, linked to the file `found` for it, and
    beside NVRTC and cuBLAS the companions they load from their own folder (NVRTC's builtins,
    cuBLASLt); links of earlier choices go.  Made whole, also for runs started side by side."""
    wanted = {}
    for name, target in found.items():
        if not target:
            continue
        wanted[name] = target
        if name != 'libcuda.so':        # the driver's folder is the system's: its library alone
            folder, stem = os.path.dirname(target), name[:-len('.so')]
            wanted.update((other, os.path.join(folder, other)) for other in os.listdir(folder)
                          if other.startswith(stem) and other not in wanted)
    os.makedirs(links, exist_ok=True)
    for entry in os.listdir(links):
        if entry not in wanted:
            os.remove(os.path.join(links, entry))
    for name, target in wanted.items():
        link = os.path.join(links, name)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        made = '%s.%d' % (link, os.getpid())
        os.symlink(target, made)
        os.replace(made, link)
    return wanted


def driver_version():
    """The NVIDIA driver's version as a tuple of ints, or None where none is visible."""
    try:
        with open('/proc/driver/nvidia/version') as f:
            text = f.read()
    except OSError:
        try:
            text = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                  capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r'\b(\d{3,})\.(\d+)(?:\.(\d+))?\b', text)
    return tuple(int(n) for n in match.groups() if n is not None) if match else None


def cuda_major_for(driver):
    """The CUDA major whose wheels to install for a driver version (None: none visible, then
    CUDA 12, which runs on more drivers), or None for a driver too old for either."""
    if driver is None:
        return 12
    return next((major for major in sorted(CUDA_WHEELS, reverse=True) if driver >= OLDEST_DRIVER[major]), None)


def problems(found):
    """What keeps device=cuda from starting with the CUDA libraries `found` (find_cuda_libraries'
    answer), as one line each ([] when nothing is known to)."""
    said = []
    if not found['libcuda.so']:
        said.append('no NVIDIA driver here (no libcuda.so.1): install the driver, or run on a machine with one')
    driver = driver_version()
    for name, label in (('libnvrtc.so', 'NVRTC'), ('libcublas.so', 'cuBLAS')):
        target = found[name]
        if not target:
            said.append('no %s (%s.*): bash setup.sh --gpu installs it from NVIDIA\'s wheels, or set CUDA_HOME '
                        'to a CUDA toolkit' % (label, name))
            continue
        major = int(re.search(r'\.so\.(\d+)', target).group(1))
        if driver and major in OLDEST_DRIVER and driver < OLDEST_DRIVER[major]:
            said.append('%s is CUDA %d (%s), which needs driver %d or newer, and this one is %s: update the driver, '
                        'or bash setup.sh --gpu again to take the CUDA libraries it runs' % (
                            label, major, target, OLDEST_DRIVER[major][0], dotted(driver)))
    return said


def origin(found):
    """Where the NVRTC and cuBLAS found come from, for the log."""
    ours = all(found[name] and found[name].startswith(sys.prefix + os.sep) for name in ('libnvrtc.so', 'libcublas.so'))
    return ("NVRTC and cuBLAS from NVIDIA's wheels in this venv" if ours else
            "NVRTC and cuBLAS from this machine, not from wheels in this venv (CUDA_HOME, or a set-up carried "
            "without them)")


def summary():
    """setup.sh --gpu's last words: pygpu's version and the NVRTC and cuBLAS files device=cuda will take."""
    import pygpu
    found = find_cuda_libraries(cuda_folders())
    return 'pygpu %s | NVRTC %s | cuBLAS %s' % (pygpu.__version__, found['libnvrtc.so'] or 'none found',
                                                found['libcublas.so'] or 'none found')


def _loaded(name):
    """The file of a library this process has loaded whose name starts with name, else the file
    the venv's link for it points to (what libgpuarray will load), else None."""
    try:
        with open('/proc/self/maps') as f:
            paths = sorted({line.split()[-1] for line in f if '/' in line})
    except OSError:
        paths = []
    loaded = next((p for p in paths if os.path.basename(p).startswith(name + '.')), None)
    link = os.path.join(links_folder(), name)
    return loaded or (os.path.realpath(link) if os.path.exists(link) else None)


def _ask(path, function, count, *arguments):
    """The `count` ints a CUDA library's version function writes (it takes their pointers after
    the given arguments), or None."""
    values = [ctypes.c_int() for _ in range(count)]
    try:
        call = getattr(ctypes.CDLL(path), function)
    except (OSError, AttributeError):
        return None
    if call(*arguments, *[ctypes.byref(v) for v in values]) != 0:
        return None
    return [v.value for v in values]


def _version(name, path):
    if name == 'libcuda.so':
        version = _ask(path, 'cuDriverGetVersion', 1)
        return version and 'CUDA %d.%d' % (version[0] // 1000, version[0] % 1000 // 10)
    if name == 'libnvrtc.so':
        version = _ask(path, 'nvrtcVersion', 2)
        return version and dotted(version)
    parts = [_ask(path, 'cublasGetProperty', 1, part) for part in range(3)]     # major, minor, patch
    return None if None in parts else dotted(p[0] for p in parts)


def dotted(version):
    return '.'.join(map(str, version))


def describe():
    """One line naming the driver and the libcuda, NVRTC and cuBLAS files loaded, with versions."""
    driver = driver_version()
    parts = ['driver ' + (dotted(driver) if driver else 'unknown')]
    for name, label in (('libcuda.so', 'libcuda'), ('libnvrtc.so', 'NVRTC'), ('libcublas.so', 'cuBLAS')):
        path = _loaded(name)
        version = path and _version(name, path)
        parts.append('%s %s%s' % (label, path or 'not found', ' (%s)' % version if version else ''))
    return '; '.join(parts)


if __name__ == '__main__':
    if sys.argv[1:] == ['link']:            # setup.sh --gpu, once the wheels are in
        made = link_cuda_libraries(links_folder(), find_cuda_libraries(cuda_folders()))
        print(', '.join('%s -> %s' % (name, made[name]) for name in CUDA_LIBRARIES if name in made) or 'none found')
    elif sys.argv[1:] == ['cuda-wheels']:     # setup.sh --gpu: the wheels to install, or why none
        driver, toolkit = driver_version(), os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
        if toolkit:
            print('# CUDA_HOME=%s: its NVRTC and cuBLAS are used' % toolkit)
        else:
            major = cuda_major_for(driver)
            if major is None:
                sys.exit('NVIDIA driver %s is older than %d, the oldest that runs CUDA 12\'s libraries: update the '
                         'driver' % (dotted(driver), OLDEST_DRIVER[12][0]))
            print('# CUDA %d (%s)' % (major, 'driver %s' % dotted(driver) if driver
                                      else 'no driver visible: the CUDA libraries that run on the most drivers'))
            print('\n'.join(CUDA_WHEELS[major]))
    else:
        sys.exit('usage: python -m engine.gpustack cuda-wheels | link')
