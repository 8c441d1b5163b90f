"""cifar10.py and mnist.py: formats, split, plane order, ZCA and its cache, downloads, bad input."""
import glob
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import cifar10
import mnist
import nnet
from conftest import ROOT, SHARED, make_cifar, make_mnist, write_idx, write_py2_pickle


def test_split_sizes_dtypes_and_labels(cifar_dir):
    batches = make_cifar(cifar_dir, rows=120)
    raw = cifar10.load_raw(cifar_dir)
    assert {k: len(v[1]) for k, v in raw.items()} == {'L': 480, 'V': 120, 'T': 120}
    assert raw['L'][0].dtype == np.uint8 and raw['L'][1].dtype == np.int32
    np.testing.assert_array_equal(raw['V'][1], batches['data_batch_5'][1])
    np.testing.assert_array_equal(raw['L'][0][120:240], batches['data_batch_2'][0])
    data = cifar10.load(cifar_dir, zca=False)
    assert data['T'][0].shape == (120, 3072) and data['T'][0].dtype == np.float32


def test_rows_are_red_green_blue_planes(cifar_dir):
    raw = cifar10.load_raw(cifar_dir)
    images = raw['L'][0].reshape((-1,) + cifar10.XDIM)
    np.testing.assert_array_equal(images[3, 0].ravel(), raw['L'][0][3, :1024])   # red plane first
    np.testing.assert_array_equal(images[3, 2].ravel(), raw['L'][0][3, 2048:])   # blue plane last
    tile = cifar10.montage(raw['L'][0], raw['L'][1])
    k = raw['L'][1][0]
    first = raw['L'][0][0].reshape(3, 32, 32).transpose(1, 2, 0).astype(float)
    expected = (first - first.min()) / (first.max() - first.min())
    np.testing.assert_allclose(tile[k * 33:k * 33 + 32, :32], expected)


