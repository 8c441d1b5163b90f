"""Reproduce the published experiment table, and sweep beyond it: run the configurations (one
after another, several at once, or handed to GNU parallel or Slurm), then tabulate and plot them.

    python sweep.py run [--only=1,2,6] [--grid="eta=[0.005,0.01] mu=[0.9,0.95]"] [--jobs=N]
                        [--devices=0,1] [--again] [-- any --name=value for the driver]
    python sweep.py commands [the same choices]   # one shell line per pending run (parallel -j N)
    python sweep.py slurm [the same choices] [--partition=P] [--gres=gpu:1] [--time=2:00:00]
                          [--cpus-per-task=N] [--submit]     # a job array: task i runs pending run i
    python sweep.py table                 # RESULTS.md, docs/history.md, README's table, results/*.png

A run is one `python cifar10_convnet.py --name=value ...` process: a published configuration
(--only picks them) with one point of the grid (each setting of --grid crossed with the
others and with the configurations; every value checked by the driver's own rules before
anything starts) and the driver options given.  The device comes from THEANO_FLAGS, as always.
`run` skips the runs already recorded as completed with the same settings on the same device
and data, so an interrupted sweep resumes where it stopped: a run whose last attempt was
stopped (Ctrl-C, SIGTERM from `kill` or a scheduler's time limit) goes on from that run's
minibatch (--resume=its parameter file), one killed outright from its last logged row
(--resume=its checkpoint); --again runs completed ones anyway (after a change of code, flags
or BLAS, which the settings do not capture: the records and the table keep both runs).
--jobs=N runs N at once: on the CPU they share the cores (cores / N threads each, and the
cores of a run that ends go to those still going), with device=cuda each on a GPU of its own
(--devices=0,1 names them; else every GPU there is).  Each run's record is a file of its own
in the drivers' outdir, so any number of sweeps, on this machine or on the nodes of a
cluster sharing the folder, write there at once; a run is claimed (outdir/claims/) while it
goes on, so that two sweeps never run it twice at the same time.
`table` needs matplotlib for the pictures (pip install -r requirements-plot.txt).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from engine import download, report, sweeping
from engine.claims import cpu_count
from engine.records import CONFIGS, device_label, read_records, records_folder
from engine.sweeping import (Sweep, describe, gpu_numbers, grid_points, label, plan, setting_arg, threads_each,
                             to_run)

HERE = os.path.dirname(os.path.abspath(__file__))


def configuration_numbers(text):
    """--only=1,2,6 as a set of CONFIGS numbers; anything else refused with one line."""
    numbers = {entry[0] for entry in CONFIGS}
    try:
        only = {int(n) for n in text.split(',')}
    except ValueError:
        only = None
    if not only or not only <= numbers:
        sys.exit('error: --only=%s: needs numbers of the published configurations, from %s, e.g. --only=1,2,6'
                 % (text, ', '.join(map(str, sorted(numbers)))))
    return only


def positive(name, text):
    if not re.fullmatch(r'[1-9]\d*', text):
        sys.exit('error: --%s=%s: needs a positive integer' % (name, text))
    return int(text)


class Choices:
    """What run, commands and slurm are asked: the runs (--only, --grid, the driver's options),
    --again, --jobs, --devices, and the options of their own (`own`: name -> value or True)."""

    def __init__(self, argv, own=()):
        self.only, self.points, self.again, self.jobs, self.devices, self.extra = None, [{}], False, 1, None, []
        self.own = {}
        for arg in argv:
            name, _, value = arg[2:].partition('=')
            if arg.startswith('--only='):
                self.only = configuration_numbers(value)
            elif arg.startswith('--grid='):
                self.points = grid_points(value)
            elif arg == '--again':
                self.again = True
            elif arg.startswith('--jobs='):
                self.jobs = positive('jobs', value)
            elif arg.startswith('--devices='):
                self.devices = value
            elif arg.startswith('--') and name in own:
                self.own[name] = value if '=' in arg else True
            elif arg != '--':               # what follows a bare -- goes to the driver, as the rest
                self.extra.append(arg)

    def pending(self):
        """(device, the data's fingerprint, the records' folder, [(run, recorded, stopped file or
        None)] of the runs asked for)."""
        device, runs = plan(self.only, self.points, self.extra)
        import cifar10
        base = runs[0].settings
        try:
            data_fingerprint = cifar10.fingerprint(cifar10.load_raw(base['datadir'] and
                                                                    download.resolve(base['datadir'])))
        except cifar10.DataError as e:
            sys.exit('error: %s' % e)
        folder = records_folder(base)
        return device, data_fingerprint, folder, to_run(runs, self.again, device, data_fingerprint,
                                                        read_records(folder), folder)

    def single_run(self, run):
        """A command line of this sweep for this run alone: itself a sweep, which skips the run if
        done and resumes it if stopped."""
        return ([sys.executable, os.path.join(HERE, 'sweep.py'), 'run', '--only=%d' % run.entry[0]]
                + (['--again'] if self.again else [])
                + [setting_arg(k, v) for k, v in run.point.items()] + self.extra)


def run(argv):
    choices = Choices(argv)
    gpus = gpu_numbers(choices.devices, choices.jobs)
    device, data_fingerprint, folder, planned = choices.pending()
    runs = []
    for run, recorded, stopped in planned:
        if recorded:
            print('# %s: already recorded on %s, skipped' % (describe(run), device_label({'device': device})),
                  flush=True)
        else:
            runs.append(run)
    if choices.jobs > 1 and runs:
        print('# %d runs, %d at a time%s' % (len(runs), choices.jobs, ' on GPUs ' + ','.join(map(str, gpus))
                                              if gpus else ', the %d cores shared among them' % cpu_count()),
              flush=True)
    failed = Sweep(runs, choices.again, device, data_fingerprint, choices.extra, folder, choices.jobs, gpus).go()
    if failed:
        sys.exit('# %d of %d runs did not complete (%s); run the sweep again to resume them'
                 % (len(failed), len(runs), '; '.join(label(r) for r in failed)))


def commands(argv):
    """One shell line per pending run, each a sweep of that run alone (`| parallel -j N`)."""
    choices = Choices(argv)
    device, data_fingerprint, folder, planned = choices.pending()
    threads = threads_each(choices.jobs) if choices.jobs > 1 else None
    for run, recorded, stopped in planned:
        if not recorded:
            prefix = ['env', 'OMP_NUM_THREADS=%d' % threads, 'OPENBLAS_NUM_THREADS=%d' % threads] if threads else []
            print(shlex.join(prefix + choices.single_run(run)))


SLURM_OPTIONS = ('partition', 'gres', 'time', 'cpus-per-task', 'mem', 'account', 'qos', 'submit')


def slurm(argv):
    """A Slurm job-array script: task i runs pending run i (a sweep of that run alone, so that a
    task ended by its time limit or scancel goes on from where it stopped when resubmitted)."""
    choices = Choices(argv, SLURM_OPTIONS)
    device, data_fingerprint, folder, planned = choices.pending()
    lines = [choices.single_run(run) for run, recorded, stopped in planned if not recorded]
    if not lines:
        print('# nothing to run: every run asked for is recorded in %s' % folder)
        return
    os.makedirs(os.path.join(folder, 'logs'), exist_ok=True)
    os.makedirs(os.path.join(folder, 'slurm'), exist_ok=True)
    stem = os.path.join(folder, 'slurm', 'sweep-%s' % time.strftime('%Y%m%d-%H%M%S'))
    script, n = stem + '.sbatch', 1
    while os.path.exists(script):       # another array written this second
        script, n = '%s-%d.sbatch' % (stem, n), n + 1
    options = ['--job-name=cifar10-sweep', '--array=0-%d' % (len(lines) - 1),
               '--output=%s' % os.path.join(folder, 'logs', 'slurm-%A_%a.out'), '--open-mode=append']
    options += ['--%s=%s' % (k, v) for k, v in choices.own.items() if k != 'submit']
    body = ['#!/bin/bash', '# Runs of cifar10_convnet.py, one a task, written by: python sweep.py slurm %s'
            % shlex.join(argv),
            '# Submit with sbatch; submitted again (after a time limit, scancel), each task goes on where its run',
            '# stopped and a completed run is skipped.'] + ['#SBATCH ' + o for o in options]
    body += ['', 'cd %s' % shlex.quote(HERE),
             '# threads: the cores Slurm gave the task (--cpus-per-task; 1 if not asked)',
             'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}',
             'export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}']
    if os.environ.get('THEANO_FLAGS'):
        body.append('export THEANO_FLAGS=%s' % shlex.quote(os.environ['THEANO_FLAGS']))
    body += ['case "$SLURM_ARRAY_TASK_ID" in']
    body += ['  %d) exec %s ;;' % (i, shlex.join(line)) for i, line in enumerate(lines)]
    body += ['esac', 'echo "task $SLURM_ARRAY_TASK_ID: no such run in this array" >&2', 'exit 2']
    with open(script, 'w') as f:
        f.write('\n'.join(body) + '\n')
    print('# wrote %s: %d tasks; logs: %s' % (script, len(lines), os.path.join(folder, 'logs', 'slurm-JOB_TASK.out')))
    if choices.own.get('submit'):
        if not shutil.which('sbatch'):
            sys.exit('error: --submit: sbatch is not on PATH here; submit %s from a Slurm login node' % script)
        submitted = subprocess.run(['sbatch', script], capture_output=True, text=True)
        sys.stdout.write(submitted.stdout)
        if submitted.returncode != 0:
            sys.exit('error: sbatch %s: %s' % (script, submitted.stderr.strip()))
    else:
        print('sbatch %s' % script)


def table(argv):
    report.write_page(sweeping.driver_defaults(argv)[0])


COMMANDS = {'run': run, 'commands': commands, 'slurm': slurm, 'table': table}

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    from engine import machine      # all run the driver (its settings); a Python that cannot is named here
    machine.require_theano_python()
    try:
        COMMANDS[sys.argv[1]](sys.argv[2:])
    except KeyboardInterrupt:   # while planning: nothing started yet (once runs go, Ctrl-C lets them save)
        sys.exit('# interrupted before any run started')
