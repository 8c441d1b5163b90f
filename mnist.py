"""MNIST for mnist_mlp.py: the four official idx files, the split 50000 / 10000 / 10000.

The files live in DATADIR/mnist/ (DATADIR as in cifar10.py).  Missing ones are
downloaded from the mirrors below, tried in order (the original host no longer
serves them), and checked against the official archive md5s; files already
present are checked by format (magic number, counts, sizes).
"""
import gzip
import os

import numpy as np

from engine.download import DataError, Dataset, default_datadir, download, fingerprint, scaled_and_centred, split_rows

MIRRORS = ['https://ossci-datasets.s3.amazonaws.com/mnist/',
           'https://storage.googleapis.com/cvdf-datasets/mnist/']
FILES = {  # name: official archive md5
    'train-images-idx3-ubyte.gz': 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
    'train-labels-idx1-ubyte.gz': 'd53e105ee54ea40749a09fcbcd1e9432',
    't10k-images-idx3-ubyte.gz': '9fb629c4189551a2d022fa330f9573f3',
    't10k-labels-idx1-ubyte.gz': 'ec29112dd5afa0611ce80d1b7f02629c',
}
NV = 10000   # validation: the last 10000 of the 60000 training images (a sixth of a smaller set)


def read_idx(path):
    """An idx file (gzipped or not) as a uint8 array, checked against its header."""
    opener = gzip.open if path.endswith('.gz') else open
    remedy = 'delete it and run again to download it, or put the official file there'
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError('%s is truncated or corrupt (%s): %s' % (path, e, remedy))
    if len(raw) < 8 or raw[:2] != b'\0\0' or raw[2] != 8 or raw[3] not in (1, 3):
        raise DataError('%s is not an idx file of unsigned bytes: %s' % (path, remedy))
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise DataError('%s holds %d bytes of data, its header says %s: %s'
                        % (path, len(raw) - offset, shape, remedy))
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def load_pair(folder, images, labels):
    """Images (N, 784) and int32 labels (N,) of one file pair, downloading missing files."""
    arrays = []
    for name in (images, labels):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            download([m + name for m in MIRRORS], path, FILES[name])
        arrays.append(read_idx(path))
    X, y = arrays
    where = os.path.join(folder, images) + ', ' + labels
    if X.ndim != 3 or X.shape[1:] != (28, 28) or y.ndim != 1:
        raise DataError('%s: shapes %s and %s are not images of 28x28 and labels: delete them '
                        'and run again to download them' % (where, X.shape, y.shape))
    if len(X) != len(y) or (y.size and y.max() > 9):
        raise DataError('%s: %d images, %d labels (max %d): delete them and run again to '
                        'download them' % (where, len(X), len(y), y.max(initial=0)))
    return X.reshape(-1, 784), y.astype(np.int32)


def load(datadir=None, dtype='float32'):
    """A Dataset {'L': (X, y), 'V': (X, y), 'T': (X, y)}: rows of 784 pixels / 255 minus the training mean."""
    folder = os.path.join(datadir or default_datadir(), 'mnist')
    X, y = load_pair(folder, 'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz')
    XT, yT = load_pair(folder, 't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
    nL = len(X) - min(NV, len(X) // 6)
    raw = {'L': (X[:nL], y[:nL]), 'V': (X[nL:], y[nL:]), 'T': (XT, yT)}
    rows = split_rows(raw, dtype)
    scaled_and_centred(raw, rows)
    return Dataset({name: (rows[name], labels) for name, (pixels, labels) in raw.items()}, fingerprint(raw))
