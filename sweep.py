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
import ast
import collections
import concurrent.futures
import datetime
import glob
import hashlib
import itertools
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import download

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, 'cifar10_convnet.py')
RECORDS = os.path.join(HERE, 'runs')                  # the drivers' outdir: every run's record and parameters
RECORD_SUFFIX = '.record.json'                        # a run's record: its parameter file's name, this suffix
LEGACY_RECORDS = 'results.jsonl'                      # where older versions appended their records
PAGE = os.path.join(HERE, 'RESULTS.md')              # the newest run of each configuration, the pictures
HISTORY = os.path.join(HERE, 'docs', 'history.md')    # every run
FRONT = os.path.join(HERE, 'README.md')               # the results at a glance
PICTURES = os.path.join(HERE, 'results')

# number, description, overrides of cifar10_convnet.py, published (CPU, Tesla K20c) test % and wall-clock
CONFIGS = [
    (1, '16 filters (the default run)', {}, ('73.69% 61m45s', '73.85% 10m19s')),
    (2, '64 filters', {'W1dim': (64, 5, 5)}, ('', '75.92% 13m01s')),
    (3, '256 filters', {'W1dim': (256, 5, 5)}, ('', '75.99% 20m53s')),
    (4, '64 filters, two ReLU layers (H2 = H3 = 1000)', {'W1dim': (64, 5, 5), 'H3': 1000},
     ('', '75.51% 13m39s')),
    (5, '64 filters, pool 2x2 (H1 = 12544)', {'W1dim': (64, 5, 5), 'ds1': (2, 2)}, ('', '72.72% 15m55s')),
    (6, '64 filters, overlapping pool 4x4 stride 2x2', {'W1dim': (64, 5, 5), 'st1': (2, 2)},
     ('', 'abandoned: 30 min an epoch, GPU idle')),
]
# settings that do not change what is trained (conv: the same values, computed another way;
# quickL: only how the training columns are logged)
NOT_COMPARED = {'datadir', 'outdir', 'datanote', 'conv', 'quickL', 'resume'}
PUBLISHED_SIZES = {'L': 40000, 'V': 10000, 'T': 10000}


def read_records(folder=RECORDS):
    """Every run's record in folder, oldest first: a .record.json file each, and the lines of
    results.jsonl, to which older versions appended (a damaged one skipped with a warning)."""
    records = []
    legacy = os.path.join(folder, LEGACY_RECORDS)
    if os.path.exists(legacy):
        with open(legacy) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        sys.stderr.write('warning: %s, line %d is damaged; skipped\n' % (legacy, number))
    for path in sorted(glob.glob(os.path.join(folder, '*' + RECORD_SUFFIX))):
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, ValueError) as e:
            sys.stderr.write('warning: %s cannot be read (%s); skipped\n' % (path, e))
    return sorted(records, key=lambda r: r.get('date', ''))


def records_folder(base):
    """The drivers' outdir, resolved as the drivers resolve it: where the records are."""
    return download.resolve(base['outdir'])


