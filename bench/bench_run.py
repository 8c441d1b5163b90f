"""What users run, end to end: the driver against a PyTorch twin of the same run, seconds per logged epoch.

    python bench/bench_run.py [--configs=default,64,64-overlap,mnist-mlp] [--nepoch=3] [--repeats=2]
                              [--datadir=DIR]

For each configuration, alternating processes (so that a noisy neighbour hits both alike):
  - `python cifar10_convnet.py --nepoch=N` with the configuration's overrides (or
    `python mnist_mlp.py --nepoch=N`), as a user runs it (its own BLAS and thread set-up, the
    published evaluation passes);
  - the twin: the same network, initialisation scale, update rule, minibatch order, data
    (cifar10.load with the same ZCA cache, or mnist.load) and the same log (epoch 0 evaluates L and V; every
    logged epoch trains, then evaluates L and V, in minibatches of EVAL_ROWS as the driver),
    in PyTorch with as many threads.
Both logs carry the elapsed seconds at each row; the figure is (elapsed at epoch N - at
epoch 0) / N, i.e. one training pass and its evaluations, best of --repeats.  With
--nepoch up to 5 every epoch is logged, as at the start of the published run.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

USER_ENV = dict(os.environ)     # each process starts from the user's environment
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import bench_train  # noqa: E402  (first: the machine's settings; the configurations, the twin, --name=value options)
from engine import machine  # noqa: E402
import numpy as np  # noqa: E402

ROW = re.compile(r'^(\d+) \| .* \| ([\d.]+) s$', re.M)


def driver_command(config):
    """The driver and its --name=value settings for one of bench_train's configurations."""
    setup = bench_train.CONFIGS[config]
    command = [os.path.join(ROOT, setup.driver)]
    if setup.convpool:
        filters, ds, st = setup.convpool
        command += ['--W1dim=(%d,5,5)' % filters, '--ds1=(%d,%d)' % ds] + (['--st1=(%d,%d)' % st] if st else [])
    return command


def seconds_per_epoch(log, nepoch):
    rows = {int(epoch): float(seconds) for epoch, seconds in ROW.findall(log)}
    if 0 not in rows or nepoch not in rows:
        sys.exit('no rows for epochs 0 and %d in this log:\n%s' % (nepoch, log[-3000:]))
    return (rows[nepoch] - rows[0]) / nepoch


def twin(config, nepoch, datadir):
    """The twin's run, printing rows `epoch | costL accL | costV accV | seconds` as the driver does."""
    bench_train.as_pytorch_runs(USER_ENV)
    import torch
    import torch.nn.functional as fn
    import cifar10
    import mnist
    torch.set_num_threads(os.cpu_count())
    print('# PyTorch %s, %d threads' % (torch.__version__, os.cpu_count()), flush=True)
    setup = bench_train.CONFIGS[config]
    data = cifar10.load(datadir) if setup.convpool else mnist.load(datadir)
    splits = {name: (torch.from_numpy(X).view(-1, *setup.xdim), torch.from_numpy(y.astype(np.int64)))
              for name, (X, y) in data.items()}
    logits, opt = bench_train.torch_twin(config, 'cpu')
    batch = bench_train.BATCH

    def sweep(name, train):
        X, y = splits[name]
        cost = correct = 0.0
        rows = batch if train else max(batch, bench_train.EVAL_ROWS)     # as the driver
        for i in range(0, len(y), rows):
            with torch.set_grad_enabled(train):
                out = logits(X[i:i + rows])
                loss = fn.cross_entropy(out, y[i:i + rows], reduction='sum')
            if train:
                opt.zero_grad()
                (loss / len(out)).backward()
                opt.step()
            cost += float(loss)
            correct += float((out.argmax(1) == y[i:i + rows]).sum())
        return cost / len(y), 100.0 * correct / len(y)

    t0 = time.time()
    for epoch in range(nepoch + 1):
        if epoch:
            sweep('L', True)
        row = sweep('L', False) + sweep('V', False)
        print('%d | %.6f %.2f | %.6f %.2f | %.1f s' % ((epoch,) + row + (time.time() - t0,)), flush=True)


def main(argv):
    opts = bench_train.options(argv, __doc__, {'nepoch': 3, 'repeats': 2, 'datadir': None, 'twin': None})
    nepoch = opts['nepoch']
    if not 1 <= nepoch <= 5:            # the twin logs (evaluates) every epoch, as the driver does up to 5
        sys.exit('error: --nepoch=%d: needs 1 to 5' % nepoch)
    datadir = opts['datadir'] or None
    if opts['twin']:
        return twin(opts['twin'], nepoch, datadir)
    configs, repeats = opts['configs'], opts['repeats']
    machine.require_theano_python()     # the driver's side runs in this Python
    print('# %s' % machine.device_description())
    print('# seconds per logged epoch (training pass + evaluation of L and V), epochs 1-%d, best of %d '
          'alternating processes a side' % (nepoch, repeats))
    print('%-12s %10s %10s %8s' % ('config', 'driver', 'twin', 'ratio'), flush=True)
    outdir = tempfile.mkdtemp(prefix='bench-run-')
    for config in configs:
        best = {}
        for _ in range(repeats):
            for side, command in (
                    ('driver', driver_command(config) + ['--nepoch=%d' % nepoch, '--outdir=' + outdir]
                     + (['--datadir=' + datadir] if datadir else [])),
                    ('twin', [os.path.abspath(__file__), '--twin=' + config, '--nepoch=%d' % nepoch]
                     + (['--datadir=' + datadir] if datadir else []))):
                out = subprocess.run([sys.executable] + command, env=USER_ENV, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(out.stdout + out.stderr)
                if side == 'driver' and not best:
                    print('\n'.join(line for line in out.stdout.splitlines()[:3]))
                seconds = seconds_per_epoch(out.stdout, nepoch)
                best[side] = min(best.get(side, seconds), seconds)
        print('%-12s %10.2f %10.2f %8.2f' % (config, best['driver'], best['twin'], best['driver'] / best['twin']),
              flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
