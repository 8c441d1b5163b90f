"""Running many runs of cifar10_convnet.py: the plan (configurations crossed with a grid, each
point checked by the driver's own rules), here `jobs` at a time with claims and shared cores
or a GPU each, and what GNU parallel and Slurm run.  sweep.py is its command line.
"""
import ast
import collections
import concurrent.futures
import hashlib
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

from . import PROJECT, machine
from .claims import Heartbeat, SHARED_CORES, claims_folder, cpu_count, take_claim
from .records import (CONFIGS, RECORDS, as_recorded, device_label, matches, read_records, settings_key,
                      stopped_file)

DRIVER = os.path.join(PROJECT, 'cifar10_convnet.py')


def driver_defaults(extra=(), what=''):
    """(settings, device) of cifar10_convnet.py with these overrides, from its --help=json; a
    value its rules refuse stops here with the driver's line (after `what`, if given)."""
    probe = subprocess.run([sys.executable, DRIVER] + list(extra) + ['--help=json'], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(what + probe.stderr.strip())
    described = json.loads(probe.stdout.strip().splitlines()[-1])      # after the overrides' lines
    return described['settings'], described['device']


def setting(name, value):
    """name=value, the value a Python literal without spaces."""
    return '%s=%s' % (name, repr(value).replace(', ', ','))


def setting_arg(name, value):
    """--name=value as the driver reads it."""
    return '--' + setting(name, value)


# A run of a sweep: a CONFIGS entry, the point of the grid crossed with it ({name: value}), the
# driver's settings for both, and the driver's arguments that make them.
Run = collections.namedtuple('Run', 'entry point settings args')


def point_text(run):
    return ' '.join(setting(k, v) for k, v in run.point.items())


def label(run):
    """The run in a line: its configuration's number and its point of the grid."""
    return ('%d %s' % (run.entry[0], point_text(run))).strip()


def describe(run):
    """The run for the log: its configuration and its point of the grid."""
    return '%d. %s%s' % (run.entry[0], run.entry[1], ', with ' + point_text(run) if run.point else '')


def grid_points(text):
    """--grid="eta=[0.005,0.01] mu=[0.9,0.95]": every combination of the values, as {name: value}."""
    axes = []
    for part in re.split(r'\s+(?=\w+=)', text.strip()):
        name, _, values = part.partition('=')
        try:
            values = ast.literal_eval(values)
        except (ValueError, SyntaxError):
            values = None
        if not re.fullmatch(r'\w+', name) or type(values) is not list or not values or name in dict(axes):
            sys.exit('error: --grid=%s: needs name=[value,...] for each setting, once, in Python literals, e.g. '
                     '--grid="eta=[0.005,0.01,0.02] mu=[0.9,0.95]"' % text)
        axes.append((name, values))
    return [dict(zip([name for name, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]


def plan(only, points, extra):
    """(device, runs): each configuration asked for crossed with each point of the grid, with the
    settings its driver process will run with; each point's values (and the extra options) are
    checked by the driver's own rules first, one --help=json probe a point."""
    given = {arg[2:].split('=', 1)[0] for arg in extra if arg.startswith('--')}
    runs, device = [], None
    for point in points:
        point_args = [setting_arg(k, v) for k, v in point.items()]
        settings, device = driver_defaults(point_args + list(extra), '--grid point %s: ' % ' '.join(point_args)
                                           if point else '')
        for entry in CONFIGS:
            if not only or entry[0] in only:
                own = {k: v for k, v in entry[2].items() if k not in point and k not in given}
                runs.append(Run(entry, point, dict(settings, **as_recorded(own)),
                                [setting_arg(k, v) for k, v in own.items()] + point_args))
    return device, runs


def to_run(runs, again, device, data_fingerprint, records, folder=RECORDS):
    """(run, already recorded, the stopped run's file to go on from or None) for each run."""
    return [(run, not again and any(matches(r, run.settings, device, data_fingerprint) for r in records),
             stopped_file(records, run.settings, device, data_fingerprint, folder)) for run in runs]


def claim_path(folder, run, device, data_fingerprint):
    key = json.dumps([settings_key(run.settings), device_label({'device': device}), data_fingerprint])
    return os.path.join(claims_folder(folder), hashlib.sha1(key.encode()).hexdigest()[:16] + '.claim')


def wants_gpu():
    return machine.user_flags().get('device', '').startswith('cuda')


def visible_gpus():
    """The GPU numbers device=cudaN can take: CUDA_VISIBLE_DEVICES's count, else nvidia-smi's list."""
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    if visible is not None:
        return list(range(len([d for d in visible.split(',') if d.strip()])))
    try:
        listed = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return list(range(len(re.findall(r'^GPU \d+', listed, re.M))))


def gpu_numbers(text, jobs):
    """With device=cuda: the GPUs the runs take, one run on each at a time (--devices=0,1, else all
    when more than one run goes at once); None to leave THEANO_FLAGS' device as it is."""
    if not wants_gpu():
        if text:
            sys.exit('error: --devices=%s: needs THEANO_FLAGS=device=cuda (the runs go on the CPU)' % text)
        return None
    if text:
        try:
            numbers = [int(n) for n in text.split(',')]
        except ValueError:
            sys.exit('error: --devices=%s: needs GPU numbers, e.g. --devices=0,1' % text)
    elif jobs == 1:
        return None
    else:
        numbers = visible_gpus()
    if len(numbers) < jobs:
        sys.exit('error: --jobs=%d: needs as many GPUs, one a run; %s' % (
            jobs, 'these are %s' % ','.join(map(str, numbers)) if numbers else 'nvidia-smi lists none'))
    return numbers


def threads_each(jobs):
    """The threads of each of `jobs` runs at once on the CPU, to start with."""
    return max(1, cpu_count() // jobs)


def run_environment(threads, gpu, claims=None):
    """The driver's environment: its share of the cores (threads to start with, unless the user
    set them, then CoreShare divides the cores among the runs claimed in `claims`), or
    its own GPU."""
    env = dict(os.environ)
    if threads:
        if claims and not {'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS'} & set(os.environ):
            env[SHARED_CORES] = claims
        for name in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
            env.setdefault(name, str(threads))
    if gpu is not None:
        flags = [f for f in env.get('THEANO_FLAGS', '').split(',') if f and not f.startswith('device=')]
        env['THEANO_FLAGS'] = ','.join(flags + ['device=cuda%d' % gpu])
    return env


class Sweep:
    """The runs of one `sweep.py run`, up to `jobs` at a time, each claimed while it goes on."""

    def __init__(self, runs, again, device, data_fingerprint, extra, folder, jobs, gpus):
        self.runs, self.again, self.device, self.data = runs, again, device, data_fingerprint
        self.extra, self.folder, self.jobs = extra, folder, jobs
        # on the CPU, cores / N threads to start with; then each run follows its share (CoreShare)
        self.threads = None if gpus is not None or jobs == 1 else threads_each(jobs)
        self.gpus = None
        if gpus is not None:
            self.gpus = queue.Queue()
            for n in gpus[:jobs]:
                self.gpus.put(n)
        self.print_lock, self.stopping, self.failed = threading.Lock(), False, []
        self.processes = set()
        self.heartbeat = Heartbeat()

    def say(self, run, line):
        with self.print_lock:
            sys.stdout.write(('[%s] ' % label(run) if self.jobs > 1 else '') + line.rstrip('\n') + '\n')
            sys.stdout.flush()

    def stop(self, signum, frame):
        """SIGTERM (a scheduler's time limit, `kill`, scancel) or Ctrl-C: each run goes on to save
        where it is (a terminal's Ctrl-C reaches the drivers itself), and no other starts."""
        self.stopping = True
        if signum == signal.SIGTERM:
            for proc in list(self.processes):
                proc.send_signal(signal.SIGTERM)

    def go(self):
        """Every run, `jobs` at a time; returns the runs that did not end well."""
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.heartbeat.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
                pending = {pool.submit(self.attempt, run) for run in self.runs}
                while pending:      # a timeout, so that signals reach this (the main) thread
                    done, pending = concurrent.futures.wait(pending, timeout=1)
                    for future in done:
                        future.result()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.failed

    def attempt(self, run):
        """The run, unless it is done, or a live process elsewhere holds its claim."""
        if self.stopping or self.failed:
            return
        claim = claim_path(self.folder, run, self.device, self.data)
        holder = take_claim(claim, label(run))
        if holder:
            self.say(run, '# %s: running in another sweep (%s); skipped' % (describe(run), holder))
            return
        with self.heartbeat.lock:
            self.heartbeat.held.add(claim)
        try:
            records = read_records(self.folder)     # as they are now: another sweep may have done it
            if not self.again and any(matches(r, run.settings, self.device, self.data) for r in records):
                self.say(run, '# %s: already recorded on %s, skipped' % (describe(run),
                                                                        device_label({'device': self.device})))
                return
            stopped = stopped_file(records, run.settings, self.device, self.data, self.folder)
            gpu = self.gpus.get() if self.gpus else None
            try:
                code = self.execute(run, ['--resume=' + stopped] if stopped else run.args, gpu)
            finally:
                if gpu is not None:
                    self.gpus.put(gpu)
            if code != 0:
                self.failed.append(run)
                self.say(run, '# %s: stopped with exit code %d; run the sweep again to resume' % (describe(run), code))
        finally:
            with self.heartbeat.lock:
                self.heartbeat.held.discard(claim)
            try:
                os.remove(claim)
            except FileNotFoundError:
                pass

    def execute(self, run, args, gpu):
        """One driver process; its output to its log file and to the terminal.  Its exit code."""
        command = [sys.executable, DRIVER] + args + self.extra
        where = ('; %d threads to start with' % self.threads if self.threads else '') + (
            '; GPU cuda%d' % gpu if gpu is not None else '')
        self.say(run, '# %s: %s%s' % (describe(run), ' '.join(command[1:]), where))
        logs = os.path.join(self.folder, 'logs')       # beside the records
        os.makedirs(logs, exist_ok=True)
        name = re.sub(r'[^\w.=,-]', '', label(run).replace(' ', '-'))
        with open(os.path.join(logs, '%s-%s.log' % (name, time.strftime('%Y%m%d-%H%M%S'))), 'a') as f:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=run_environment(self.threads, gpu, claims_folder(self.folder)))
            self.processes.add(proc)
            if self.stopping:           # a signal came as it started
                proc.send_signal(signal.SIGTERM)
            for line in proc.stdout:
                self.say(run, line)
                f.write(line)
                f.flush()
            code = proc.wait()
            self.processes.discard(proc)
        return code
