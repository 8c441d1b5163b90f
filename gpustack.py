"""setup.sh --gpu's GPU back end made usable: Debian's libgpuarray 0.7.6 and its headers in .venv/gpu,
and the CUDA libraries it opens.  machine.py calls this before Theano loads pygpu.
"""
import ctypes
import glob
import os
import sys


def folder():
    """setup.sh --gpu's folder (.venv/gpu: Debian's libgpuarray and its headers), or None."""
    folder = os.path.join(sys.prefix, 'gpu')
    return folder if glob.glob(os.path.join(folder, 'lib', 'libgpuarray.so.*')) else None


def use(gpu, environ):
    """Make setup.sh --gpu's libgpuarray findable: loaded now (pygpu's module then finds it by its
    soname), and its headers and library on g++'s paths for the GPU ops Theano compiles."""
    ctypes.CDLL(sorted(glob.glob(os.path.join(gpu, 'lib', 'libgpuarray.so.*')))[0], mode=ctypes.RTLD_GLOBAL)
    for variable, sub in (('CPATH', 'include'), ('LIBRARY_PATH', 'lib')):
        path = os.path.join(gpu, sub)
        if path not in environ.get(variable, '').split(os.pathsep):
            environ[variable] = os.pathsep.join(filter(None, [path, environ.get(variable)]))


# libgpuarray 0.7.6 opens the CUDA libraries by their unversioned names, which the driver and
# CUDA 12/13 installs (or NVIDIA's pip wheels) do not provide: {name it opens: versioned files}
CUDA_LIBRARIES = {'libcuda.so': ['libcuda.so.1'],
                  'libnvrtc.so': ['libnvrtc.so.13', 'libnvrtc.so.12', 'libnvrtc.so.11.2'],
                  'libcublas.so': ['libcublas.so.13', 'libcublas.so.12', 'libcublas.so.11']}


def cuda_folders():
    """Where the driver and CUDA libraries live: container driver mounts, the system, CUDA
    toolkits, NVIDIA's pip wheels (this Python's and the system Python's)."""
    patterns = ['/usr/local/nvidia/lib64', '/usr/local/nvidia/lib', '/usr/lib/x86_64-linux-gnu', '/usr/lib64',
                '/usr/lib/wsl/lib', '/usr/local/cuda*/lib64', '/usr/local/cuda*/targets/x86_64-linux/lib',
                os.path.join(sys.prefix, 'lib', 'python3*', 'site-packages', 'nvidia', '*', 'lib'),
                '/usr/local/lib/python3*/dist-packages/nvidia/*/lib', '/usr/lib/python3/dist-packages/nvidia/*/lib']
    return [d for pattern in patterns for d in sorted(glob.glob(pattern), reverse=True)]


def link_cuda_libraries(links, folders):
    """Links under the unversioned names in `links` to the first versioned file found for each;
    returns the loader path to use: `links`, then each library's own folder (NVRTC and cuBLAS load
    companions from beside them), or [] when there is no driver library."""
    os.makedirs(links, exist_ok=True)
    path = [links]
    for name, versions in CUDA_LIBRARIES.items():
        found = next((os.path.join(d, v) for v in versions for d in folders if os.path.exists(os.path.join(d, v))),
                     None)
        if found is None:
            if name == 'libcuda.so':
                return []
            continue
        link = os.path.join(links, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(found, link)
        if os.path.dirname(os.path.realpath(found)) not in path:
            path.append(os.path.dirname(os.path.realpath(found)))
    return path


def restart_with_cuda_libraries(gpu, environ):
    """The loader reads LD_LIBRARY_PATH once, as a process starts: if the CUDA libraries' links are
    not on it yet, start this same command again with them (scripts only, not `python -c`)."""
    path = link_cuda_libraries(os.path.join(gpu, 'links'), cuda_folders())
    current = [p for p in environ.get('LD_LIBRARY_PATH', '').split(os.pathsep) if p]
    if path and path[0] not in current and getattr(sys, 'orig_argv', None) and sys.argv[0] not in ('', '-c'):
        environ['LD_LIBRARY_PATH'] = os.pathsep.join(path + current)
        sys.stdout.flush()
        os.execv(sys.executable, sys.orig_argv)
