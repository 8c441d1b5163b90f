"""engine/runlog.py: the published log, records and parameters on Ctrl-C, --name=value overrides."""
import json
import os
import signal

import numpy as np
import pytest

import nnet
from engine import runlog
from conftest import only_record, small_problem


def test_interrupted_run_still_writes_record_and_parameters(tmp_path, monkeypatch, capsys):
    X, y = small_problem(60)
    data = {'L': (X[:40], y[:40]), 'V': (X[40:50], y[40:50]), 'T': (X[50:], y[50:])}
    trainer = nnet.Trainer(nnet.MLP(np.random.RandomState(0), 6, [5], 3), data, 10, 0.1, 0.9, 0.0)
    calls = []

    def train_epoch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 0.5, 50.0
    monkeypatch.setattr(trainer, 'train_epoch', train_epoch)
    code = runlog.train_and_log(trainer, 10, 'test', {'eta': 0.1}, {'device': 'cpu'}, str(tmp_path), 0, 1.0)
    assert code == 130
    record = only_record(tmp_path)
    assert record['status'] == 'interrupted' and [row[0] for row in record['epochs']] == [0, 1, 2]
    assert np.load(tmp_path / record['params'])['00_W1'].shape == (6, 5)
    assert 'interrupted at epoch 3' in capsys.readouterr().out


def test_overrides_parse_literals_and_reject_unknown_names(capsys):
    namespace = {'W1dim': (16, 5, 5), 'st1': None, 'eta': 0.01, 'nepoch': 50, 'ZCAwhitening': True,
                 'datadir': None}
    names = runlog.config_names(dict(namespace, _private=1, np=np))
    assert names == list(namespace)
    runlog.apply_overrides(namespace, names, ['--W1dim=(64,5,5)', '--st1=(2,2)', '--eta=1',
                                            '--ZCAwhitening=False', '--datadir=/tmp/my data'])
    assert namespace == {'W1dim': (64, 5, 5), 'st1': (2, 2), 'eta': 1.0, 'nepoch': 50,
                         'ZCAwhitening': False, 'datadir': '/tmp/my data'}
    assert '# override: W1dim = (64, 5, 5)' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='nepoch=50'):
        runlog.apply_overrides(namespace, names, ['--epochs=3'])
    with pytest.raises(SystemExit, match='needs an integer'):
        runlog.apply_overrides(namespace, names, ['--nepoch=ten'])
    with pytest.raises(SystemExit, match='needs a tuple'):
        runlog.apply_overrides(namespace, names, ['--W1dim=64'])


class ScriptedTrainer:
    """Stands in for nnet.Trainer: each split evaluates to its own figures, which move with training."""

    def __init__(self):
        self.epochs_done, self.compile_seconds = 0, 0.0
        self.bounds = {'L': (0, 400), 'V': (400, 500), 'T': (500, 600)}
        self.net = nnet.MLP(np.random.RandomState(0), 2, [], 2)
        self.trained = (0, 0.0, 0.0)

    def save(self, path, settings):
        self.net.save(path, settings)

    def evaluate(self, split):
        return {'L': 1.0, 'V': 2.0, 'T': 3.0}[split] + self.epochs_done / 100, 50.0 + self.epochs_done

    def train_epoch(self, split='L', what='training', start=(0, 0.0, 0.0)):
        assert split == 'L' and start == (0, 0.0, 0.0)
        self.epochs_done += 1
        return 9.0, 9.0                      # the training pass's own running figures


