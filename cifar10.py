"""CIFAR-10 for the experiments: official python batches, the published split, ZCA whitening.

    python cifar10.py [DATADIR]     # summary of the data set and a PNG montage in DATADIR

Split as published: NL = 40000 training (data_batch_1..4), NV = 10000 validation
(data_batch_5), NT = 10000 test (test_batch).  Pixels / 255, training mean subtracted,
then ZCA whitening (epsilon 0.001) fitted on the training images only.

The data live in DATADIR/cifar-10-batches-py/.  DATADIR is the drivers' `datadir`
setting (a relative one taken from these scripts' folder), else $NNET_DATADIR, else ./data
beside these scripts.  Absent data are
downloaded (official archive, md5-checked; engine/download.py).  It needs numpy only (scipy, if
present, speeds up ZCA).
"""
import glob
import hashlib
import json
import os
import pickle
import shutil
import signal
import sys
import threading
import time

if __name__ == '__main__':     # run as a script: the drivers' settings first (numpy's BLAS kernels)
    from engine import machine
    machine.set_up(theano=False)

import numpy as np  # noqa: E402

from engine.download import (DataError, Dataset, default_datadir, download, extract_tar, fingerprint,  # noqa: E402
                             md5sum, resolve, scaled_and_centred, split_rows)

URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
ARCHIVE = 'cifar-10-python.tar.gz'
ARCHIVE_BYTES = 170498071
ARCHIVE_MD5 = 'c58f30108f718f92721af3b95e74349a'
FOLDER = 'cifar-10-batches-py'
SPLIT_FILES = {'L': ['data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4'],
               'V': ['data_batch_5'],
               'T': ['test_batch']}
CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer',
           'dog', 'frog', 'horse', 'ship', 'truck')
XDIM = (3, 32, 32)            # R, G, B planes of 32x32, as the rows are stored
ZCA_EPSILON = 0.001
CACHE_VERSION = 1             # bump when the preprocessing code changes its output


# ---------------------------------------------------------------- raw batches

def fetch(datadir):
    """Make sure datadir/cifar-10-batches-py exists, downloading the archive if needed."""
    folder = os.path.join(datadir, FOLDER)
    if os.path.isdir(folder):
        return folder
    archive = os.path.join(datadir, ARCHIVE)
    if not os.path.exists(archive):
        try:
            download([URL], archive, ARCHIVE_MD5, ARCHIVE_BYTES)
        except DataError as e:
            raise DataError('%s\nor put an extracted %s/ folder in %s, or point datadir (--datadir, '
                            '$NNET_DATADIR) at the folder that holds one'
                            % (e, FOLDER, os.path.abspath(datadir)))
    elif md5sum(archive) != ARCHIVE_MD5:
        raise DataError('%s has the wrong md5 (expected %s): delete it and run again to download'
                        % (archive, ARCHIVE_MD5))
    extract_tar(archive, datadir, FOLDER)
    return folder


class _BatchUnpickler(pickle.Unpickler):
    """Python-2 batch pickles; also those re-pickled under numpy 2 (module numpy._core)."""

    def find_class(self, module, name):
        if module.startswith('numpy._core'):
            module = 'numpy.core' + module[len('numpy._core'):]
        return super().find_class(module, name)


def load_batch(path):
    """One batch file -> (uint8 rows (N, 3072), int32 labels (N,)), checked for shape."""
    remedy = ('delete %s and run again to download it, or put the official file there'
              % os.path.dirname(path))
    if not os.path.exists(path):
        raise DataError('%s is missing: %s' % (path, remedy))
    try:
        with open(path, 'rb') as f:
            batch = _BatchUnpickler(f, encoding='bytes').load()
    except Exception as e:       # truncated or foreign files fail in many ways
        raise DataError('%s is truncated or corrupt (%s: %s): %s'
                        % (path, type(e).__name__, e, remedy))
    if not isinstance(batch, dict) or b'data' not in batch or b'labels' not in batch:
        raise DataError('%s is not a CIFAR-10 batch (no data/labels keys): %s' % (path, remedy))
    data = np.asarray(batch[b'data'])
    labels = np.asarray(batch[b'labels'])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError('%s: data are %s %s, expected uint8 rows of 3072: %s'
                        % (path, data.dtype, data.shape, remedy))
    if labels.shape != (data.shape[0],):
        raise DataError('%s: %d labels for %d rows: %s' % (path, labels.size, data.shape[0], remedy))
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError('%s: labels outside 0-9: %s' % (path, remedy))
    return data, labels.astype(np.int32)


def load_raw(datadir=None, download_missing=True):
    """The published split as uint8 rows: {'L': (X, y), 'V': (X, y), 'T': (X, y)}."""
    datadir = datadir or default_datadir()
    folder = os.path.join(datadir, FOLDER)
    if download_missing:
        folder = fetch(datadir)
    elif not os.path.isdir(folder):
        raise DataError('no CIFAR-10 at %s: put the extracted %s/ there' % (folder, FOLDER))
    splits = {}
    for name, files in SPLIT_FILES.items():
        parts = [load_batch(os.path.join(folder, f)) for f in files]
        splits[name] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return splits


