"""What the README and docs/running.md promise of a CIFAR-10 run, end to end on small data: a run
stopped and resumed ends as one never stopped; one killed outright (SIGKILL) goes on from the
checkpoint its log names, by hand or picked up by a sweep; a cost that turns NaN stops the run
with the epoch and minibatch named; an output pipe that closes mid-run loses nothing."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, make_cifar, only_record
from test_convnet import run_script, started, wait_for_training

SMALL = ['--W1dim=(2,5,5)', '--H2=8', '--ZCAwhitening=False']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('data')
    make_cifar(str(folder), rows=100)
    return str(folder)


def run(data, outdir, *args):
    result = run_script('cifar10_convnet.py', *SMALL, '--datadir=%s' % data, '--outdir=%s' % outdir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def saved(outdir):
    """The run's record and its parameter file's arrays (the parameters and the momenta)."""
    record = only_record(outdir)
    with np.load(os.path.join(str(outdir), record['params'])) as f:
        return record, {name: f[name] for name in f.files if name != 'settings'}


def assert_one_run(resumed, straight):
    """The same rows and test figures to the last digit, and the same parameters and momenta."""
    (record, arrays), (straight_record, straight_arrays) = resumed, straight
    assert [row[:5] for row in record['epochs']] == [row[:5] for row in straight_record['epochs']]
    assert record['test'] == straight_record['test'] and record['status'] == 'completed'
    assert sorted(arrays) == sorted(straight_arrays) and any(name.startswith('momentum_') for name in arrays)
    for name, array in straight_arrays.items():
        assert np.array_equal(arrays[name], array), name


def stop_after_the_first_row(data, outdir, sig):
    """A run of many epochs, sent `sig` once its epoch-1 row is out; its log so far."""
    with started('cifar10_convnet.py', *SMALL, '--nepoch=100000', '--datadir=%s' % data,
                 '--outdir=%s' % outdir) as proc:
        log = wait_for_training(proc)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        return log + proc.stdout.read()


def test_a_run_stopped_with_ctrl_c_and_resumed_ends_as_one_never_stopped(data, tmp_path):
    stopped = stop_after_the_first_row(data, tmp_path / 'stopped', signal.SIGINT)
    params = re.search(r'^# to go on from here: python cifar10_convnet.py --resume=(\S+)$', stopped, re.M).group(1)
    at = only_record(tmp_path / 'stopped')['position']['epoch']
    nepoch = at + 2
    run(data, tmp_path / 'straight', '--nepoch=%d' % nepoch)
    log = run(data, tmp_path / 'resumed', '--resume=%s' % params, '--nepoch=%d' % nepoch)
    assert '# resumed from %s: epoch %d' % (params, at) in log
    resumed = saved(tmp_path / 'resumed')
    assert_one_run(resumed, saved(tmp_path / 'straight'))
    seconds = [row[5] for row in resumed[0]['epochs']]
    before = resumed[0]['resumed']['train_seconds']
    assert seconds == sorted(seconds) and seconds[-1] > before > 0     # the seconds column goes on


def test_a_run_killed_outright_goes_on_from_the_checkpoint_its_log_names_by_hand_or_in_a_sweep(data, tmp_path):
    killed = stop_after_the_first_row(data, tmp_path / 'killed', signal.SIGKILL)
    checkpoint = re.search(r'^# checkpoint at every logged row \(if this run dies: --resume=it\): (\S+)$',
                           killed, re.M).group(1)
    assert os.path.exists(checkpoint) and not list((tmp_path / 'killed').glob('*.record.json'))
    with np.load(checkpoint) as f:
        assert '00_W1' in f.files and any(name.startswith('momentum_') for name in f.files)
    # a sweep of that run finds the checkpoint by its settings and goes on from it
    sweep = subprocess.Popen([sys.executable, 'sweep.py', 'run', '--only=1', '--', *SMALL, '--nepoch=100000',
                              '--datadir=%s' % data, '--outdir=%s' % (tmp_path / 'killed')],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in iter(sweep.stdout.readline, ''):
            if line.startswith('# 1. '):
                assert line.rstrip().endswith('cifar10_convnet.py --resume=%s %s --nepoch=100000 --datadir=%s '
                                              '--outdir=%s' % (checkpoint, ' '.join(SMALL), data, tmp_path / 'killed'))
            if line.startswith('# resumed from '):
                assert line.startswith('# resumed from %s: epoch ' % checkpoint)
                break
        else:
            pytest.fail('the sweep did not go on from the checkpoint')
    finally:
        sweep.send_signal(signal.SIGTERM)       # its run saves where it is
        sweep.wait(timeout=120)
        sweep.stdout.close()
    # by hand, as the log says: to the same end as a run never stopped
    with np.load(checkpoint) as f:
        at = json.loads(str(f['settings']))['position']['epoch']
    run(data, tmp_path / 'straight', '--nepoch=%d' % (at + 1))
    run(data, tmp_path / 'resumed', '--resume=%s' % checkpoint, '--nepoch=%d' % (at + 1))
    assert_one_run(saved(tmp_path / 'resumed'), saved(tmp_path / 'straight'))


def test_a_cost_that_turns_nan_stops_the_run_naming_the_epoch_and_minibatch(data, tmp_path):
    result = run_script('cifar10_convnet.py', *SMALL, '--eta=1e30', '--nepoch=3', '--datadir=%s' % data,
                        '--outdir=%s' % (tmp_path / 'runs'))
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert re.search(r'^# stopped: cost became nan in epoch 1 of 3, minibatch \d+: lower eta or check the data$',
                     result.stdout, re.M)
    record = only_record(tmp_path / 'runs')
    assert record['status'] == 'diverged' and record['position']['epoch'] == 1 and 'test' not in record
    assert os.path.exists(tmp_path / 'runs' / record['params'])


def test_an_output_pipe_that_closes_mid_run_loses_nothing(data, tmp_path):
    """`python cifar10_convnet.py | head -20`: head leaves while the run trains; the run goes on,
    quietly, and saves all it logged."""
    outdir = tmp_path / 'runs'
    proc = subprocess.Popen([sys.executable, 'cifar10_convnet.py', *SMALL, '--nepoch=100000', '--datadir=%s' % data,
                             '--outdir=%s' % outdir], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_training(proc)
        proc.stdout.close()                     # the reader is gone
        checkpoint, = outdir.glob('*.checkpoint.npz')
        written = os.path.getmtime(checkpoint)
        while os.path.getmtime(checkpoint) == written:    # rows logged (to nobody) after the pipe closed
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
        errors = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert 'Traceback' not in errors and 'BrokenPipe' not in errors
    record = only_record(outdir)
    assert record['status'] == 'interrupted' and len(record['epochs']) >= 3
    assert os.path.exists(outdir / record['params'])