def test_mean_subtraction_uses_training_statistics_only(cifar_dir):
    raw = cifar10.load_raw(cifar_dir)
    data = cifar10.load(cifar_dir, zca=False)
    mean = (raw['L'][0] / 255.0).mean(axis=0)
    np.testing.assert_allclose(data['L'][0].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(data['T'][0], raw['T'][0] / 255.0 - mean, atol=1e-5)


def test_zca_whitens_to_identity():
    rng = np.random.RandomState(1)
    X = (rng.randn(5000, 12) @ rng.randn(12, 12) * 3 + 5).astype(np.float32)
    Xc = X - X.mean(axis=0)
    W = cifar10.zca_matrix(Xc, epsilon=1e-6)
    Y = Xc @ W
    # float32 covariance: the result moves by ~2e-3 between BLAS kernels (Haswell, Barcelona)
    np.testing.assert_allclose(np.cov(Y.T, bias=True), np.eye(12), atol=5e-3)
    np.testing.assert_allclose(W, W.T, atol=1e-5)        # ZCA, not just any whitening
    W_eps = cifar10.zca_matrix(Xc, epsilon=0.001)
    assert not np.allclose(W, W_eps, atol=1e-4)


def test_zca_is_fitted_on_training_images_and_applied_to_the_others(cifar_dir):
    """Against an independent reference: the training covariance's eigenvectors U and values s,
    W = U diag(1/sqrt(s + 0.001)) U^T, in float64, applied to every split minus the training mean."""
    assert cifar10.ZCA_EPSILON == 0.001
    raw = cifar10.load_raw(cifar_dir)
    data = cifar10.load(cifar_dir, cache=False)
    X = raw['L'][0] / 255.0
    mean = X.mean(axis=0)
    s, U = np.linalg.eigh(np.cov((X - mean).T, bias=True))
    W = U @ np.diag(1 / np.sqrt(np.clip(s, 0, None) + 0.001)) @ U.T
    for split in 'LVT':
        want = (raw[split][0] / 255.0 - mean) @ W
        # in float32, with 400 images in 3072 dimensions (a near-singular covariance), the whitened
        # values move by up to 0.3% of their norm between BLAS kernels (0.06% SkylakeX, 0.27% Haswell)
        assert np.linalg.norm(data[split][0] - want) <= 1e-2 * np.linalg.norm(want), split


def test_zca_cache_is_reused_only_for_the_same_data_and_epsilon(cifar_dir, monkeypatch):
    lines = []
    first = cifar10.load(cifar_dir, log=lines.append)
    cifar10.flush_cache()
    assert 'fitting the ZCA whitening' in lines[0] and 'fitted' in lines[-1]    # said before the wait

    def no_fit(*args):
        raise AssertionError('refitted although the cache is valid')
    monkeypatch.setattr(cifar10, 'zca_matrix', no_fit)
    lines.clear()
    again = cifar10.load(cifar_dir, log=lines.append)
    assert len(lines) == 1 and 'from cache' in lines[-1]
    np.testing.assert_array_equal(first['V'][0], again['V'][0])
    with pytest.raises(AssertionError, match='refitted'):
        cifar10.load(cifar_dir, epsilon=0.01)
    make_cifar(cifar_dir, seed=7)                 # other pixels: the cache must not be served
    with pytest.raises(AssertionError, match='refitted'):
        cifar10.load(cifar_dir)


def test_the_splits_come_in_one_array_that_the_trainer_takes_without_a_copy(cifar_dir):
    """The published data are 737 MB of float32: one copy, not a second one joined for Theano."""
    fitted = cifar10.load(cifar_dir)
    cifar10.flush_cache()
    cached = cifar10.load(cifar_dir)
    for data in (fitted, cached, cifar10.load(cifar_dir, zca=False)):
        rows = nnet.joined([data[s][0] for s in 'LVT'])
        assert np.shares_memory(rows, data['T'][0]) and rows.shape == (600, 3072)
        np.testing.assert_array_equal(rows[400:500], data['V'][0])
    for split in 'LVT':
        np.testing.assert_array_equal(cached[split][0], fitted[split][0])      # read back bit for bit
    cut, = glob.glob(os.path.join(cifar_dir, 'cache', 'cifar10-zca-*', 'V.npy'))
    with open(cut, 'r+b') as f:
        f.truncate(os.path.getsize(cut) - 4)
    lines = []
    again = cifar10.load(cifar_dir, log=lines.append)       # a cache file cut short is no cache: fitted again
    assert 'fitting the ZCA whitening' in lines[0]
    np.testing.assert_array_equal(again['V'][0], fitted['V'][0])
    cifar10.flush_cache()
    lines.clear()
    cifar10.load(cifar_dir, log=lines.append)               # ... and cached whole again, not refitted every run
    assert len(lines) == 1 and 'from cache' in lines[0]


def test_whitening_a_block_of_rows_at_a_time_is_the_product():
    rng = np.random.RandomState(0)
    x, W = rng.randn(23, 6).astype('float32'), rng.randn(6, 6).astype('float32')
    want = x @ W
    cifar10._whiten_in_place(x, W, rows=5)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)


def _batch_path(datadir, name='data_batch_3'):
    return os.path.join(datadir, 'cifar-10-batches-py', name)


