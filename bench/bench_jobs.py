"""Wall-clock of one sweep run one at a time (--jobs=1) against several at once (--jobs=N).

    python bench/bench_jobs.py [--only=1,2,6] [--nepoch=5] [--jobs=2] [--datadir=DIR]

Runs `python sweep.py run --only=... --jobs=J -- --nepoch=N` for J = 1, then J = N, each into
a fresh output folder (so that neither skips a run the other recorded), after the same
runs with --nepoch=0 (ZCA whitening and compile caches warm for both), and prints the
machine (CPU, cores, BLAS kernels), each sweep's wall-clock, and each run's training
seconds and test accuracy: with N at once each run is slower, and the figure that counts
is the sweep's wall-clock.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def options(argv):
    chosen = {'only': '1,2,6', 'nepoch': '5', 'jobs': '2', 'datadir': None}
    for arg in argv:
        name, _, value = arg[2:].partition('=')
        if arg in ('-h', '--help'):
            sys.exit(__doc__)
        if not arg.startswith('--') or name not in chosen or not value:
            sys.exit('error: %s: options are --%s=value (see --help)' % (arg, ', --'.join(chosen)))
        chosen[name] = value
    return chosen


def sweep(chosen, jobs, outdir):
    """(wall-clock seconds, records) of one sweep into outdir."""
    command = [sys.executable, os.path.join(ROOT, 'sweep.py'), 'run', '--only=' + chosen['only'], '--jobs=%d' % jobs,
               '--', '--nepoch=' + chosen['nepoch'], '--outdir=' + outdir]
    if chosen['datadir']:
        command.append('--datadir=' + chosen['datadir'])
    start = time.time()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        sys.exit('the sweep with --jobs=%d failed:\n%s' % (jobs, done.stdout[-3000:]))
    records = []
    for path in sorted(glob.glob(os.path.join(outdir, '*.record.json'))):
        with open(path) as f:
            records.append(json.load(f))
    return seconds, records


def main(argv):
    chosen = options(argv)
    jobs = int(chosen['jobs'])
    with tempfile.TemporaryDirectory() as scratch:
        # first the same runs with no epoch: the ZCA whitening fitted and the code compiled for both
        sweep(dict(chosen, nepoch='0'), 1, os.path.join(scratch, 'warm-up'))
        results = {j: sweep(chosen, j, os.path.join(scratch, 'jobs%d' % j)) for j in (1, jobs)}
    some = results[1][1][0]
    print('# %s; BLAS %s; --only=%s --nepoch=%s' % (some['device'], some['blas'], chosen['only'], chosen['nepoch']))
    for j, (seconds, records) in results.items():
        runs = ', '.join('%s filters%s: train %.1f s, test %.2f%%' % (
            r['settings']['W1dim'][0], ' st1=%s' % r['settings']['st1'] if r['settings']['st1'] else '',
            r['seconds']['train'], r['test'][1]) for r in sorted(records, key=lambda r: r['date']))
        print('--jobs=%d: %.1f s wall-clock (%s)' % (j, seconds, runs))
    print('ratio --jobs=%d / --jobs=1: %.2f' % (jobs, results[jobs][0] / results[1][0]))


if __name__ == '__main__':
    main(sys.argv[1:])
