"""Data start-up: CIFAR-10 load + ZCA on a cold cache and on a warm one.

    python bench/bench_data.py [DATADIR]

Uses the batches in DATADIR/cifar-10-batches-py (default: the scripts' data folder)
through a temporary data folder, so the real cache is left alone.  Targets:
cold at most 10 s, warm at most 2 s on a 2-core machine.
"""
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from engine import machine  # noqa: E402

machine.set_up(theano=False)    # numpy's BLAS kernels, as the drivers choose them
import cifar10  # noqa: E402


def main(argv):
    if len(argv) > 1 and argv[1].startswith('-'):
        print(__doc__)
        return
    source = os.path.join(argv[1] if len(argv) > 1 else cifar10.default_datadir(), cifar10.FOLDER)
    tmp = tempfile.mkdtemp(prefix='bench-data-')
    try:
        os.symlink(os.path.abspath(source), os.path.join(tmp, cifar10.FOLDER))
        for label in ('cold', 'warm', 'warm'):
            t = time.perf_counter()
            data = cifar10.load(tmp, log=lambda line: print('#   ' + line))
            seconds = time.perf_counter() - t
            print('%s cache: data ready in %.2f s (%s)' % (
                label, seconds, ', '.join('%s %s' % (k, v[0].shape) for k, v in data.items())), flush=True)
            del data
            cifar10.flush_cache()
    finally:
        shutil.rmtree(tmp)


if __name__ == '__main__':
    main(sys.argv)
