"""sweep.py: which records count as which published configuration, resuming, the table."""
import pytest

import sweep
from engine import records, report, sweeping

BASE = {'W1dim': [16, 5, 5], 'ds1': [4, 4], 'st1': None, 'H2': 1000, 'H3': None, 'eta': 0.01,
        'mu': 0.9, 'lam': 0.0001, 'batchsize': 100, 'nepoch': 50, 'ZCAwhitening': True, 'Wstd': 0.01,
        'seed': 0, 'conv': 'auto', 'datadir': None, 'quickL': False, 'outdir': 'runs', 'datanote': 'rebuilt'}
DATA = 'f' * 40


def record(status='completed', device='cpu: X, AVX-512', sizes=None, data=DATA, **settings):
    return {'script': 'cifar10_convnet', 'status': status, 'device': device,
            'settings': dict(BASE, **settings), 'test': [1.0, 70.0], 'date': '2026-11-28T08:00:00',
            'blas': '-lopenblas; OpenBLAS kernels: system 0.3.21 Cooperlake',
            'data_fingerprint': data, 'data_sizes': sizes or dict(records.PUBLISHED_SIZES),
            'seconds': {'data': 1, 'compile': 2, 'train': 300, 'total': 303},
            'epochs': [[0, 2.3, 10, 2.3, 10, 1.0], [50, 0.1, 99, 1.8, 70, 300.0]]}


def runs(*numbers, base=BASE, **point):
    """The sweep's runs of these configurations at base, with this grid point."""
    return [sweeping.Run(entry, point, dict(base, **records.as_recorded(entry[2]), **point), [])
            for entry in records.CONFIGS if entry[0] in numbers]


def test_records_map_to_their_configuration():
    by_number = {entry[0]: entry for entry in records.CONFIGS}
    assert records.config_of(record(), BASE) is by_number[1]
    assert records.config_of(record(W1dim=[64, 5, 5], st1=[2, 2]), BASE) is by_number[6]
    assert records.config_of(record(W1dim=[64, 5, 5], ds1=[2, 2]), BASE) is by_number[5]
    assert records.config_of(record(W1dim=[32, 5, 5]), BASE) is None
    # computed another way, logged another way, other labels and paths: the same configuration
    assert records.config_of(record(conv='im2col', quickL=True, datanote='x', outdir='o'), BASE) is by_number[1]
    assert records.config_of(record(resume='/runs/stopped.npz'), BASE) is by_number[1]       # resumed
    assert records.config_of(record(), dict(BASE, resume=None)) is by_number[1]     # recorded before --resume


@pytest.mark.parametrize('setting, value', [
    ('nepoch', 0), ('eta', 0.5), ('mu', 0.5), ('lam', 0.0), ('batchsize', 50), ('ZCAwhitening', False),
    ('H2', 10), ('Wstd', 0.1), ('seed', 1)])
def test_a_run_that_differs_in_any_defining_setting_is_another_run(setting, value):
    r = record(**{setting: value})
    assert records.config_of(r, BASE) is None
    summary, every, done = report.table([r], BASE)
    assert done == [] and any(row.startswith('| 1 | %s=' % setting) for row in every)
    assert any(row.startswith('| 1 | %s=' % setting) for row in summary)       # on the published data: a grid's


def test_a_run_on_other_data_sizes_or_unfingerprinted_data_is_another_run():
    small = record(sizes={'L': 400, 'V': 100, 'T': 100})
    old = record()
    del old['data_sizes'], old['data_fingerprint']
    for r, shown in ((small, 'data NL/NV/NT 400/100/100'), (old, 'not fingerprinted')):
        assert records.config_of(r, BASE) is None
        assert shown in report.differences(r, BASE)


def test_only_takes_the_published_configurations_numbers():
    assert sweep.configuration_numbers('1,2,6') == {1, 2, 6}
    for wrong in ('9', '0,1', 'x', '', '1,,2'):
        with pytest.raises(SystemExit, match='--only=%s: needs numbers of the published configurations, from '
                                             '1, 2, 3, 4, 5, 6' % wrong):
            sweep.configuration_numbers(wrong)


