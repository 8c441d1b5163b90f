"""runlog.py: the published log, records and parameters on Ctrl-C, --name=value overrides."""
import json

import numpy as np
import pytest

import nnet
import runlog
from conftest import small_problem


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
    (tmp_path / 'results.jsonl').write_text('{"earlier": 1}\n')
    code = runlog.train_and_log(trainer, 10, 'test', {'eta': 0.1}, {'device': 'cpu'}, str(tmp_path), 0, 1.0)
    assert code == 130
    lines = (tmp_path / 'results.jsonl').read_text().splitlines()
    assert json.loads(lines[0]) == {'earlier': 1}
    record = json.loads(lines[1])
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

    def evaluate(self, split):
        return {'L': 1.0, 'V': 2.0, 'T': 3.0}[split] + self.epochs_done / 100, 50.0 + self.epochs_done

    def train_epoch(self, split='L', what='training'):
        assert split == 'L'
        self.epochs_done += 1
        return 9.0, 9.0                      # the training pass's own running figures


@pytest.mark.parametrize('quickL', [False, True])
def test_log_schedule_and_which_split_each_row_evaluates(tmp_path, capsys, quickL):
    trainer = ScriptedTrainer()
    assert runlog.train_and_log(trainer, 25, 'test', {}, {}, str(tmp_path), 0, 1.0, quickL) == 0
    record = json.loads((tmp_path / 'results.jsonl').read_text())
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
