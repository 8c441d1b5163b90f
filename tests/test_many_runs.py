"""sweep.py beyond one run at a time: grids, --jobs, claims, `commands | parallel`, Slurm job arrays.

The Slurm tests start a one-node cluster of their own (munged, slurmctld, slurmd from Debian's
slurm-wlm and munge, on ports of their own) and are skipped, with the reason, where it cannot
start.  Every run here trains on tiny data for an epoch or two.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import sweep
from engine import claims, records, report, sweeping
from conftest import ROOT, make_cifar

SWEEP = [sys.executable, os.path.join(ROOT, 'sweep.py')]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A folder with tiny CIFAR-10 batches (400 / 100 / 100 images)."""
    folder = tmp_path_factory.mktemp('tiny')
    make_cifar(str(folder), rows=100, learnable=True)
    return str(folder)


def driver_options(tiny, outdir, nepoch=1):
    return ['--nepoch=%d' % nepoch, '--datadir=' + tiny, '--outdir=' + str(outdir)]


def completed(outdir):
    return [r for r in records.read_records(str(outdir)) if r['status'] == 'completed']


def settings_run(records):
    """(configuration number, seed) of each record, sorted."""
    return sorted((report.varied(r)[0], r['settings']['seed']) for r in records)


# ---------------------------------------------------------------- grids

def test_a_grid_is_every_combination_of_its_values():
    assert sweeping.grid_points('eta=[0.005,0.01] mu=[0.9, 0.95]') == [
        {'eta': 0.005, 'mu': 0.9}, {'eta': 0.005, 'mu': 0.95}, {'eta': 0.01, 'mu': 0.9}, {'eta': 0.01, 'mu': 0.95}]
    assert sweeping.grid_points('W1dim=[(16, 5, 5), (32,5,5)]') == [{'W1dim': (16, 5, 5)}, {'W1dim': (32, 5, 5)}]
    for wrong in ('eta=0.01', 'eta=[]', 'eta=[0.01] eta=[0.02]', 'eta=[0.01', '=[1]', ''):
        with pytest.raises(SystemExit, match='needs name=\\[value,...\\] for each setting, once'):
            sweeping.grid_points(wrong)