def test_resume_skips_only_completed_runs_of_the_same_settings_device_and_data():
    settings = runs(2)[0].settings                            # 64 filters
    done = record(W1dim=[64, 5, 5])
    assert records.matches(done, settings, 'cpu: X, AVX-512', DATA)
    assert records.matches(dict(done, settings=dict(done['settings'], datanote='other', outdir='x')),
                         settings, 'cpu: X, AVX-512', DATA)          # labels and paths do not count
    assert not records.matches(done, settings, 'cuda: H100', DATA)
    assert not records.matches(done, settings, 'cpu: X, AVX-512', 'e' * 40)   # other data: run it
    assert not records.matches(record(status='interrupted', W1dim=[64, 5, 5]), settings, 'cpu: X, AVX-512', DATA)
    assert not records.matches(done, dict(settings, nepoch=5), 'cpu: X, AVX-512', DATA)
    assert not records.matches(done, dict(settings, eta=0.02), 'cpu: X, AVX-512', DATA)     # another grid point
    gpu = dict(done, device='NVIDIA H100 (cuda1)')
    assert records.matches(gpu, settings, 'NVIDIA H100 (cuda)', DATA)        # any GPU of the kind
    plan = sweeping.to_run(runs(1, 2), False, 'cpu: X, AVX-512', DATA, [done])
    assert [(run.entry[0], recorded, stopped) for run, recorded, stopped in plan] == [(1, False, None), (2, True, None)]
    plan = sweeping.to_run(runs(2), True, 'cpu: X, AVX-512', DATA, [done])      # --again
    assert [(run.entry[0], recorded) for run, recorded, stopped in plan] == [(2, False)]


def test_a_configuration_whose_last_run_stopped_goes_on_from_its_file(tmp_path):
    (tmp_path / 'stopped.npz').write_bytes(b'')

    def stopped(*records):
        return [s for run, recorded, s in sweeping.to_run(runs(1), False, 'cpu: X, AVX-512', DATA, list(records),
                                                       str(tmp_path))]
    interrupted = dict(record(status='interrupted'), params='stopped.npz', position={'epoch': 7})
    assert stopped(record(), interrupted) == [str(tmp_path / 'stopped.npz')]
    assert stopped(interrupted, record()) == [None]                     # a later run finished
    assert stopped(dict(interrupted, params='gone.npz')) == [None]      # its file deleted
    assert stopped(dict(interrupted, device='cuda: H100')) == [None]    # another device's
    assert stopped(dict(record(status='interrupted'), params='stopped.npz')) == [None]  # saved before --resume


def test_table_lists_completed_runs_beside_the_published_numbers():
    summary, every, done = report.table([record(), record(status='interrupted'), record(W1dim=[64, 5, 5])], BASE)
    assert len(done) == 2 and len(summary) == len(every) == 6             # one run each
    assert summary[2] == ('| # | configuration | published CPU | published Tesla K20c | our test % | data s | '
                          'compile s | train s | total | device | date |')
    assert summary[4] == ('| 1 | 16 filters (the default run) | 73.69% 61m45s | 73.85% 10m19s | **70.00** | 1.0 | '
                          '2.0 | 300.0 | 5m03s | cpu: X, AVX-512 | 2026-11-28 |')
    assert summary[5].startswith('| 2 | 64 filters | - | 75.92% 13m01s | **70.00** |')
    assert every[2].endswith('| total | device | BLAS | date | data |') and set(every[3]) == {'|', '-'}
    assert every[4] == ('| 1 | 16 filters (the default run) | 73.69% 61m45s | 73.85% 10m19s | **70.00** | 1.0 | '
                        '2.0 | 300.0 | 5m03s | cpu: X, AVX-512 | -lopenblas; OpenBLAS kernels: system 0.3.21 Cooperlake | '
                        '2026-11-28 | ffffffff rebuilt |')
    assert every[3].count('---') == every[2].count('|') - 1 and summary[3].count('---') == summary[2].count('|') - 1
    resumed = dict(record(resume='/runs/stopped.npz'), resumed={'epoch': 20, 'train_seconds': 100.0})
    assert '| 5m03s (resumed) | cpu: X, AVX-512 |' in report.table([resumed], BASE)[0][4]   # its last process's time only


def test_the_summary_holds_each_configurations_newest_run_on_each_device():
    def run(date, accuracy, **kw):
        return dict(record(**kw), date=date, test=[1.0, accuracy])
    runs = [run('2026-11-29T09:00:00', 71.0), run('2026-11-28T09:00:00', 70.0), run('2026-11-28T10:00:00', 72.0,
            W1dim=[64, 5, 5]), dict(run('2026-11-27T09:00:00', 73.0), device='cuda: H200')]
    summary, every, done = report.table(runs, BASE)
    shown = [(row.split(' | ')[0], row.split(' | ')[4], row.split(' | ')[9]) for row in summary[4:]]
    assert shown == [('| 1', '**71.00**', 'cpu: X, AVX-512'), ('| 1', '**73.00**', 'cuda: H200'), ('| 2', '**72.00**', 'cpu: X, AVX-512')]
    assert [row.split(' | ')[4] for row in every[4:]] == ['**73.00**', '**70.00**', '**71.00**', '**72.00**']