def driver_defaults(extra=(), what=''):
    """(settings, device) of cifar10_convnet.py with these overrides, from its --help=json; a
    value its rules refuse stops here with the driver's line (after `what`, if given)."""
    probe = subprocess.run([sys.executable, DRIVER] + list(extra) + ['--help=json'], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(what + probe.stderr.strip())
    described = json.loads(probe.stdout.strip().splitlines()[-1])      # after the overrides' lines
    return described['settings'], described['device']


def settings_key(settings):
    return json.dumps({k: v for k, v in sorted(settings.items()) if k not in NOT_COMPARED})


def as_recorded(overrides):
    """Overrides as the JSON records hold them (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


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


def same_settings(record, settings):
    """The record trained with these settings: every setting that changes training as asked."""
    return record.get('script') == 'cifar10_convnet' and settings_key(record['settings']) == settings_key(settings)


def runs_config(record, config_overrides, base):
    """The record trained this configuration at these base settings."""
    return same_settings(record, dict(base, **as_recorded(config_overrides)))


def ran_here(record, settings, device, data_fingerprint):
    """A run with these settings on this device (any GPU of its kind) and these data, whatever its status."""
    return (same_settings(record, settings) and device_label(record) == device_label({'device': device})
            and record.get('data_fingerprint') == data_fingerprint)


def matches(record, settings, device, data_fingerprint):
    """A completed run with these settings on this device and these data: a sweep skips it."""
    return ran_here(record, settings, device, data_fingerprint) and record.get('status') == 'completed'


def stopped_file(records, settings, device, data_fingerprint, folder):
    """The file to go on from if the latest run with these settings here did not finish: a stopped
    run's parameter file (its record says where it stopped), or the checkpoint of a run killed
    outright, which wrote no record (the newest one in the records' folder whose settings,
    device and data are these, younger than the last record here, its process gone).  None if
    the latest run finished, or nothing can go on."""
    runs = [r for r in records if ran_here(r, settings, device, data_fingerprint)]
    if runs and runs[-1].get('status') == 'interrupted' and 'position' in runs[-1]:
        path = params_path(runs[-1], folder)
        if os.path.exists(path):
            return path
    last_end = (datetime.datetime.fromisoformat(runs[-1]['date']).timestamp() + runs[-1]['seconds'].get('total', 0)
                if runs else 0)
    killed = []
    for path in glob.glob(os.path.join(folder, 'cifar10_convnet-*.checkpoint.npz')):
        pid = re.search(r'-\d{8}-\d{6}-(\d+)(-\d+)?\.checkpoint\.npz$', path)     # runlog.new_params_path's
        if os.path.getmtime(path) <= last_end or (pid and process_alive(int(pid.group(1)))):
            continue
        try:
            saved = saved_settings(path)
        except SAVED_SETTINGS_ERRORS:
            continue                        # not one a run finished writing
        record = {'script': 'cifar10_convnet', 'settings': {k: v for k, v in saved.items() if k in settings},
                  'device': saved.get('device'), 'data_fingerprint': saved.get('data_fingerprint')}
        if ran_here(record, settings, device, data_fingerprint):
            killed.append((os.path.getmtime(path), path))
    return max(killed)[1] if killed else None


# what saved_settings raises for a file that is no parameter file of ours
SAVED_SETTINGS_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile)


def saved_settings(path):
    """The settings a parameter file or checkpoint was saved with (nnet.Network.save's JSON)."""
    import numpy as np
    with np.load(path) as f:
        return json.loads(str(f['settings']))


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # someone else's: alive
        pass
    return True


def to_run(runs, again, device, data_fingerprint, records, folder=RECORDS):
    """(run, already recorded, the stopped run's file to go on from or None) for each run."""
    return [(run, not again and any(matches(r, run.settings, device, data_fingerprint) for r in records),
             stopped_file(records, run.settings, device, data_fingerprint, folder)) for run in runs]


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


# ---------------------------------------------------------------- claims: one process runs a run

CLAIM_HEARTBEAT = 30        # seconds between touches of a held claim
CLAIM_SILENT = 180          # a claim not touched for this long is its process's no more (another node's)


def claims_folder(folder):
    return os.path.join(folder, 'claims')


def claim_path(folder, run, device, data_fingerprint):
    key = json.dumps([settings_key(run.settings), device_label({'device': device}), data_fingerprint])
    return os.path.join(claims_folder(folder), hashlib.sha1(key.encode()).hexdigest()[:16] + '.claim')


def read_claim(path):
    """What a claim says of its holder ({} while it is being written), None if it is gone."""
    try:
        with open(path) as f:
            holder = json.loads(f.read() or '{}')
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def take_claim(path, what):
    """None once this process holds the claim at path (created exclusively: atomic, on NFS 3 and
    later too), else a description of the live process holding it.  A claim whose process is
    gone (this host) or silent for CLAIM_SILENT seconds (any host) is taken over."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = claim_holder(path)
            if holder:
                return holder
            continue
        with os.fdopen(fd, 'w') as f:
            json.dump({'host': platform.node(), 'pid': os.getpid(), 'run': what,
                       'since': datetime.datetime.now().isoformat(timespec='seconds')}, f)
        return None


def claim_holder(path):
    """Who holds the claim at path, or None after removing it if its holder is gone."""
    try:
        silent = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return None
    holder = read_claim(path)
    if holder is None:
        return None
    gone = holder.get('host') == platform.node() and not process_alive(holder.get('pid', 0))
    if not gone and silent < CLAIM_SILENT:
        return '%s, process %s on %s since %s' % (path, holder.get('pid', '?'), holder.get('host', '?'),
                                                   holder.get('since', '?'))
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return None


class Heartbeat(threading.Thread):
    """Touches the claims this process holds every CLAIM_HEARTBEAT seconds."""

    def __init__(self):
        super().__init__(daemon=True)
        self.held, self.lock = set(), threading.Lock()

    def run(self):
        while True:
            time.sleep(CLAIM_HEARTBEAT)
            with self.lock:
                for path in self.held:
                    try:
                        os.utime(path)
                    except OSError:
                        pass


SHARED_CORES = 'NNET_SHARED_CORES'     # names a sweep's claims to a driver whose cores it shares


class CoreShare:
    """In a run of `sweep.py run --jobs=N` on the CPU (SHARED_CORES names the sweep's claims):
    the cores this process may use divided among the runs claimed there from this host, their
    sweeps alive, looked at once a second; set_threads(n) when this run's share changes, so
    that the cores of a run that ends go to those still going.  Call it between minibatches."""

    def __init__(self, folder, set_threads, cores=None, clock=time.time):
        self.folder, self.set_threads, self.clock = folder, set_threads, clock
        self.cores = cores or cpu_count()
        self.threads, self.last = None, 0.0

    def runs(self):
        count = 0
        for name in os.listdir(self.folder) if os.path.isdir(self.folder) else ():
            try:
                holder = read_claim(os.path.join(self.folder, name))
            except OSError:
                continue
            count += bool(holder and holder.get('host') == platform.node() and type(holder.get('pid')) is int
                          and process_alive(holder['pid']))
        return count

    def __call__(self):
        now = self.clock()
        if now - self.last < 1:
            return
        self.last = now
        threads = max(1, self.cores // max(1, self.runs()))
        if threads != self.threads:
            self.set_threads(threads)
            self.threads = threads


# ---------------------------------------------------------------- run: here, N at a time

def cpu_count():
    """The cores this process may use (a scheduler's allocation, taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def wants_gpu():
    import machine
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


def config_of(record, base):
    """The CONFIGS entry a record ran, if any: its overrides, every other setting that changes
    training at the driver's defaults (base), and the published split of CIFAR-10."""
    if record.get('data_sizes') != PUBLISHED_SIZES:
        return None
    for entry in CONFIGS:
        if runs_config(record, entry[2], base):
            return entry
    return None


def varied(record):
    """The published configuration a run varies (a grid's point, other settings): the one whose
    overrides it has, the most of them (1, the default run, has none)."""
    return max((entry for entry in CONFIGS if all(record['settings'].get(k) == v
                                                  for k, v in as_recorded(entry[2]).items())),
               key=lambda entry: len(entry[2]))


def differences(record, base, entry=CONFIGS[0]):
    """What sets a run apart from a published configuration (the default run's, unless given):
    settings, data sizes."""
    wanted = dict(base, **as_recorded(entry[2]))
    out = ['%s=%s' % (k, json.dumps(v)) for k, v in sorted(record['settings'].items())
           if k not in NOT_COMPARED and v != wanted.get(k)]
    if record.get('data_sizes') != PUBLISHED_SIZES:
        out.append('data %s' % ('NL/NV/NT %(L)d/%(V)d/%(T)d' % record['data_sizes'] if record.get('data_sizes')
                                else 'not fingerprinted (recorded before data fingerprints)'))
    return ', '.join(out) or 'none'


def minutes(seconds):
    return '%dm%02ds' % divmod(round(seconds), 60)


def total(r):
    """What `time` showed; a resumed run's covers its last process only, and says so."""
    return minutes(r['seconds']['total']) + (' (resumed)' if r.get('resumed') else '')


def data_label(r):
    """The data's fingerprint and the description a run of them was given (never a machine's folder)."""
    return '%s %s' % (r.get('data_fingerprint', '')[:8] or '-', r['settings'].get('datanote') or '')


VECTOR_KERNELS = {'SkylakeX': 'AVX-512', 'Cooperlake': 'AVX-512', 'SapphireRapids': 'AVX-512',
                  'Haswell': 'AVX2', 'Zen': 'AVX2'}


def device_label(r):
    """The record's device; a GPU without its number (cuda1 and cuda0 of one machine are alike);
    for a CPU recorded without its vector instructions (older records), those its OpenBLAS
    kernels used, so that an AVX-512 and an AVX2 machine of one name differ."""
    device = re.sub(r' \(cuda\d+\)$', ' (cuda)', r.get('device', ''))
    if not device.startswith('cpu:') or re.search(r'AVX|NEON|SVE|no SIMD', device):
        return device
    kernels = re.findall(r' (\w+)(?:,|$| \()', r.get('blas', '').split('kernels:')[-1])
    isa = next((VECTOR_KERNELS[k] for k in kernels if k in VECTOR_KERNELS), None)
    return '%s, %s' % (device, isa) if isa else device


RUN_COLUMNS = ('our test %', 'data s', 'compile s', 'train s', 'total', 'device', 'BLAS', 'date', 'data')
WHERE_COLUMNS = ('BLAS', 'data')        # in the tables of every run only


def run_column_names(full=True):
    return [name for name in RUN_COLUMNS if full or name not in WHERE_COLUMNS]


def run_columns(r, full=True):
    """A run's columns, RUN_COLUMNS (full=False: without WHERE_COLUMNS)."""
    s = r['seconds']
    values = dict(zip(RUN_COLUMNS, ['**%.2f**' % r['test'][1], '%.1f' % s['data'], '%.1f' % s['compile'],
                                    '%.1f' % s['train'], total(r), device_label(r), r.get('blas', '').split(' (')[0],
                                    r['date'][:10], data_label(r)]))
    return ' | '.join(values[name] for name in run_column_names(full)) + ' |'


def header(names):
    """A markdown table's header and rule for these column names."""
    return ['| %s |' % ' | '.join(names), '|%s' % ('---|' * len(names))]


def config_header(full=True):
    return header(['#', 'configuration', 'published CPU', 'published Tesla K20c'] + run_column_names(full))


def config_row(entry, r, full=True):
    return '| %d | %s | %s | %s | %s' % (entry[0], entry[1], entry[3][0] or '-', entry[3][1], run_columns(r, full))


def table(records, base):
    """The page's generated part in two: the newest run of each published configuration on each
    device (and the MNIST runs); every run of them and the other runs, oldest first.  Also the
    published configurations' runs as (entry, record), oldest first."""
    notes = {r.get('data_fingerprint'): r['settings'].get('datanote') for r in records
             if r.get('data_fingerprint') and r.get('settings', {}).get('datanote')}
    records = [dict(r, settings=dict(r['settings'], datanote=notes[r['data_fingerprint']]))
               if not r['settings'].get('datanote') and r.get('data_fingerprint') in notes else r for r in records]
    completed = [(config_of(r, base), r) for r in records
                 if r.get('status') == 'completed' and r.get('script') == 'cifar10_convnet']
    done = sorted(((entry, r) for entry, r in completed if entry), key=lambda d: (d[0][0], d[1]['date']))
    newest = {(entry[0], device_label(r)): (entry, r) for entry, r in done}      # later runs overwrite
    summary = (['The newest run of each published configuration on each device (every run, with its BLAS and'
                ' data: [docs/history.md](docs/history.md)):', ''] + config_header(full=False)
               + [config_row(entry, r, full=False) for entry, r in
                  sorted(newest.values(), key=lambda d: (d[0][0], device_label(d[1])))])
    every = ['Every run of the published configurations, oldest first (the code, the machine and the BLAS'
             ' kernels changed between them: see the steps below):', ''] + config_header()
    every += [config_row(entry, r) for entry, r in done]
    others = sorted(((varied(r), differences(r, base, varied(r)), r) for entry, r in completed if not entry),
                    key=lambda o: (o[0][0], o[1], o[2]['date']))
    if others:
        every += (['', 'Other runs (grids and the like), under the published configuration each varies, with what '
                   'differs:', ''] + other_rows(others))
    grids = {(entry[0], differs, device_label(r)): (entry, differs, r) for entry, differs, r in others
             if r.get('data_sizes') == PUBLISHED_SIZES}                   # later runs overwrite
    if grids:
        summary += ['', 'Runs with other settings (`python sweep.py run --grid=...`), the newest of each, under the '
                    'published configuration each varies:', ''] + other_rows(sorted(grids.values(), key=lambda o: (
                        o[0][0], o[1], device_label(o[2]))))
    return summary + mnist_rows(records), every, done


def other_rows(others):
    """The table of (configuration varied, what differs, record)s."""
    return header(['#', 'differs in', 'test %', 'total', 'device', 'date', 'data']) + [
        '| %d | %s | %.2f | %s | %s | %s | %s |' % (entry[0], differs, r['test'][1], total(r), device_label(r),
                                                  r['date'][:10], data_label(r)) for entry, differs, r in others]


def glance(done):
    """The README's table: the published figures beside our newest run of each configuration on
    a CPU and on a GPU, test accuracy and the whole run's time."""
    newest = {}
    for entry, r in done:                       # in (number, date) order: later runs overwrite
        newest[entry[0], 'CPU' if r['device'].startswith('cpu:') else 'GPU'] = r
    devices = {kind: sorted({device_label(r) for (n, k), r in newest.items() if k == kind}) for kind in ('CPU', 'GPU')}

    def cell(number, kind):
        r = newest.get((number, kind))
        if not r:
            return ''
        seconds = r['seconds']['total']
        return '%.2f%% %s' % (r['test'][1], '%d s' % round(seconds) if seconds < 60 else minutes(seconds))
    rows = header(['configuration', 'published CPU (6 cores)', 'published Tesla K20c', 'ours, CPU', 'ours, GPU'])
    rows += ['| %d. %s | %s | %s | %s | %s |' % (entry[0], entry[1], entry[3][0], entry[3][1], cell(entry[0], 'CPU'),
                                              cell(entry[0], 'GPU')) for entry in CONFIGS]
    return rows + ['', 'Ours on %s.' % ' and '.join('; '.join(d) for d in devices.values() if d)]


MNIST_SETTINGS = ('H1', 'H2', 'eta', 'mu', 'lam', 'batchsize', 'nepoch', 'Wstd', 'seed')


def mnist_rows(records):
    """Rows of the MNIST MLP's completed runs (`python mnist_mlp.py`), oldest first."""
    runs = sorted((r for r in records if r.get('status') == 'completed' and r.get('script') == 'mnist_mlp'),
                  key=lambda r: r['date'])
    if not runs:
        return []
    rows = (['', 'The MNIST MLP (`python mnist_mlp.py`; its split 50000 / 10000 / 10000):', '']
            + header(['settings'] + run_column_names()))
    rows += ['| %s | %s' % (', '.join('%s=%s' % (k, json.dumps(r['settings'][k])) for k in MNIST_SETTINGS
                                      if k in r['settings']), run_columns(r)) for r in runs]
    return rows


PICTURE_NAMES = ('learning_curves.png', 'filters_default.png')


def pictures(done, folder=RECORDS):
    """Learning curves of each configuration's latest run and the first layer's filters of the
    latest default run, as PNGs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    os.makedirs(PICTURES, exist_ok=True)
    names = []
    latest = {entry[0]: (entry, r) for entry, r in done}       # done is in (number, date) order
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry, r in latest.values():
        e = np.array(r['epochs'])
        line, = axes[0].plot(e[:, 0], e[:, 1], '--', alpha=0.7)
        axes[0].plot(e[:, 0], e[:, 3], '-', color=line.get_color(), label='%d. %s' % entry[:2])
        axes[1].plot(e[:, 0], e[:, 2], '--', color=line.get_color(), alpha=0.7)
        axes[1].plot(e[:, 0], e[:, 4], '-', color=line.get_color())
    axes[0].set(xlabel='epoch', ylabel='cross-entropy', title='cost (dashed: training, solid: validation)')
    axes[1].set(xlabel='epoch', ylabel='% correct', title='accuracy (dashed: training, solid: validation)')
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(PICTURES, 'learning_curves.png'), dpi=80)
    names.append('learning_curves.png')
    default = [r for entry, r in done if entry[0] == 1]
    params = default and params_path(default[-1], folder)
    if params and os.path.exists(params):
        with np.load(params) as f:
            W = f['00_W1']                                  # (F, 3, 5, 5), R G B planes
        fig, axes = plt.subplots(2, (len(W) + 1) // 2, figsize=(len(W) * 0.6, 2.6))
        for ax, w in zip(axes.ravel(), W):
            im = w.transpose(1, 2, 0)
            ax.imshow((im - im.min()) / (im.max() - im.min()), interpolation='nearest')
            ax.axis('off')
        fig.suptitle('first-layer filters of the default run (each scaled to its own range)')
        fig.savefig(os.path.join(PICTURES, 'filters_default.png'), dpi=80)
        names.append('filters_default.png')
    elif default and os.path.exists(os.path.join(PICTURES, 'filters_default.png')):
        print('# results/filters_default.png kept as it was: the newest default run\'s parameter file %s is not here'
              % params)
        names.append('filters_default.png')
    return names


def params_path(record, folder=RECORDS):
    """A record's parameter file, resolved from the records' own folder."""
    return os.path.join(folder, os.path.basename(record.get('params', '')))


TABLE_START = '<!-- table: written by python sweep.py table -->'
TABLE_END = '<!-- end of table -->'


def filled(page, generated, name=PAGE):
    """The page's text with its generated part (between TABLE_START and TABLE_END) replaced by the
    lines `generated`; the hand-written text around it kept."""
    if TABLE_START not in page or TABLE_END not in page:
        sys.exit('# %s lost its markers %s and %s: put them back where the table goes' % (name, TABLE_START, TABLE_END))
    head, rest = page.split(TABLE_START, 1)
    return head + TABLE_START + '\n' + '\n'.join(generated) + '\n' + TABLE_END + rest.split(TABLE_END, 1)[1]


def with_pictures(summary, images):
    lines = summary + ['']
    for n in images:
        lines += ['![%s](results/%s)' % (n[:-4].replace('_', ' '), n), '']
    return lines[:-1]


def rewrite(path, generated, title):
    page = open(path).read() if os.path.exists(path) else '# %s\n\n%s\n%s\n' % (title, TABLE_START, TABLE_END)
    page = filled(page, generated, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(page)


def write_page(argv):
    base = driver_defaults(argv)[0]
    records = read_records(records_folder(base))
    if not records:     # a mistyped --outdir would otherwise empty the page's tables
        sys.exit('error: no records in %s: %s left as it is (python sweep.py run writes them)'
                 % (records_folder(base), PAGE))
    summary, every, done = table(records, base)
    try:
        images = pictures(done, records_folder(base)) if done else []
    except ImportError:     # the pictures already drawn stay on the page, as they are
        images = [n for n in PICTURE_NAMES if os.path.exists(os.path.join(PICTURES, n))]
        print('# no matplotlib: the tables only, results/*.png kept as they were (pip install -r requirements-plot.txt)')
    rewrite(PAGE, with_pictures(summary, images), 'Results')
    rewrite(HISTORY, every, 'History')
    if os.path.exists(FRONT):
        rewrite(FRONT, glance(done), 'README')
    print('# wrote %s, %s and %s (%d runs)%s' % (PAGE, HISTORY, FRONT, len(done),
                                               ''.join(' and results/' + n for n in images)))


COMMANDS = {'run': run, 'commands': commands, 'slurm': slurm, 'table': write_page}

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    import machine      # all run the driver (its settings); a Python that cannot is named here, with this command
    machine.require_theano_python()
    try:
        COMMANDS[sys.argv[1]](sys.argv[2:])
    except KeyboardInterrupt:   # while planning: nothing started yet (once runs go, Ctrl-C lets them save)
        sys.exit('# interrupted before any run started')
