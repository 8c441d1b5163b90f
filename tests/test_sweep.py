"""sweep.py: which records count as which published configuration, resuming, the table."""
import sweep

BASE = {'W1dim': [16, 5, 5], 'ds1': [4, 4], 'st1': None, 'H2': 1000, 'H3': None, 'eta': 0.01,
        'mu': 0.9, 'lam': 0.0001, 'batchsize': 100, 'nepoch': 50, 'ZCAwhitening': True, 'Wstd': 0.01,
        'seed': 0, 'datadir': None, 'outdir': 'runs', 'datanote': 'rebuilt'}


def record(status='completed', device='cpu: X', **settings):
    return {'script': 'cifar10_convnet', 'status': status, 'device': device,
            'settings': dict(BASE, **settings), 'test': [1.0, 70.0], 'date': '2026-11-28T08:00:00',
            'blas': 'OpenBLAS 0.3.21, Cooperlake kernels (-lopenblas)',
            'seconds': {'data': 1, 'compile': 2, 'train': 300, 'total': 303},
            'epochs': [[0, 2.3, 10, 2.3, 10, 1.0], [50, 0.1, 99, 1.8, 70, 300.0]]}


def test_records_map_to_their_configuration():
    by_number = {entry[0]: entry for entry in sweep.CONFIGS}
    assert sweep.config_of(record()) is by_number[1]
    assert sweep.config_of(record(W1dim=[64, 5, 5], st1=[2, 2])) is by_number[6]
    assert sweep.config_of(record(W1dim=[64, 5, 5], ds1=[2, 2])) is by_number[5]
    assert sweep.config_of(record(W1dim=[32, 5, 5])) is None


def test_resume_skips_only_completed_runs_of_the_same_settings_and_device():
    overrides = sweep.CONFIGS[1][2]                           # 64 filters
    done = record(W1dim=[64, 5, 5])
    assert sweep.matches(done, overrides, BASE, 'cpu: X')
    assert sweep.matches(dict(done, settings=dict(done['settings'], datanote='other', outdir='x')),
                         overrides, BASE, 'cpu: X')          # labels and paths do not count
    assert not sweep.matches(done, overrides, BASE, 'cuda: H100')
    assert not sweep.matches(record(status='interrupted', W1dim=[64, 5, 5]), overrides, BASE, 'cpu: X')
    assert not sweep.matches(done, overrides, dict(BASE, nepoch=5), 'cpu: X')
    plan = sweep.to_run({1, 2}, False, BASE, 'cpu: X', [done])
    assert [(entry[0], recorded) for entry, recorded in plan] == [(1, False), (2, True)]
    plan = sweep.to_run({2}, True, BASE, 'cpu: X', [done])      # --again
    assert [(entry[0], recorded) for entry, recorded in plan] == [(2, False)]


def test_table_lists_completed_runs_beside_the_published_numbers():
    rows, done = sweep.table([record(), record(status='interrupted'), record(W1dim=[64, 5, 5])])
    assert len(done) == 2 and len(rows) == 4
    assert rows[2].startswith('| 1 | 16 filters (the default run) | 73.69% 61m45s | 73.85% 10m19s | **70.00** |')
    assert '| 5m03s | 50 | cpu: X | OpenBLAS 0.3.21, Cooperlake kernels | 2026-11-28 | rebuilt |' in rows[2]