def test_the_page_keeps_its_text_around_the_generated_part():
    page = 'head\n%s\nold table\n%s\ntail\n' % (report.TABLE_START, report.TABLE_END)
    new = report.filled(page, report.with_pictures(['summary'], ['learning_curves.png']))
    assert new == ('head\n%s\nsummary\n\n![learning curves](results/learning_curves.png)\n%s\ntail\n'
                   % (report.TABLE_START, report.TABLE_END))
    assert report.filled(new, report.with_pictures(['summary'], ['learning_curves.png'])) == new
    with pytest.raises(SystemExit, match='markers'):
        report.filled('head\n' + report.TABLE_START + '\n', [])


def test_the_table_goes_to_the_results_page_every_run_to_the_history_and_the_glance_to_the_readme(
        tmp_path, monkeypatch):
    """Without matplotlib the pictures already drawn stay on the page."""
    import builtins
    import json
    page, history, pictures = tmp_path / 'RESULTS.md', tmp_path / 'docs' / 'history.md', tmp_path / 'results'
    front = tmp_path / 'README.md'
    for text in (page, front):
        text.write_text('notes\n%s\n%s\nreading\n' % (report.TABLE_START, report.TABLE_END))
    pictures.mkdir()
    (pictures / 'learning_curves.png').write_bytes(b'png')
    (tmp_path / 'results.jsonl').write_text(json.dumps(dict(record(), device='cpu: AMD EPYC, 2 cores')) + '\n')
    for name, value in (('PAGE', str(page)), ('HISTORY', str(history)), ('PICTURES', str(pictures)),
                        ('FRONT', str(front))):
        monkeypatch.setattr(report, name, value)
    monkeypatch.setattr(sweeping, 'driver_defaults', lambda argv: (dict(BASE, outdir=str(tmp_path)), 'cpu: X'))
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, '__import__', lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith('matplotlib') else real_import(name, *a, **k))
    sweep.table([])
    text = page.read_text()
    assert text.startswith('notes\n') and text.endswith('\nreading\n')
    assert '![learning curves](results/learning_curves.png)' in text and 'Every run' not in text
    assert '| cpu: AMD EPYC, 2 cores, AVX-512 | 2026-11-28 |' in text       # told from an AVX2 one
    assert 'Every run of the published configurations' in history.read_text()
    assert '| ffffffff rebuilt |' in history.read_text()                     # the data's own description
    assert '| 1. 16 filters (the default run) | 73.69% 61m45s | 73.85% 10m19s | 70.00% 5m03s |  |' in front.read_text()


@pytest.mark.parametrize('device, blas, label', [
    ('cpu: AMD EPYC, 2 cores', 'system 0.3.21 SkylakeX, numpy\'s 0.3.20 SkylakeX (OPENBLAS_CORETYPE=SkylakeX)',
     'cpu: AMD EPYC, 2 cores, AVX-512'),
    ('cpu: AMD EPYC, 2 cores', 'system 0.3.21 Haswell', 'cpu: AMD EPYC, 2 cores, AVX2'),
    ('cpu: AMD EPYC, 2 cores, AVX2', 'system 0.3.21 SkylakeX', 'cpu: AMD EPYC, 2 cores, AVX2'),
    ('NVIDIA H200 (cuda)', 'system 0.3.26 SkylakeX', 'NVIDIA H200 (cuda)')])
def test_older_cpu_records_are_told_apart_by_their_kernels(device, blas, label):
    assert records.device_label({'device': device, 'blas': '-lopenblas; OpenBLAS kernels: ' + blas}) == label


