"""Theano's compile with an empty compile cache: g++ on every core against one at a time.

    python bench/bench_compile.py [--configs=default,64-overlap,mnist-mlp] [--rounds=2]

Each measurement is a fresh process with a compile cache of its own, empty, that builds a
configuration's network and nnet.Trainer as its driver does (bench_train.py's CONFIGS, on
two minibatches of zeros), as a user's first run does.  "one at a time" is Theano's own way:
machine.compile_in_parallel told to find no module to compile ahead.  Prints, for each, the
seconds of the Trainer's compile, the whole process's seconds (imports and the modules Theano
builds as it loads included), how many g++ runs it made and how many of those ran ahead of
Theano's own compile (all on every core, none one at a time); the two ways alternate, so that a
noisy neighbour hits both alike, and the last line of a configuration is the ratio of the
medians of the compile seconds.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import bench_train
from bench_train import BATCH, CONFIGS, K
from engine import machine

WAYS = {'every core': 'parallel', 'one at a time': 'sequential'}


def child(config, way):
    """In the measured process: compile the configuration's Trainer; one JSON line."""
    machine.set_up()
    import numpy as np
    from theano.gof import cmodule
    if way == 'sequential':
        machine._modules_to_compile = lambda nodes: iter(())
    loads, compile_str = [], cmodule.GCC_compiler.compile_str       # per g++ run: does Theano load it itself
    cmodule.GCC_compiler.compile_str = staticmethod(
        lambda *a, **k: loads.append(k.get('py_module', True)) or compile_str(*a, **k))
    rows = 2 * BATCH
    X = np.zeros((rows, int(np.prod(CONFIGS[config].xdim))), 'float32')
    start = time.perf_counter()
    bench_train.theano_trainer(config, X, np.arange(rows, dtype='int32') % K, 'auto')
    print(json.dumps({'compile': time.perf_counter() - start, 'gxx': len(loads), 'ahead': loads.count(False)}))


def measure(config, way):
    folder = tempfile.mkdtemp(prefix='bench-compile-')
    env = dict(os.environ, THEANO_FLAGS=','.join(filter(None, [os.environ.get('THEANO_FLAGS', ''),
                                                                'base_compiledir=' + folder])))
    try:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child=%s,%s' % (config, way)],
                             env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stdout + out.stderr)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]), process=time.perf_counter() - start)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv):
    if argv and argv[0].startswith('--child='):
        return child(*argv[0].split('=', 1)[1].split(','))
    opts = bench_train.options(argv, __doc__, {'rounds': 2})
    machine.set_up()
    from engine import runlog
    runlog.print_run_info()
    machine.require_gpu_if_asked()          # not CPU figures under a GPU label
    print('# seconds of the Trainer\'s compile (the whole process), g++ runs (of them ahead); empty compile cache, '
          '%d alternating rounds' % opts['rounds'])
    print('%-12s %5s %32s %32s' % ('config', 'round', *WAYS))
    for config in opts['configs']:
        seconds = {way: [] for way in WAYS}
        for round in range(1, opts['rounds'] + 1):
            cells = []
            for name, way in WAYS.items():
                m = measure(config, way)
                seconds[name].append(m['compile'])
                cells.append('%.1f (%.1f), %d g++ (%d ahead)' % (m['compile'], m['process'], m['gxx'], m['ahead']))
            print('%-12s %5d %32s %32s' % (config, round, *cells), flush=True)
        every, one = (statistics.median(seconds[name]) for name in WAYS)
        print('%-12s every core / one at a time: %.2f' % (config, every / one), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