@pytest.mark.parametrize('damage, message', [
    ('missing', 'is missing'),
    ('truncated', 'truncated or corrupt'),
    ('short rows', 'expected uint8 rows of 3072'),
    ('labels count', '99 labels for 100 rows'),
    ('label range', 'labels outside 0-9'),
    ('no keys', 'not a CIFAR-10 batch'),
])
def test_bad_batches_raise_a_clear_error_naming_the_file(cifar_dir, damage, message):
    path = _batch_path(cifar_dir)
    data = np.zeros((100, 3072), np.uint8)
    labels = [1] * 100
    if damage == 'missing':
        os.remove(path)
    elif damage == 'truncated':
        blob = open(path, 'rb').read()
        open(path, 'wb').write(blob[:len(blob) // 2])
    elif damage == 'no keys':
        write_py2_pickle([1, 2, 3], path)
    else:
        if damage == 'short rows':
            data = data[:, :3000]
        elif damage == 'labels count':
            labels = labels[:99]
        else:
            labels[5] = 10
        write_py2_pickle({b'data': data, b'labels': labels}, path)
    with pytest.raises(cifar10.DataError, match=message) as e:
        cifar10.load_raw(cifar_dir)
    assert 'data_batch_3' in str(e.value)


def test_download_checks_md5_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.delenv('NNET_OFFLINE')              # file:// addresses: nothing leaves this machine
    src = tmp_path / 'src.bin'
    src.write_bytes(b'hello cifar' * 1000)
    good = hashlib.md5(src.read_bytes()).hexdigest()
    target = str(tmp_path / 'out' / 'file.bin')
    with pytest.raises(cifar10.DataError) as e:
        cifar10.download([src.as_uri()], target, '0' * 32)
    assert 'md5' in str(e.value) and target in str(e.value)
    assert os.listdir(tmp_path / 'out') == []
    with pytest.raises(cifar10.DataError, match='put it at'):
        cifar10.download([(tmp_path / 'nowhere').as_uri()], target, good)
    assert os.listdir(tmp_path / 'out') == []
    cifar10.download([(tmp_path / 'nowhere').as_uri(), src.as_uri()], target, good)  # next mirror
    assert open(target, 'rb').read() == src.read_bytes()
    os.remove(target)
    monkeypatch.setenv('NNET_OFFLINE', '1')         # nothing tried, and the same advice
    with pytest.raises(cifar10.DataError, match='(?s)not fetched: NNET_OFFLINE is set.*put it at'):
        cifar10.download([src.as_uri()], target, good)
    assert not os.path.exists(target)


def _archive(datadir, folder_name, extra=None):
    path = os.path.join(datadir, cifar10.ARCHIVE)
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(os.path.join(datadir, 'cifar-10-batches-py'), folder_name)
        if extra:
            info = tarfile.TarInfo(extra)
            info.size = 2
            tar.addfile(info, io.BytesIO(b'hi'))
    shutil.rmtree(os.path.join(datadir, 'cifar-10-batches-py'))
    return path


def test_archive_is_verified_and_extracted(cifar_dir, monkeypatch):
    path = _archive(cifar_dir, 'cifar-10-batches-py')
    with pytest.raises(cifar10.DataError, match='wrong md5'):
        cifar10.load_raw(cifar_dir)
    monkeypatch.setattr(cifar10, 'ARCHIVE_MD5', cifar10.md5sum(path))
    assert len(cifar10.load_raw(cifar_dir)['L'][1]) == 400
    assert sorted(os.listdir(cifar_dir)) == ['cifar-10-batches-py', cifar10.ARCHIVE]


def test_unsafe_archive_is_refused(cifar_dir, monkeypatch):
    path = _archive(cifar_dir, 'cifar-10-batches-py', extra='../escaped.txt')
    monkeypatch.setattr(cifar10, 'ARCHIVE_MD5', cifar10.md5sum(path))
    with pytest.raises(cifar10.DataError, match='unsafe'):
        cifar10.load_raw(cifar_dir)
    assert not os.path.exists(os.path.join(os.path.dirname(cifar_dir), 'escaped.txt'))
    assert not os.path.exists(os.path.join(cifar_dir, 'cifar-10-batches-py'))


def test_mnist_split_and_scaling(tmp_path):
    make_mnist(str(tmp_path), ntrain=600, ntest=100)
    data = mnist.load(str(tmp_path))
    assert {k: v[0].shape for k, v in data.items()} == {'L': (500, 784), 'V': (100, 784), 'T': (100, 784)}
    np.testing.assert_allclose(data['L'][0].mean(axis=0), 0, atol=1e-5)
    raw = mnist.read_idx(str(tmp_path / 'mnist' / 'train-images-idx3-ubyte.gz')).reshape(600, 784)
    mean = (raw[:500] / 255.0).mean(axis=0)
    np.testing.assert_allclose(data['V'][0], raw[500:] / 255.0 - mean, atol=1e-5)
    assert np.shares_memory(nnet.joined([data[s][0] for s in 'LVT']), data['T'][0])     # one array, as CIFAR-10's


def test_mnist_full_size_splits_as_its_table_reports(tmp_path):
    """60000 training images: the last 10000 validate, the 10000 of t10k test."""
    folder = tmp_path / 'mnist'
    folder.mkdir()
    for prefix, n in (('train', 60000), ('t10k', 10000)):
        labels = np.arange(n) % 10
        write_idx(str(folder / ('%s-images-idx3-ubyte.gz' % prefix)), np.zeros((n, 28, 28), np.uint8) + labels[:, None, None])
        write_idx(str(folder / ('%s-labels-idx1-ubyte.gz' % prefix)), labels)
    data = mnist.load(str(tmp_path))
    assert {k: len(v[1]) for k, v in data.items()} == {'L': 50000, 'V': 10000, 'T': 10000}


def test_mnist_bad_files_raise_clear_errors(tmp_path):
    folder = make_mnist(str(tmp_path))
    labels = os.path.join(folder, 'train-labels-idx1-ubyte.gz')
    write_idx(labels, np.zeros(599))
    with pytest.raises(cifar10.DataError, match='600 images, 599 labels'):
        mnist.load(str(tmp_path))
    open(labels, 'wb').write(b'not gzip at all')
    with pytest.raises(cifar10.DataError, match='train-labels-idx1-ubyte.gz'):
        mnist.load(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, 'data', 'mnist')), reason='no ../shared MNIST')