def test_mnist_runs_have_their_own_table():
    mnist = dict(record(), script='mnist_mlp', settings={'H1': 1000, 'H2': None, 'eta': 0.1, 'datadir': None},
                 data_sizes={'L': 50000, 'V': 10000, 'T': 10000})
    summary, every, done = report.table([record(), mnist, dict(mnist, status='interrupted')], BASE)
    assert done == [(records.CONFIGS[0], record())]
    mnist_rows = summary[summary.index('| settings | our test % | data s | compile s | train s | total | device | BLAS'
                                       ' | date | data |') + 2:]
    assert mnist_rows == ['| H1=1000, H2=null, eta=0.1 | **70.00** | 1.0 | 2.0 | 300.0 | 5m03s | cpu: X, AVX-512 | '
                          '-lopenblas; OpenBLAS kernels: system 0.3.21 Cooperlake | 2026-11-28 | ffffffff rebuilt |']
    # (recorded without a note, it takes the note of the other runs on the same data)
    assert report.table([record()], BASE)[0] == summary[:-6]        # no MNIST runs: no MNIST table


def test_parameter_files_resolve_from_the_records_folder(tmp_path):
    folder = str(tmp_path / 'elsewhere')
    assert records.params_path({'params': 'cifar10_convnet-1.npz'}, folder) == \
        str(tmp_path / 'elsewhere' / 'cifar10_convnet-1.npz')
    assert records.params_path({'params': 'runs/cifar10_convnet-1.npz'}, folder) == \
        str(tmp_path / 'elsewhere' / 'cifar10_convnet-1.npz')             # older records: a path from the cwd


def test_a_killed_runs_checkpoint_is_found_by_its_settings(tmp_path):
    import json
    import os
    import subprocess
    import sys
    import numpy as np
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()                                                 # a process id no longer running

    def checkpoint(pid, **settings):
        path = tmp_path / ('cifar10_convnet-20261129-120000-%d.checkpoint.npz' % pid)
        np.savez(path, settings=json.dumps(dict(BASE, status='checkpoint', position={'epoch': 11}, device='cpu: X, AVX-512',
                                                data_fingerprint=DATA, **settings)))
        return str(path)

    def stopped(*records):
        return [s for run, recorded, s in sweeping.to_run(runs(1, 2), False, 'cpu: X, AVX-512', DATA, list(records),
                                                       str(tmp_path))]
    killed = checkpoint(gone.pid)
    assert stopped() == [killed, None]                          # configuration 1's, not 2's
    (tmp_path / ('cifar10_convnet-20261129-130000-%d.checkpoint.npz' % gone.pid)).write_bytes(b'PK\x03\x04 cut')
    assert stopped() == [killed, None]                          # a damaged file is passed over
    finished_later = dict(record(), date='2999-01-01T00:00:00')
    assert stopped(finished_later) == [None, None]              # a run here ended after it was written
    assert stopped(record()) == [killed, None]                  # ... or before: it goes on
    os.remove(killed)
    checkpoint(os.getpid())
    assert stopped() == [None, None]                            # its run is still going
    checkpoint(gone.pid, W1dim=[64, 5, 5])
    assert stopped() == [None, str(tmp_path / ('cifar10_convnet-20261129-120000-%d.checkpoint.npz' % gone.pid))]


def test_table_without_records_leaves_the_page_alone(tmp_path, monkeypatch):
    """`sweep.py table --outdir=` a folder without records (a typo) emptied RESULTS.md's tables."""
    page = tmp_path / 'RESULTS.md'
    page.write_text('head\n%s\nthe table\n%s\ntail\n' % (report.TABLE_START, report.TABLE_END))
    monkeypatch.setattr(report, 'PAGE', str(page))
    monkeypatch.setattr(sweeping, 'driver_defaults', lambda argv: (dict(BASE, outdir=str(tmp_path)), 'cpu: X, AVX-512'))
    with pytest.raises(SystemExit, match='no records in %s: .* left as it is' % tmp_path):
        sweep.table([])
    assert 'the table' in page.read_text()


def test_the_readme_table_puts_the_newest_cpu_and_gpu_runs_beside_the_published_figures():
    gpu = dict(record(), device='NVIDIA H200 (cuda)', test=[1.0, 70.8], date='2026-11-29T09:00:00',
               seconds={'data': 1, 'compile': 2, 'train': 10, 'total': 23.2})
    older = dict(record(), test=[1.0, 69.0], date='2026-11-27T09:00:00')
    rows = report.glance(report.table([older, record(), gpu], BASE)[2])
    assert rows[2] == '| 1. 16 filters (the default run) | 73.69% 61m45s | 73.85% 10m19s | 70.00% 5m03s | 70.80% 23 s |'
    assert rows[3].endswith('| 75.92% 13m01s |  |  |')
    assert rows[-1] == 'Ours on cpu: X, AVX-512 and NVIDIA H200 (cuda).'