# ---------------------------------------------------------------- preprocessing

def zca_matrix(Xc, epsilon=ZCA_EPSILON):
    """The ZCA matrix of rows Xc (N, D) already centred.

    The D x D covariance is one BLAS product in Xc's precision (float32 is accurate
    enough with eps = 0.001 and twice as fast); scipy's MRRR eigensolver is about
    2.5x faster than numpy's here, so it is used when installed.
    """
    cov = np.dot(Xc.T, Xc) / Xc.shape[0]
    try:
        import scipy.linalg
        s, U = scipy.linalg.eigh(cov, driver='evr', overwrite_a=True)
    except ImportError:
        s, U = np.linalg.eigh(cov)
    s = np.clip(s, 0, None)
    W = np.dot(U * (1.0 / np.sqrt(s + epsilon)).astype(Xc.dtype), U.T)
    return W.astype(Xc.dtype)


def _cache_key(data_fingerprint, epsilon, dtype):
    return hashlib.sha1(('cifar10-zca v%d eps=%r %s %s' % (CACHE_VERSION, epsilon, dtype, data_fingerprint))
                        .encode()).hexdigest()


def _remove_stale_writes(path):
    """Temporary folders of cache writers that were killed (their process is gone)."""
    for tmp in glob.glob(path + '.tmp*'):
        try:
            os.kill(int(tmp.rsplit('.tmp', 1)[1].split('-')[0]), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:          # alive, another user's
            pass


def _save_cache(path, arrays, meta):
    """Write the cache folder atomically: complete or absent, never half-written.

    Runs started side by side may both fit and write: the first complete copy stays, and
    a later writer quietly drops its own.  Never raises: the cache only saves time.
    """
    tmp = path + '.tmp%d-%d' % (os.getpid(), threading.get_ident())
    try:
        _remove_stale_writes(path)
        os.makedirs(tmp)
        for name, a in arrays.items():
            np.save(os.path.join(tmp, name + '.npy'), a)
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f)
        if _cache_meta(path).get('key') != meta['key']:      # absent, or not a complete copy
            shutil.rmtree(path, ignore_errors=True)
            try:
                os.replace(tmp, path)
            except OSError:
                if _cache_meta(path).get('key') != meta['key']:  # not another writer's complete copy
                    raise
    except OSError as e:
        sys.stderr.write('warning: could not write the ZCA cache %s (%s); the next run fits it again\n'
                         % (path, e))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_meta(path):
    try:
        with open(os.path.join(path, 'meta.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _other_caches(path):
    """'NAME (SIZE MB)' for each other ZCA cache beside path (other data, epsilon or dtype)."""
    out = []
    for other in sorted(glob.glob(os.path.join(os.path.dirname(path), 'cifar10-zca-*'))):
        if other != path and '.tmp' not in os.path.basename(other):
            size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(other, '*')))
            out.append('%s (%d MB)' % (os.path.basename(other), size // 2 ** 20))
    return out


_cache_writers = []


def flush_cache():
    """Wait for cache files still being written in the background."""
    while _cache_writers:
        _cache_writers.pop().join()


def _load_cache(path, key, splits):
    """The whitened rows read straight into the splits' arrays; False if the cache is absent,
    another's or damaged (a damaged one is removed, so that this run's fit writes a whole one).
    Its mean and ZCA matrix are kept for reference only: nothing reads them back."""
    if _cache_meta(path).get('key') != key:
        return False
    try:
        for name, rows in splits.items():
            _read_into(os.path.join(path, name + '.npy'), rows)
        return True
    except (OSError, ValueError):
        shutil.rmtree(path, ignore_errors=True)
        return False


def _read_into(path, out):
    """An .npy file's array read into out (C-contiguous, of its shape and dtype) without a copy in between."""
    with open(path, 'rb') as f:
        major, minor = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if shape != out.shape or dtype != out.dtype or fortran_order:
            raise ValueError('%s holds %s %s, not %s %s' % (path, shape, dtype, out.shape, out.dtype))
        if f.readinto(memoryview(out).cast('B')) != out.nbytes:
            raise ValueError('%s is cut short' % path)


def _whiten_in_place(x, W, rows=10000):
    """x = x W, a block of rows at a time (the same bits as one product, as fast, 120 MB extra)."""
    block = np.empty((min(rows, len(x)), W.shape[1]), x.dtype)
    for start in range(0, len(x), rows):
        part = x[start:start + rows]
        np.dot(part, W, out=block[:len(part)])
        part[...] = block[:len(part)]


def load(datadir=None, zca=True, epsilon=ZCA_EPSILON, dtype='float32', cache=True, log=None):
    """The preprocessed split: a Dataset, 'L', 'V', 'T' -> (X (N, 3072) dtype, y int32), and
    .fingerprint, the hash of the raw pixels and labels.

    Rows reshape to (N, 3, 32, 32) in R, G, B plane order.  With zca=False only the
    training mean is subtracted.  The ZCA fit and the whitened rows are cached under
    datadir/cache/, keyed by the data's fingerprint, epsilon and dtype, so a second
    run skips the fit and a changed data set or epsilon is never served stale.
    `log`, if given, is called with one line on what happened.
    """
    datadir = datadir or default_datadir()
    start = time.time()
    raw = load_raw(datadir)
    data_fingerprint = fingerprint(raw)
    X = split_rows(raw, dtype)
    data = Dataset({name: (X[name], y) for name, (pixels, y) in raw.items()}, data_fingerprint)   # X filled below
    if not zca:
        scaled_and_centred(raw, X)
        log and log('data: mean subtracted, no ZCA (%.1f s)' % (time.time() - start))
        return data
    key = _cache_key(data_fingerprint, epsilon, dtype)
    path = os.path.join(datadir, 'cache', 'cifar10-zca-' + key[:16])
    if not (cache and _load_cache(path, key, X)):
        mean = scaled_and_centred(raw, X)
        log and log('data: fitting the ZCA whitening on the %d training images (once for these data: '
                    'cached for the next runs)' % len(X['L']))
        W = zca_matrix(X['L'], epsilon)
        cached = {'mean': mean, 'zca': W}
        for name, x in X.items():
            _whiten_in_place(x, W)
            cached[name] = x
        if cache:   # ~2 s of writing overlaps the start of training (numpy drops the GIL)
            writer = threading.Thread(target=_save_cache, name='zca-cache-writer', args=(
                path, cached, {'key': key, 'epsilon': epsilon, 'dtype': str(dtype)}))
            writer.start()
            _cache_writers.append(writer)
        how = 'fitted on the %d training images%s' % (len(X['L']), ', caching' if cache else '')
    else:
        how = 'from cache %s' % path
    log and log('data: ZCA (eps %g) %s (%.1f s)' % (epsilon, how, time.time() - start))
    others = _other_caches(path) if cache else []
    if others and log:
        log('other ZCA caches in %s (other data, epsilon or dtype; delete them if unused): %s'
            % (os.path.dirname(path), ', '.join(others)))
    return data


# ---------------------------------------------------------------- python cifar10.py

def montage(X, y, per_class=10):
    """First `per_class` images of each class as one (10*33, per_class*33, 3) RGB array in [0, 1]."""
    tile = np.ones((len(CLASSES) * 33, per_class * 33, 3))
    for k in range(len(CLASSES)):
        for j, i in enumerate(np.flatnonzero(y == k)[:per_class]):
            im = X[i].reshape(XDIM).transpose(1, 2, 0).astype(np.float64)   # planes -> HxWx3
            im = (im - im.min()) / max(im.max() - im.min(), 1e-12)
            tile[k * 33:k * 33 + 32, j * 33:j * 33 + 32] = im
    return tile


def main(argv):
    if argv[1:2] in (['-h'], ['--help']):
        print(__doc__)
        return
    if len(argv) > 2 or argv[1:2] and argv[1].startswith('-'):
        sys.exit('error: %s: the one argument is DATADIR, the folder that holds %s/ (see --help)'
                 % (' '.join(argv[1:]), FOLDER))
    datadir = resolve(argv[1]) if len(argv) > 1 else default_datadir()
    raw = load_raw(datadir)
    print('# CIFAR-10 at %s' % os.path.join(datadir, FOLDER))
    print('# split  rows   ' + ' '.join('%6s' % c[:6] for c in CLASSES))
    for name, (X, y) in raw.items():
        print('#   %s  %6d  %s' % (name, len(y), ' '.join('%6d' % n for n in np.bincount(y, minlength=10))))
    data = load(datadir, log=print)
    for name, (X, y) in data.items():
        print('#   %s  whitened values %.3f .. %.3f, mean %.3g, std %.3f'
              % (name, X.min(), X.max(), X.mean(), X.std()))
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('# no matplotlib: skipping the montage (pip install matplotlib)')
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.6))
    for ax, X, title in ((axes[0], raw['L'][0], 'raw'), (axes[1], data['L'][0], 'ZCA-whitened')):
        ax.imshow(montage(X, raw['L'][1]), interpolation='nearest')
        ax.set_title('first 10 training images of each class, %s' % title)
        ax.set_yticks(np.arange(len(CLASSES)) * 33 + 16)
        ax.set_yticklabels(CLASSES)
        ax.set_xticks([])
    fig.tight_layout()
    out = os.path.join(datadir, 'cifar10_montage.png')
    fig.savefig(out, dpi=80)
    print('# wrote %s' % out)


if __name__ == '__main__':
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `| head` ends it quietly, as it would any Unix tool
    try:
        main(sys.argv)
    except DataError as e:
        sys.exit('error: %s' % e)
