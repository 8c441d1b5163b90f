"""The suite's world of its own, and shared fixtures: small data sets written in the official formats.

Before any test module imports numpy or Theano, and for every subprocess (they inherit it):
no user's .theanorc (THEANORC names none), a compile folder of the suite's own unless
THEANO_FLAGS names one (CI's), never ~/.theano; no download (NNET_OFFLINE, which the download
code obeys); Theano told to raise on optimizer and shape errors; the machine then set up as
the drivers set it up.  A test that replaces THEANO_FLAGS keeps the compile folder: theano_flags().
"""
import glob
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine import download, machine  # noqa: E402

os.environ['THEANORC'] = os.devnull
os.environ[download.OFFLINE] = '1'
_users = machine.flags_in(os.environ.get('THEANO_FLAGS', ''))
COMPILE_FOLDER = next(('%s=%s' % (name, _users[name]) for name in ('base_compiledir', 'compiledir') if name in _users),
                      'base_compiledir=%s' % os.path.join(tempfile.gettempdir(), 'nnet-tests-%d' % os.getuid()))
os.environ['THEANO_FLAGS'] = ','.join(filter(None, [
    os.environ.get('THEANO_FLAGS', ''), COMPILE_FOLDER if COMPILE_FOLDER.split('=')[0] not in _users else '',
    'on_opt_error=raise', 'on_shape_error=raise']))


def theano_flags(*flags):
    """THEANO_FLAGS of these flags alone, and the suite's compile folder."""
    return ','.join(filter(None, (COMPILE_FOLDER,) + flags))


machine.set_up()


def stock_theano(linker=None):
    """Theano's default mode without our rewrites (engine/rewrites.py), as
    optimizer_excluding=cpu_kernels gives it: stock Theano, the oracle of our ops."""
    import theano
    from engine import rewrites
    mode = theano.compile.get_default_mode().excluding(rewrites.TAG)
    return mode if linker is None else mode.clone(linker=linker)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
SHARED = os.path.join(ROOT, '..', 'shared')


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the official CIFAR-10 batches do."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        header = (pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256
                  else pickle.BINSTRING + struct.pack('<i', len(obj)))
        self.write(header + obj)
        self.memoize(obj)
    dispatch[bytes] = save_bytes


def write_py2_pickle(obj, path):
    with open(path, 'wb') as f:
        Py2Pickler(f, protocol=2).dump(obj)


def make_cifar(datadir, rows=100, seed=0, learnable=False):
    """datadir/cifar-10-batches-py with `rows` images a batch; returns {file: (data, labels)}.

    learnable=True makes each class a coloured blob at its own place, so that a small
    network can learn it.
    """
    rng = np.random.RandomState(seed)
    folder = os.path.join(datadir, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for i, name in enumerate(['data_batch_%d' % b for b in range(1, 6)] + ['test_batch']):
        labels = rng.randint(0, 10, rows)
        data = rng.randint(0, 256, (rows, 3072)).astype(np.uint8)
        if learnable:
            images = data.reshape(rows, 3, 32, 32) // 4
            for r, k in enumerate(labels):
                images[r, k % 3, 3 * k:3 * k + 8, 3 * k:3 * k + 8] = 250
            data = images.reshape(rows, 3072)
        write_py2_pickle({b'batch_label': name.encode(), b'labels': [int(k) for k in labels],
                          b'data': data, b'filenames': [b'x.png'] * rows},
                         os.path.join(folder, name))
        batches[name] = (data, labels)
    write_py2_pickle({b'num_cases_per_batch': rows, b'num_vis': 3072,
                      b'label_names': [b'airplane'] * 10}, os.path.join(folder, 'batches.meta'))
    return batches


def write_idx(path, array):
    header = struct.pack('>BBBB', 0, 0, 8, array.ndim) + b''.join(struct.pack('>I', n) for n in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_mnist(datadir, ntrain=600, ntest=100, seed=0):
    """datadir/mnist/ with the four idx files; each digit k lights its own row band."""
    rng = np.random.RandomState(seed)
    folder = os.path.join(datadir, 'mnist')
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (('train', ntrain), ('t10k', ntest)):
        labels = rng.randint(0, 10, n)
        images = rng.randint(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 4:2 * k + 7, 4:24] = 255
        write_idx(os.path.join(folder, '%s-images-idx3-ubyte.gz' % prefix), images)
        write_idx(os.path.join(folder, '%s-labels-idx1-ubyte.gz' % prefix), labels)
    return folder


@pytest.fixture
def cifar_dir(tmp_path):
    make_cifar(str(tmp_path))
    return str(tmp_path)


def small_problem(n=300, seed=0):
    rng = np.random.RandomState(seed)
    y = rng.randint(0, 3, n).astype('int32')
    X = (rng.randn(n, 6) * 0.5 + np.eye(3, 6)[y] * 2).astype('float32')
    return X, y


def driver_settings(command):
    """A driver's settings (command: its path from ROOT, then overrides), from its --help=json."""
    out = subprocess.run([sys.executable] + list(command) + ['--help=json'], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])['settings']


def only_record(folder):
    """The record of the one run that wrote to folder (its .record.json file)."""
    path, = glob.glob(os.path.join(str(folder), '*.record.json'))
    with open(path) as f:
        return json.load(f)


def venv_beside(folder, pip=False):
    """A virtual environment at folder that sees this Python's packages (a .pth file; NVIDIA's wheels
    through a link) and has copies of pygpu and libgpuarray of its own, found through their rpaths
    before this venv's: whatever a test makes it change (its cuda-links, its packages) stays in
    folder.  Its python's path."""
    import shutil
    import sysconfig
    made = subprocess.run([sys.executable, '-m', 'venv'] + ([] if pip else ['--without-pip']) + [str(folder)],
                          capture_output=True, text=True, timeout=300)
    python = os.path.join(str(folder), 'bin', 'python')
    asked = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                           capture_output=True, text=True) if made.returncode == 0 else made
    if asked.returncode != 0:       # a Python that needs more than a venv gives (setup.sh's private one)
        pytest.skip('no venv beside this Python: %s' % (asked.stderr.strip().splitlines() or ['?'])[-1])
    packages = asked.stdout.strip()
    with open(os.path.join(packages, 'outer-venv.pth'), 'w') as f:
        f.write(sysconfig.get_paths()['purelib'] + '\n')
    nvidia = os.path.join(sysconfig.get_paths()['purelib'], 'nvidia')     # NVIDIA's wheels, found in a venv's own
    if os.path.isdir(nvidia):
        os.symlink(nvidia, os.path.join(packages, 'nvidia'))
    pygpu = os.path.join(sysconfig.get_paths()['purelib'], 'pygpu')
    if os.path.isdir(pygpu):
        shutil.copytree(pygpu, os.path.join(packages, 'pygpu'), symlinks=True)
        for lib in glob.glob(os.path.join(sys.prefix, 'lib', 'libgpuarray*')):
            shutil.copy2(lib, os.path.join(str(folder), 'lib'), follow_symlinks=False)
    return python
