"""Getting data files safely: the data folder, verified downloads, safe extraction, DataError,
and the fingerprint that identifies a data set in the run records; the splits' rows in one
array, scaled and centred (both data sets' first preprocessing steps).

cifar10.py and mnist.py stand on this.
"""
import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.request

from . import PROJECT

OFFLINE = 'NNET_OFFLINE'        # set: no download is tried (the DataError names the file to put in place)


class DataError(Exception):
    """A data problem the user can fix; the message says how."""


def expand(path):
    """~ and $VARS expanded."""
    return os.path.expandvars(os.path.expanduser(path))


def resolve(path):
    """A folder setting as the scripts take it: expanded, and relative to the scripts' folder, so
    that the drivers and sweep.py agree whatever the current folder."""
    return os.path.join(PROJECT, expand(path))


def default_datadir():
    """$NNET_DATADIR (~ and $VARS expanded), else ./data beside the scripts."""
    if os.environ.get('NNET_DATADIR'):
        return expand(os.environ['NNET_DATADIR'])
    return os.path.join(PROJECT, 'data')


# ---------------------------------------------------------------- download helpers

def _progress(done, total, start):
    rate = done / max(time.time() - start, 1e-6) / 1e6
    if total:
        msg = '\r  %5.1f%% of %.1f MB (%.1f MB/s)' % (100.0 * done / total, total / 1e6, rate)
    else:
        msg = '\r  %.1f MB (%.1f MB/s)' % (done / 1e6, rate)
    sys.stderr.write(msg)
    sys.stderr.flush()


def md5sum(path):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def download(urls, path, md5, nbytes=None):
    """Fetch the first of `urls` that works to `path` and check its md5.

    Shows progress on stderr.  The file is written as path + '.part' and renamed only
    once it is complete and verified; a partial file is removed on any failure,
    Ctrl-C included.  Raises DataError naming the file to put in place by hand.
    With NNET_OFFLINE set (the test suite sets it), nothing is fetched: the same DataError.
    """
    failures = []
    if os.environ.get(OFFLINE):
        urls, failures = [], ['  not fetched: %s is set' % OFFLINE]
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + '.part'
    for url in urls:
        sys.stderr.write('downloading %s\n' % url)
        try:
            h = hashlib.md5()
            start = time.time()
            with urllib.request.urlopen(url, timeout=60) as response, open(part, 'wb') as f:
                total = int(response.headers.get('Content-Length') or nbytes or 0)
                done = 0
                for chunk in iter(lambda: response.read(1 << 20), b''):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    _progress(done, total, start)
            sys.stderr.write('\n')
            if h.hexdigest() != md5:
                raise DataError('md5 %s, expected %s' % (h.hexdigest(), md5))
            os.replace(part, path)
            return path
        except (OSError, DataError) as e:       # URLError and timeouts are OSErrors
            sys.stderr.write('\n')
            failures.append('  %s: %s' % (url, e))
        finally:
            if os.path.exists(part):
                os.remove(part)
    raise DataError('could not download %s:\n%s\nDownload it by hand (md5 %s) and put it at\n  %s'
                    % (os.path.basename(path), '\n'.join(failures), md5, os.path.abspath(path)))


def extract_tar(archive, dest, folder):
    """Extract `folder` from a .tar.gz into dest/folder, refusing paths that escape dest.

    Extracts into a temporary folder first and renames it, so an interrupted
    extraction never leaves a folder that a later run would trust.
    """
    tmp = os.path.join(dest, '.%s.extracting' % folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, 'r:gz') as tar:
            members = tar.getmembers()
            root = os.path.realpath(tmp)
            for m in members:
                target = os.path.realpath(os.path.join(tmp, m.name))
                if not (m.isfile() or m.isdir()) or os.path.commonpath([root, target]) != root:
                    raise DataError('%s: refusing unsafe member %r; delete the archive and retry'
                                    % (archive, m.name))
            tar.extractall(tmp, members)
        if not os.path.isdir(os.path.join(tmp, folder)):
            raise DataError('%s holds no %s/ folder; delete it and retry' % (archive, folder))
        os.replace(os.path.join(tmp, folder), os.path.join(dest, folder))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError('%s is damaged (%s); delete it and run again' % (archive, e))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Dataset(dict):
    """The splits {'L': (X, y), 'V': (X, y), 'T': (X, y)}, with .fingerprint: that of the raw data."""

    def __init__(self, splits, fingerprint):
        super().__init__(splits)
        self.fingerprint = fingerprint


def split_rows(raw, dtype):
    """{split: rows} for raw {split: (pixels (N, D) uint8, labels)}: the rows of all splits in one
    (N_total, D) array of dtype, uninitialised, each split's a view of it in order, so that
    nnet.Trainer takes that array as it is (no second copy of the data)."""
    import numpy as np                 # here: numpy loads after machine.set_up(), and the sweeps import this
    sizes = [len(y) for pixels, y in raw.values()]
    rows = np.empty((sum(sizes), raw['L'][0].shape[1]), dtype)
    ends = np.cumsum(sizes)
    return {name: rows[end - size:end] for name, size, end in zip(raw, sizes, ends)}


def scaled_and_centred(raw, splits):
    """The published preprocessing's first steps, into split_rows' arrays: pixels / 255, minus
    the training images' mean (fitted on L only); and that mean."""
    import numpy as np
    for name, (pixels, y) in raw.items():
        np.true_divide(pixels, np.asarray(255, splits[name].dtype), out=splits[name])
    mean = splits['L'].mean(axis=0, dtype=np.float64).astype(splits['L'].dtype)
    for x in splits.values():
        x -= mean
    return mean


def fingerprint(raw):
    """sha1 of the raw pixels and labels of each split, in split order: the same data, the same hash."""
    h = hashlib.sha1()
    for name in sorted(raw):
        for a in raw[name]:
            h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes() if not a.flags.c_contiguous else a.data)
    return h.hexdigest()