@pytest.mark.parametrize('quickL', [False, True])
def test_log_schedule_and_which_split_each_row_evaluates(tmp_path, capsys, quickL):
    trainer = ScriptedTrainer()
    assert runlog.train_and_log(trainer, 25, 'test', {}, {}, str(tmp_path), 0, 1.0, quickL) == 0
    record = only_record(tmp_path)
    rows = record['epochs']
    assert [row[0] for row in rows] == [0, 1, 2, 3, 4, 5, 10, 20, 25]    # 0-5, every 10th, the last
    for epoch, costL, accL, costV, accV, seconds in rows:
        if quickL and epoch > 0:
            assert (costL, accL) == (9.0, 9.0)
        else:                                # L evaluated after the epoch (epoch 0: before training)
            assert (costL, accL) == (1.0 + epoch / 100, 50.0 + epoch)
        assert (costV, accV) == (2.0 + epoch / 100, 50.0 + epoch)
    assert record['test'] == [3.25, 75.0]                               # the starred row is T's
    out = capsys.readouterr().out
    assert '# NT =  100' in out
    assert [line for line in out.splitlines() if line.endswith(' *')][0].endswith('| 3.250000 75.00 *')
    assert ('# quickL' in out) == quickL


class Terminal:
    """A stream that says it is a terminal and keeps what is written to it."""
    def __init__(self):
        self.text = ''

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_line_on_a_terminal_at_most_once_a_second_with_the_time_left():
    now = [0.0]
    terminal = Terminal()
    progress = runlog.Progress(10, terminal, clock=lambda: now[0])
    progress.epoch = 2
    now[0] = 0.5
    progress('epoch 2 of 10', 40, 100)                  # under a second since the last line: none
    assert terminal.text == ''
    now[0] = 30.0
    progress('epoch 2 of 10', 50, 100)                  # 1.5 of 10 epochs in 30 s: 170 s to go
    assert terminal.text == '\repoch 2 of 10: minibatch 50 of 100, 0m30s so far, about 2m50s left\033[K'
    now[0] = 75.0
    progress('evaluating V', 3, 20)                     # no estimate outside training
    assert terminal.text.endswith('\revaluating V: minibatch 3 of 20, 1m15s so far\033[K')
    progress.clear()
    assert terminal.text.endswith('\r\033[K')
    progress.clear()                                    # nothing shown since: nothing to erase
    assert terminal.text.count('\r\033[K') == 1
    resumed = runlog.Progress(10, terminal, clock=lambda: now[0])
    resumed.before, resumed.epoch = 5.0, 6             # 5 epochs trained before this process
    now[0] += 30.0
    resumed('epoch 6 of 10', 50, 100)                  # 0.5 of its 5 epochs in 30 s: 270 s to go
    assert terminal.text.endswith('0m30s so far, about 4m30s left\033[K')


