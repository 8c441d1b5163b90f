"""Nothing lost, nothing cryptic: bad settings refused before any work, folders made ready,
the record and parameters saved whatever happens, damaged records skipped, the ZCA cache safe."""
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import cifar10
import nnet
from engine import download, records, runlog
from conftest import ROOT, driver_settings, make_cifar, only_record, small_problem


@pytest.fixture(scope='module')
def settings():
    return {script: driver_settings([script]) for script in ('cifar10_convnet.py', 'mnist_mlp.py')}


def as_defaults(saved):
    """The drivers' settings as their globals hold them (JSON made the tuples lists)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


@pytest.mark.parametrize('arg, message', [
    ('--nepoch=-1', 'an integer >= 0'),
    ('--nepoch=1.0', 'an integer >= 0'),
    ('--batchsize=0', 'a positive integer'),
    ('--batchsize=1e2', 'a positive integer'),
    ('--W1dim=(16,5)', 'a tuple of 3 positive integers'),
    ('--W1dim=(0,5,5)', 'a tuple of 3 positive integers'),
    ('--st1=(0,0)', 'None (the stride is the window) or a tuple of 2 positive integers'),
    ('--st1=2', 'None (the stride is the window) or a tuple of 2 positive integers'),
    ('--H2=0', 'a positive integer, or None to drop the layer'),
    ('--H2=1.5', 'a positive integer, or None to drop the layer'),
    ('--mu=5', 'a number from 0 up to, not including, 1'),
    ('--mu=1', 'a number from 0 up to, not including, 1'),
    ('--lam=-1', 'a number >= 0'),
    ('--eta=-0.01', 'a positive number'),
    ('--eta=nan', 'a positive number'),
    ('--seed=-1', 'an integer from 0'),
    ('--ZCAwhitening=1', 'True or False'),
    ('--outdir=', 'a folder'),
])
@pytest.mark.parametrize('script', ['cifar10_convnet.py', 'mnist_mlp.py'])
def test_bad_settings_are_refused_with_one_line_naming_them(settings, script, arg, message):
    name = arg[2:].split('=')[0]
    if name not in settings[script]:
        pytest.skip('%s has no %s' % (script, name))
    namespace = as_defaults(settings[script])
    with pytest.raises(SystemExit) as stop:
        runlog.apply_overrides(namespace, list(namespace), [arg])
    text = str(stop.value.code)
    assert text.startswith('error: --%s=' % name) and message in text and '\n' not in text


@pytest.mark.parametrize('script', ['cifar10_convnet.py', 'mnist_mlp.py'])
def test_the_published_settings_and_dropped_layers_pass(settings, script):
    namespace = as_defaults(settings[script])
    runlog.apply_overrides(namespace, list(namespace), ['--H2=None', '--eta=1', '--nepoch=0'])
    assert namespace['H2'] is None and namespace['eta'] == 1.0


@pytest.mark.parametrize('args, message', [
    (['--ds1=(40,40)'], "error: --ds1=(40, 40): needs a window of at most 28x28, the map that 5x5 filters leave"),
    (['--W1dim=(16,33,5)'], 'error: --W1dim=(16, 33, 5): needs filters of at most 32x32, the image'),
    (['--W1dim=(16,9,9)', '--ds1=(25,4)'], 'error: --ds1=(25, 4): needs a window of at most 24x24'),
    (['--outdir=/dev/null/x'], "error: --outdir='/dev/null/x': needs a folder that can be created"),
    (['--datadir=/etc/passwd'], "error: --datadir='/etc/passwd': needs a folder: /etc/passwd is a file"),
])
def test_shapes_and_folders_are_refused_before_data_are_loaded(tmp_path, args, message):
    out = subprocess.run([sys.executable, 'cifar10_convnet.py', '--nepoch=1'] + args, cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NNET_DATADIR=str(tmp_path / 'none')))
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(message)
    assert 'data:' not in out.stdout and not (tmp_path / 'none').exists()


@pytest.mark.parametrize('script', ['cifar10_convnet.py', 'mnist_mlp.py'])
@pytest.mark.parametrize('flags, rc, line', [
    ('device=cdua', None,
     'error: THEANO_FLAGS: device=cdua is not a valid value; valid options start with one of "cpu", "opencl" or "cuda"'),
    ('floatX=float16x', None,
     "error: THEANO_FLAGS: floatX=float16x is not a valid value; valid options are ('float64', 'float32', 'float16')"),
    ('', 'openmp = perhaps', 'error: .theanorc: openmp=perhaps is not a valid value; valid options: True, False'),
])
def test_a_flag_value_theano_refuses_is_one_line_before_anything_runs(tmp_path, script, flags, rc, line):
    theanorc = tmp_path / 'theanorc'
    theanorc.write_text('[global]\n%s\n' % (rc or ''))
    out = subprocess.run([sys.executable, script, '--nepoch=1'], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, THEANO_FLAGS=flags, THEANORC=str(theanorc),
                                               NNET_DATADIR=str(tmp_path / 'none')))
    assert (out.returncode, out.stderr, out.stdout) == (1, line + '\n', '')
    assert not (tmp_path / 'none').exists()


def test_a_full_disk_is_one_line_a_failed_write_and_the_run_saves_whole_elsewhere(tmp_path):
    """The outdir on a 64 KiB file system (a tmpfs, mounted in a user namespace of the run's own):
    the checkpoint and the parameters do not fit."""
    full, spare, data = tmp_path / 'full', tmp_path / 'spare', tmp_path / 'data'
    for folder in (full, spare):
        folder.mkdir()
    make_cifar(str(data))
    mounted = ('d=$1; shift; mount -t tmpfs -o size=64k tmpfs "$d" || exit 99; "$@"; rc=$?; '
               'echo "outdir holds: $(ls -A "$d")"; exit $rc')
    in_namespace = ['unshare', '-Urm', 'sh', '-c', mounted, 'sh', str(full)]
    if not shutil.which('unshare') or subprocess.run(in_namespace + ['true'], capture_output=True).returncode:
        pytest.skip('no user namespace here to mount a small file system in (unshare -Urm)')
    out = subprocess.run(in_namespace + [sys.executable, 'cifar10_convnet.py', '--nepoch=1', '--W1dim=(4,5,5)',
                                         '--datadir=' + str(data), '--outdir=' + str(full)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, TMPDIR=str(spare)))
    output = out.stdout + out.stderr
    assert out.returncode == 0, output
    assert 'Traceback' not in output and 'Exception ignored' not in output
    failed = [line for line in output.splitlines() if 'could not' in line]
    assert len(failed) == 2, failed                         # the checkpoint, then the parameters
    assert failed[0].startswith('# could not write the checkpoint %s/' % full) and 'No space left' in failed[0]
    assert failed[1] == '# could not save in %s: [Errno 28] No space left on device; trying the temporary ' \
                        'folder instead' % full
    record, params = output.splitlines()[-3:-1]
    assert record.startswith('# record: %s/' % spare) and params.startswith('# parameters: %s/' % spare)
    saved = only_record(spare)
    assert (spare / saved['params']).exists() and saved['status'] == 'completed'
    assert output.splitlines()[-1] == 'outdir holds: '     # no record without its parameters


def test_folders_expand_home_and_variables_and_resolve_beside_the_scripts(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('SOMEWHERE', str(tmp_path / 'var'))
    assert runlog.folder('datadir', '~/x') == str(tmp_path / 'x') and (tmp_path / 'x').is_dir()
    assert runlog.folder('outdir', '$SOMEWHERE/runs') == str(tmp_path / 'var' / 'runs')
    assert runlog.folder('outdir', 'runs') == os.path.join(ROOT, 'runs')     # whatever the current folder
    monkeypatch.setenv('NNET_DATADIR', '~/data')
    assert download.default_datadir() == str(tmp_path / 'data')
    assert records.records_folder({'outdir': 'runs'}) == os.path.join(ROOT, 'runs')


def trained_trainer():
    X, y = small_problem(60)
    data = {'L': (X[:40], y[:40]), 'V': (X[40:50], y[40:50]), 'T': (X[50:], y[50:])}
    return nnet.Trainer(nnet.MLP(np.random.RandomState(0), 6, [5], 3), data, 10, 0.1, 0.9, 0.0)


def test_an_unwritable_output_folder_at_the_end_falls_back_to_the_temporary_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runlog.tempfile, 'gettempdir', lambda: str(tmp_path / 'tmp'))
    blocked = tmp_path / 'file'
    blocked.write_text('')
    code = runlog.train_and_log(trained_trainer(), 1, 'test', {}, {}, str(blocked / 'runs'), 0, 1.0)
    assert code == 0
    record = only_record(tmp_path / 'tmp')
    assert (tmp_path / 'tmp' / record['params']).exists()
    out = capsys.readouterr().out
    assert 'could not save in %s' % (blocked / 'runs') in out and 'trying the temporary folder' in out
    assert '# parameters: %s' % (tmp_path / 'tmp' / record['params']) in out


def test_record_first_then_parameters_and_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    trainer = trained_trainer()
    order = []
    real_write, real_save = runlog.write_record, trainer.net.save

    class FullDisk:         # a parameter file that takes part of its bytes, then no more
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def write(self, data):
            self.file.write(b'partial')
            raise OSError(28, 'No space left on device')

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()
    monkeypatch.setattr(runlog, 'write_record', lambda *a: (order.append('record'), real_write(*a)))
    monkeypatch.setattr(trainer.net, 'save', lambda *a: (order.append('params'), real_save(*a)))
    monkeypatch.setattr(nnet, 'open', FullDisk, raising=False)
    monkeypatch.setattr(runlog.tempfile, 'gettempdir', lambda: str(tmp_path / 'tmp'))
    assert runlog.train_and_log(trainer, 1, 'test', {}, {}, str(tmp_path / 'runs'), 0, 1.0) == 74
    # the first row's checkpoint (failed: no more tried), then the record and the parameters, twice
    assert order == ['params', 'record', 'params', 'record', 'params']
    assert os.listdir(tmp_path / 'runs') == []      # no .tmp.npz left, and no record without its parameters


def test_parameter_and_record_files_never_overwrite_each_other(tmp_path):
    first = records.new_params_path(str(tmp_path), 'test')
    open(first, 'w').close()
    second = records.new_params_path(str(tmp_path), 'test')
    assert second != first and str(os.getpid()) in os.path.basename(first)
    records.write_record(records.record_path(second), {'script': 'b'})
    third = records.new_params_path(str(tmp_path), 'test')
    assert third not in (first, second)                         # its record alone holds a name
    with pytest.raises(FileExistsError):                        # and is never written over
        records.write_record(records.record_path(second), {'script': 'c'})
    assert only_record(tmp_path) == {'script': 'b'}
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (first, records.record_path(second)))


def test_records_of_every_kind_are_read_oldest_first_and_damaged_ones_skipped(tmp_path, capsys):
    (tmp_path / 'results.jsonl').write_text('{"script": "a", "date": "2026-11-01T00:00:00"}\n{"script": "b", "cut off\n'
                                            '{"script": "c", "date": "2026-12-01T00:00:00"}\n')
    records.write_record(str(tmp_path / 'x-1.record.json'), {'script': 'd', 'date': '2026-11-15T00:00:00'})
    (tmp_path / 'x-2.record.json').write_text('{"script": "e", "cut')
    assert [r['script'] for r in records.read_records(str(tmp_path))] == ['a', 'd', 'c']
    err = capsys.readouterr().err
    assert 'results.jsonl, line 2 is damaged; skipped' in err and 'x-2.record.json cannot be read' in err


def test_zca_cache_writers_side_by_side_keep_one_complete_copy_and_no_temporary_folders(tmp_path):
    path = str(tmp_path / 'cache' / 'cifar10-zca-0123')
    os.makedirs(path + '.tmp999999999-1')                 # left by a writer that was killed
    arrays = {n: np.full((200, 30), i, np.float32) for i, n in enumerate(('mean', 'zca', 'L', 'V', 'T'))}
    writers = [threading.Thread(target=cifar10._save_cache, args=(path, arrays, {'key': 'k'})) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert sorted(os.listdir(tmp_path / 'cache')) == ['cifar10-zca-0123']
    splits = {n: np.empty((200, 30), np.float32) for n in ('L', 'V', 'T')}
    assert cifar10._load_cache(path, 'k', splits) and splits['V'][0, 0] == 3
    assert np.load(os.path.join(path, 'zca.npy'))[0, 0] == 1                  # the fit kept beside the rows
    mtime = os.path.getmtime(os.path.join(path, 'meta.json'))
    cifar10._save_cache(path, arrays, {'key': 'k'})            # a later writer keeps the first copy
    assert os.path.getmtime(os.path.join(path, 'meta.json')) == mtime


def test_other_zca_caches_are_listed_with_their_size(tmp_path):
    make_cifar(str(tmp_path))
    lines = []
    cifar10.load(str(tmp_path), log=lines.append)
    cifar10.flush_cache()
    cifar10.load(str(tmp_path), epsilon=0.01, log=lines.append)
    cifar10.flush_cache()
    assert lines[-1].startswith('other ZCA caches in %s' % (tmp_path / 'cache')) and ' MB)' in lines[-1]