def test_the_grid_crosses_the_configurations_and_the_driver_checks_each_value_first(tiny, tmp_path):
    choices = sweep.Choices(['--only=1,2', '--grid=eta=[0.005,0.02] W1dim=[(8,5,5)]', '--'] +
                            driver_options(tiny, tmp_path))
    device, runs = sweeping.plan(choices.only, choices.points, choices.extra)
    assert [sweeping.label(r) for r in runs] == ['1 eta=0.005 W1dim=(8,5,5)', '2 eta=0.005 W1dim=(8,5,5)',
                                              '1 eta=0.02 W1dim=(8,5,5)', '2 eta=0.02 W1dim=(8,5,5)']
    assert {(r.settings['eta'], tuple(r.settings['W1dim']), r.settings['nepoch']) for r in runs} == {
        (0.005, (8, 5, 5), 1), (0.02, (8, 5, 5), 1)}              # the grid's filters win over configuration 2's
    assert runs[1].args == ['--eta=0.005', '--W1dim=(8,5,5)']
    stop = subprocess.run(SWEEP + ['run', '--grid=eta=[0.01,-1]', '--'] + driver_options(tiny, tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 1 and '--grid point --eta=-1: error: --eta=-1.0: needs a positive number' in stop.stderr
    assert not os.path.exists(tmp_path / 'logs')                  # nothing started
    stop = subprocess.run(SWEEP + ['run', '--only=5', '--grid=W1dim=[(16,5,5),(16,9,9)] ds1=[(26,26)]', '--']
                          + driver_options(tiny, tmp_path), capture_output=True, text=True, timeout=300)
    assert stop.returncode == 1 and ('--grid point --W1dim=(16,9,9) --ds1=(26,26): error: --ds1=(26, 26): needs a '
                                     'window of at most 24x24, the map that 9x9 filters leave') in stop.stderr


def test_grid_runs_are_tabulated_under_their_configuration():
    base = {'W1dim': [16, 5, 5], 'ds1': [4, 4], 'st1': None, 'H3': None, 'eta': 0.01, 'seed': 0}
    record = {'script': 'cifar10_convnet', 'status': 'completed', 'device': 'cpu: X, AVX2', 'test': [1, 70.0],
              'settings': dict(base, W1dim=[64, 5, 5], st1=[2, 2], eta=0.02), 'date': '2026-12-07T10:00:00',
              'data_sizes': dict(records.PUBLISHED_SIZES), 'seconds': {'total': 60}, 'data_fingerprint': 'f' * 40}
    summary, every, done = report.table([record], base)
    assert done == [] and report.varied(record)[0] == 6
    assert '| 6 | eta=0.02 | 70.00 | 1m00s | cpu: X, AVX2 | 2026-12-07 | ffffffff  |' in summary
    assert '| 6 | eta=0.02 | 70.00 | 1m00s | cpu: X, AVX2 | 2026-12-07 | ffffffff  |' in every


# ---------------------------------------------------------------- several at once, claims

def test_runs_share_the_cores_or_take_a_gpu_each(monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.delenv('OPENBLAS_NUM_THREADS', raising=False)
    monkeypatch.setenv('THEANO_FLAGS', 'floatX=float32,device=cuda,allow_gc=False')
    env = sweeping.run_environment(3, None, '/runs/claims')
    assert env['OMP_NUM_THREADS'] == env['OPENBLAS_NUM_THREADS'] == '3'        # to start with, then their share
    assert env['NNET_SHARED_CORES'] == '/runs/claims'
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    env = sweeping.run_environment(3, None, '/runs/claims')                        # the user's threads stay
    assert env['OMP_NUM_THREADS'] == '2' and env['OPENBLAS_NUM_THREADS'] == '3' and 'NNET_SHARED_CORES' not in env
    assert sweeping.run_environment(None, 1)['THEANO_FLAGS'] == 'floatX=float32,allow_gc=False,device=cuda1'
    monkeypatch.setattr(sweeping, 'wants_gpu', lambda: True)
    monkeypatch.setattr(sweeping, 'visible_gpus', lambda: [0, 1])
    assert sweeping.gpu_numbers(None, 2) == [0, 1] and sweeping.gpu_numbers(None, 1) is None
    assert sweeping.gpu_numbers('1', 1) == [1]
    with pytest.raises(SystemExit, match='--jobs=3: needs as many GPUs, one a run; these are 0,1'):
        sweeping.gpu_numbers(None, 3)
    monkeypatch.setattr(sweeping, 'wants_gpu', lambda: False)
    with pytest.raises(SystemExit, match='--devices=0,1: needs THEANO_FLAGS=device=cuda'):
        sweeping.gpu_numbers('0,1', 2)


def test_a_sweeps_run_follows_its_share_of_the_cores(tmp_path):
    """Runs of `sweep.py run --jobs=N` divide the cores among the runs claimed from this host."""
    set_to, clock = [], [100.0]
    share = claims.CoreShare(str(tmp_path), set_to.append, cores=4, clock=lambda: clock[0])
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    for name, holder in (('a', {'host': socket.gethostname(), 'pid': os.getpid()}),
                         ('b', {'host': socket.gethostname(), 'pid': os.getpid()}),
                         ('c', {'host': 'elsewhere', 'pid': os.getpid()}),       # another node's: its own cores
                         ('d', {'host': socket.gethostname(), 'pid': gone.pid})):     # its sweep gone
        (tmp_path / (name + '.claim')).write_text(json.dumps(holder))
    (tmp_path / 'e.claim').write_text('{"host": ')                              # being written
    share()
    assert set_to == [2]
    os.remove(tmp_path / 'b.claim')                  # a run ended
    share()
    assert set_to == [2]                             # looked at once a second
    clock[0] += 1
    share()
    assert set_to == [2, 4]
    clock[0] += 1
    share()
    assert set_to == [2, 4]                          # set again only when it changes


def test_a_claim_is_held_by_one_live_process(tmp_path, monkeypatch):
    path = str(tmp_path / 'claims' / 'x.claim')
    assert claims.take_claim(path, '1') is None
    assert re.search(r'process %d on %s since ' % (os.getpid(), re.escape(socket.gethostname())),
                     claims.take_claim(path, '1'))
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    with open(path, 'w') as f:                                   # its process ended without a word
        json.dump({'host': socket.gethostname(), 'pid': gone.pid}, f)
    assert claims.take_claim(path, '1') is None
    with open(path, 'w') as f:                                   # another node's, silent too long
        json.dump({'host': 'elsewhere', 'pid': os.getpid()}, f)
    assert claims.take_claim(path, '1')
    os.utime(path, (time.time() - claims.CLAIM_SILENT - 1,) * 2)
    assert claims.take_claim(path, '1') is None


def test_two_sweeps_of_several_jobs_into_one_folder_run_each_run_once_and_lose_no_record(tiny, tmp_path):
    command = SWEEP + ['run', '--only=1,2', '--grid=seed=[0,1]', '--jobs=2', '--'] + driver_options(tiny, tmp_path)
    sweeps = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [s.communicate(timeout=600)[0] for s in sweeps]
    assert [s.returncode for s in sweeps] == [0, 0], outputs
    found = records.read_records(str(tmp_path))
    assert settings_run(found) == [(1, 0), (1, 1), (2, 0), (2, 1)] and len(completed(tmp_path)) == 4
    both = ''.join(outputs)
    assert re.search(r'^# 4 runs, 2 at a time, the %d cores shared among them$' % claims.cpu_count(), both, re.M)
    assert re.search(r'^\[2 seed=0\] # 2\. 64 filters, with seed=0: .* --seed=0 --nepoch=1 .*; %d threads to start '
                     r'with$' % max(1, claims.cpu_count() // 2), both, re.M)
    assert re.search(r'^\[1 seed=1\] 1 \| ', both, re.M)         # each line says whose it is
    assert os.listdir(tmp_path / 'claims') == []


def test_a_sweep_stopped_by_sigterm_saves_and_the_next_one_goes_on(tiny, tmp_path):
    command = SWEEP + ['run', '--only=1', '--'] + driver_options(tiny, tmp_path, nepoch=60)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith('1 | '):
            proc.send_signal(signal.SIGTERM)                     # the sweep alone, as `kill` does
            break
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and 'run the sweep again to resume them' in log
    stopped, = records.read_records(str(tmp_path))
    assert stopped['status'] == 'interrupted' and os.listdir(tmp_path / 'claims') == []
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and '--resume=%s' % (tmp_path / stopped['params']) in again.stdout
    assert completed(tmp_path)[0]['resumed']['file'] == str(tmp_path / stopped['params'])


# ---------------------------------------------------------------- any scheduler: GNU parallel

def test_the_commands_run_under_gnu_parallel(tiny, tmp_path):
    if not shutil.which('parallel'):
        pytest.skip('GNU parallel is not installed (apt-get install parallel)')
    options = ['--only=1,6', '--jobs=2', '--'] + driver_options(tiny, tmp_path)
    lines = subprocess.run(SWEEP + ['commands'] + options, capture_output=True, text=True, timeout=300)
    assert lines.returncode == 0 and len(lines.stdout.splitlines()) == 2
    assert lines.stdout.startswith('env OMP_NUM_THREADS=%d ' % max(1, claims.cpu_count() // 2))
    ran = subprocess.run(['parallel', '--will-cite', '-j', '2'], input=lines.stdout, capture_output=True, text=True,
                         timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert [report.varied(r)[0] for r in completed(tmp_path)] in ([1, 6], [6, 1])
    assert subprocess.run(SWEEP + ['commands'] + options, capture_output=True, text=True, timeout=300).stdout == ''


# ---------------------------------------------------------------- Slurm

@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on this machine (2 CPUs at most): the environment its commands need."""
    daemons = {name: shutil.which(name) or shutil.which(name, path='/usr/sbin:/sbin')
               for name in ('munged', 'slurmctld', 'slurmd')}
    missing = [name for name, path in daemons.items() if not path] + [
        name for name in ('sbatch', 'squeue', 'scancel', 'sinfo') if not shutil.which(name)]
    if missing:
        pytest.skip('no Slurm here (%s missing): apt-get install slurm-wlm munge' % ', '.join(missing))
    if os.geteuid() != 0:
        pytest.skip('the test cluster needs root (slurmd starts the jobs)')
    folder = tmp_path_factory.mktemp('slurm')
    os.chmod(folder, 0o700)
    for sub in ('state', 'spool'):
        os.makedirs(folder / sub)
    key = folder / 'munge.key'
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            ports.append(s.getsockname()[1])
    host = socket.gethostname().split('.')[0]
    cpus = min(2, os.cpu_count())
    (folder / 'slurm.conf').write_text('\n'.join([
        'ClusterName=sweeptest', 'SlurmctldHost=%s(127.0.0.1)' % host,
        'SlurmctldPort=%d' % ports[0], 'SlurmdPort=%d' % ports[1], 'SlurmUser=root', 'SlurmdUser=root',
        'AuthType=auth/munge', 'CredType=cred/munge', 'AuthInfo=socket=%s' % (folder / 'munge.socket'),
        'StateSaveLocation=%s' % (folder / 'state'), 'SlurmdSpoolDir=%s' % (folder / 'spool'),
        'SlurmctldPidFile=%s' % (folder / 'slurmctld.pid'), 'SlurmdPidFile=%s' % (folder / 'slurmd.pid'),
        'SlurmctldLogFile=%s' % (folder / 'slurmctld.log'), 'SlurmdLogFile=%s' % (folder / 'slurmd.log'),
        'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none', 'SelectType=select/cons_tres',
        'SelectTypeParameters=CR_CPU', 'MpiDefault=none', 'ReturnToService=2', 'KillWait=10',
        'JobAcctGatherType=jobacct_gather/none', 'AccountingStorageType=accounting_storage/none',
        'NodeName=sweeptest-node NodeAddr=127.0.0.1 CPUs=%d State=UNKNOWN' % cpus,
        'PartitionName=test Nodes=sweeptest-node Default=YES MaxTime=INFINITE State=UP', '']))
    env = dict(os.environ, SLURM_CONF=str(folder / 'slurm.conf'))
    started = []

    def log_tails():
        return '\n'.join('%s: %s' % (name, (folder / name).read_text()[-1500:]) for name in
                         ('munged.log', 'slurmctld.log', 'slurmd.log') if (folder / name).exists())
    try:
        started.append(subprocess.Popen([daemons['munged'], '--foreground', '--force', '--key-file=%s' % key,
                                         '--socket=%s' % (folder / 'munge.socket'), '--pid-file=%s' % (folder / 'munged.pid'),
                                         '--log-file=%s' % (folder / 'munged.log'), '--seed-file=%s' % (folder / 'munge.seed')],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        time.sleep(1)
        started.append(subprocess.Popen([daemons['slurmctld'], '-D', '-i'], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT))
        started.append(subprocess.Popen([daemons['slurmd'], '-D', '-N', 'sweeptest-node'], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(['sinfo', '-h', '-o', '%T'], env=env, capture_output=True, text=True).stdout.strip()
            if state == 'idle':
                break
            if any(p.poll() is not None for p in started):
                break
            time.sleep(1)
        else:
            state = 'not idle in 60 s'
        if state != 'idle':
            pytest.skip('the test cluster did not start (%s):\n%s' % (state, log_tails()))
        yield env
    finally:
        for proc in reversed(started):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def submit(env, *args):
    """Write and submit a job array with `sweep.py slurm --submit`: (its script, its job id)."""
    out = subprocess.run(SWEEP + ['slurm', '--submit', '--cpus-per-task=1'] + list(args), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r'^# wrote (\S+):', out.stdout, re.M).group(1), re.search(r'Submitted batch job (\d+)',
                                                                           out.stdout).group(1)


def wait_for(env, job, timeout=600):
    deadline = time.time() + timeout
    while subprocess.run(['squeue', '-h', '-j', job], env=env, capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, 'job %s still queued or running after %d s' % (job, timeout)
        time.sleep(1)


def test_two_slurm_job_arrays_of_the_table_into_one_folder_run_each_run_once(slurm, tiny, tmp_path):
    options = ['--'] + driver_options(tiny, tmp_path)
    (first, job), (second, other) = submit(slurm, *options), submit(slurm, *options)
    assert first != second
    text = open(first).read()
    assert '#SBATCH --array=0-5\n' in text and '#SBATCH --output=%s/logs/slurm-%%A_%%a.out\n' % tmp_path in text
    wait_for(slurm, job)
    wait_for(slurm, other)
    logs = sorted(name for name in os.listdir(tmp_path / 'logs') if name.startswith('slurm-'))
    assert logs == sorted('slurm-%s_%d.out' % (j, i) for j in (job, other) for i in range(6))
    found = records.read_records(str(tmp_path))
    assert sorted(report.varied(r)[0] for r in found) == [1, 2, 3, 4, 5, 6]           # each once, all completed
    assert len(completed(tmp_path)) == 6
    default = next(r for r in found if report.varied(r)[0] == 1)
    summary, every, done = report.table(found, default['settings'])
    rows = [re.match(r'\| (\d) \| (.*?) \| ', row).groups() for row in every if 'NL/NV/NT 400/100/100' in row]
    assert sorted(rows) == [(str(n), 'data NL/NV/NT 400/100/100') for n in range(1, 7)]   # each under its own
    assert subprocess.run(SWEEP + ['slurm'] + options, env=slurm, capture_output=True, text=True,
                          timeout=300).stdout.startswith('# nothing to run')


def test_a_cancelled_slurm_task_goes_on_from_where_it_stopped_when_resubmitted(slurm, tiny, tmp_path):
    script, job = submit(slurm, '--only=1', '--', *driver_options(tiny, tmp_path, nepoch=60))
    log = tmp_path / 'logs' / ('slurm-%s_0.out' % job)
    deadline = time.time() + 300
    while not (log.exists() and re.search(r'^1 \| ', log.read_text(), re.M)):
        assert time.time() < deadline, 'no training row in %s' % log
        time.sleep(0.2)
    subprocess.run(['scancel', job], env=slurm, check=True)
    wait_for(slurm, job)
    stopped, = records.read_records(str(tmp_path))
    assert stopped['status'] == 'interrupted'
    again = subprocess.run(['sbatch', script], env=slurm, capture_output=True, text=True, check=True)
    job = re.search(r'Submitted batch job (\d+)', again.stdout).group(1)
    wait_for(slurm, job)
    done, = completed(tmp_path)
    assert done['resumed']['file'] == str(tmp_path / stopped['params'])
    assert '--resume=%s' % (tmp_path / stopped['params']) in (tmp_path / 'logs' / ('slurm-%s_0.out' % job)).read_text()