def test_a_silent_wait_shows_its_line_on_a_terminal_only_while_it_lasts(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr('sys.stderr', terminal)
    with runlog.waiting('compiling'):
        assert terminal.text == '\rcompiling\033[K'
    assert terminal.text == '\rcompiling\033[K\r\033[K'
    monkeypatch.undo()
    with runlog.waiting('compiling'):                   # stderr captured: no terminal
        pass
    assert capsys.readouterr() == ('', '')


def test_trainer_reports_each_minibatch_and_the_log_holds_no_progress(tmp_path, capsys):
    X, y = small_problem(60)
    data = {'L': (X[:40], y[:40]), 'V': (X[40:50], y[40:50]), 'T': (X[50:], y[50:])}
    trainer = nnet.Trainer(nnet.MLP(np.random.RandomState(0), 6, [5], 3), data, 10, 0.1, 0.9, 0.0)
    calls = []
    trainer.progress = lambda *args: calls.append(args)
    trainer.train_epoch('L', 'epoch 1 of 2')
    assert calls == [('epoch 1 of 2', b, 4) for b in range(1, 5)]
    assert runlog.train_and_log(trainer, 2, 'test', {}, {}, str(tmp_path), 0, 1.0) == 0
    out, err = capsys.readouterr()                      # captured: no terminal, so no progress line
    assert err == '' and '\r' not in out and trainer.progress is None


def small_trainer():
    X, y = small_problem(60)
    data = {'L': (X[:40], y[:40]), 'V': (X[40:50], y[40:50]), 'T': (X[50:], y[50:])}
    return nnet.Trainer(nnet.MLP(np.random.RandomState(0), 6, [5], 3), data, 10, 0.1, 0.9, 0.001)


def final_run(folder):
    """(record, parameters and momenta) of the run recorded in folder."""
    record = only_record(folder)
    with np.load(folder / record['params']) as f:
        return record, {k: f[k] for k in f.files if k != 'settings'}


@pytest.mark.parametrize('quickL', [False, True])
@pytest.mark.parametrize('stop', [(0, 'evaluating L', 1, 0), (2, 'epoch', 3, 2), (3, 'evaluating V', 1, 3),
                                  (4, 'evaluating T', 1, 5)])     # ..., the position it records
def test_a_run_stopped_anywhere_and_resumed_ends_as_one_never_stopped(tmp_path, monkeypatch, capsys, stop, quickL):
    """Ctrl-C at (epoch, pass, minibatch), then --resume: the same rows, test figures, parameters, momenta."""
    def run(folder, **resume):
        return runlog.train_and_log(small_trainer(), 4, 'test', {'eta': 0.1}, {}, str(tmp_path / folder), 0, 1.0,
                                    quickL, data_fingerprint='f', **resume)
    assert run('straight') == 0
    straight, straight_arrays = final_run(tmp_path / 'straight')

    class CtrlC(runlog.Progress):
        def __call__(self, what, done, total):
            if (self.epoch, done) == (stop[0], stop[2]) and what.startswith(stop[1]):
                os.kill(os.getpid(), signal.SIGINT)     # its handler runs before the next call returns
                assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    monkeypatch.setattr(runlog, 'Progress', CtrlC)
    assert run('stopped') == 130
    stopped, _ = final_run(tmp_path / 'stopped')
    assert stopped['status'] == 'interrupted' and stopped['position']['epoch'] == stop[3]
    assert 'test.py --resume=%s' % (tmp_path / 'stopped' / stopped['params']) in capsys.readouterr().out
    monkeypatch.undo()
    assert run('resumed', resume=str(tmp_path / 'stopped' / stopped['params'])) == 0
    resumed, resumed_arrays = final_run(tmp_path / 'resumed')
    assert resumed['resumed']['epoch'] == stop[3] and resumed['status'] == 'completed'
    assert [row[:5] for row in resumed['epochs']] == [row[:5] for row in straight['epochs']]
    assert resumed['test'] == straight['test']
    assert sorted(resumed_arrays) == sorted(straight_arrays) and any(k.startswith('momentum_') for k in resumed_arrays)
    for name, array in straight_arrays.items():
        assert np.array_equal(resumed_arrays[name], array), name


def test_resume_takes_the_stopped_runs_settings_and_refuses_what_cannot_go_on(tmp_path, capsys):
    trainer = small_trainer()
    names = ['W1dim', 'eta', 'nepoch', 'outdir', 'resume']
    path = str(tmp_path / 'stopped.npz')

    def saved(status='interrupted', epoch=3, **more):
        trainer.save(path, dict({'W1dim': [64, 5, 5], 'eta': 0.1, 'nepoch': 10, 'outdir': 'elsewhere', 'resume': None,
                                 'status': status, 'position': {'epoch': epoch, 'minibatch': 2, 'cost': 1.0,
                                                                'correct': 5.0}}, **more))

    def resume(*argv, nepoch=10):           # nepoch: the script's
        namespace = {'W1dim': (16, 5, 5), 'eta': 0.01, 'nepoch': nepoch, 'outdir': 'runs', 'resume': None}
        runlog.apply_overrides(namespace, names, ['--resume=%s' % path] + list(argv))
        return namespace
    saved()
    assert resume('--outdir=mine', '--eta=0.1', nepoch=50) == {'W1dim': (64, 5, 5), 'eta': 0.1, 'nepoch': 10,
                                                                'outdir': 'mine', 'resume': path}
    out = capsys.readouterr().out
    assert '# resume: W1dim = (64, 5, 5), as the run being resumed (this script says (16, 5, 5))' in out
    assert '# resume: nepoch = 10, as the run being resumed (this script says 50)' in out
    assert resume('--nepoch=12')['outdir'] == 'elsewhere'
    with pytest.raises(SystemExit, match=r"--eta=0.02: needs the value of the run being resumed, 0.1 .*all but nepoch"):
        resume('--eta=0.02')
    assert resume('--nepoch=3')['nepoch'] == 3                      # it stopped in epoch 3: that one ends it
    with pytest.raises(SystemExit, match='--nepoch=2: needs at least 3 .*its run stopped in epoch 3'):
        resume('--nepoch=2')
    saved(status='completed', epoch=11)
    with pytest.raises(SystemExit, match='--nepoch=10: needs at least 11 .*its run completed 10 epochs'):
        resume()
    assert resume('--nepoch=20')['nepoch'] == 20
    saved(status='diverged')
    with pytest.raises(SystemExit, match='did not diverge'):
        resume()
    nnet.MLP(np.random.RandomState(0), 6, [5], 3).save(path, {'eta': 0.1})        # parameters only
    with pytest.raises(SystemExit, match='saved before runs could be'):
        resume()
    with pytest.raises(SystemExit, match='is not a file'):
        runlog.apply_overrides({'resume': None}, ['resume'], ['--resume=%s' % (tmp_path / 'none.npz')])
    whole = open(path, 'rb').read()
    for damaged in (whole[:len(whole) // 2], b'not a zip', b''):          # cut short, another file, empty
        open(path, 'wb').write(damaged)
        with pytest.raises(SystemExit, match='--resume=.*needs a parameter file of an earlier run: %s is none, or is damaged' % path):
            resume()


def test_a_run_that_fails_in_training_goes_on_from_its_last_logged_row(tmp_path, monkeypatch, capsys):
    """An error in training: no record, no saved file, only the checkpoint written at each logged
    row survives, and the log's last line says how to go on (as after a SIGKILL, which
    test_promises.py sends)."""
    def run(folder, **resume):
        return runlog.train_and_log(small_trainer(), 4, 'test', {'eta': 0.1}, {}, str(tmp_path / folder), 0, 1.0,
                                    data_fingerprint='f', **resume)
    assert run('straight') == 0
    straight, straight_arrays = final_run(tmp_path / 'straight')
    assert not list((tmp_path / 'straight').glob('*.checkpoint.npz'))        # the saved file supersedes it

    class PowerCut(runlog.Progress):
        def __call__(self, what, done, total):
            if (self.epoch, done) == (4, 2) and what.startswith('epoch'):
                raise SystemError('power cut')          # nothing after this runs
    monkeypatch.setattr(runlog, 'Progress', PowerCut)
    capsys.readouterr()
    with pytest.raises(SystemError):
        run('killed')
    monkeypatch.undo()
    assert not list((tmp_path / 'killed').glob('*.record.json'))
    checkpoint, = (tmp_path / 'killed').glob('*.checkpoint.npz')
    assert capsys.readouterr().out.splitlines()[-1] == (
        '# failed in epoch 4 (the error below); to go on from its last logged row: python test.py --resume=%s'
        % checkpoint)
    with np.load(checkpoint) as f:
        assert json.loads(str(f['settings']))['position']['epoch'] == 4      # after the row of epoch 3
    assert run('resumed', resume=str(checkpoint)) == 0
    resumed, resumed_arrays = final_run(tmp_path / 'resumed')
    assert [row[:5] for row in resumed['epochs']] == [row[:5] for row in straight['epochs']]
    assert resumed['test'] == straight['test']
    for name, array in straight_arrays.items():
        assert np.array_equal(resumed_arrays[name], array), name


def test_ctrl_c_before_training_ends_the_driver_with_one_line(capsys):
    def main():
        raise KeyboardInterrupt                 # as while the data load or the compile runs
    assert runlog.run_driver(main) == 130
    assert capsys.readouterr().out == '# interrupted before training started: nothing to save\n'
    assert runlog.run_driver(lambda: 7) == 7