def test_real_mnist_files(tmp_path):
    os.symlink(os.path.abspath(os.path.join(SHARED, 'data', 'mnist')), tmp_path / 'mnist')
    data = mnist.load(str(tmp_path))
    assert [len(data[k][1]) for k in 'LVT'] == [50000, 10000, 10000]
    assert np.bincount(data['T'][1]).tolist()[:2] == [980, 1135]     # the official test counts


REAL_CIFAR = os.environ.get('CIFAR10_REAL_DATADIR')


@pytest.mark.skipif(not REAL_CIFAR, reason='set CIFAR10_REAL_DATADIR to a full CIFAR-10 (.ci/run does)')
def test_real_cifar10_layout():
    raw = cifar10.load_raw(REAL_CIFAR, download_missing=False)
    assert [len(raw[k][1]) for k in 'LVT'] == [40000, 10000, 10000]
    assert np.bincount(raw['T'][1]).tolist() == [1000] * 10
    assert np.bincount(np.concatenate([raw['L'][1], raw['V'][1]])).tolist() == [5000] * 10


@pytest.mark.parametrize('argv', [['--x'], ['-d', 'data'], ['data', 'more']])
def test_cifar10_py_takes_one_datadir_and_refuses_the_rest(argv, capsys):
    with pytest.raises(SystemExit, match='the one argument is DATADIR, the folder that holds cifar-10-batches-py/'):
        cifar10.main(['cifar10.py'] + argv)            # before anything is made or downloaded there
    cifar10.main(['cifar10.py', '--help'])
    assert capsys.readouterr().out.startswith('CIFAR-10 for the experiments')


def test_cifar10_py_piped_into_head_ends_quietly(tmp_path):
    """`python cifar10.py | head` printed a BrokenPipeError traceback; now it ends as Unix tools do."""
    make_cifar(str(tmp_path), rows=100)
    proc = subprocess.Popen([sys.executable, 'cifar10.py', str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                 # gone before its first line, as head after its last
    assert proc.wait(timeout=300) == -signal.SIGPIPE and proc.stderr.read() == ''
