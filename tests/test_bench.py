"""The benchmarks' command lines (their figures are measured by running them, not tested)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
import bench_run  # noqa: E402
import bench_train  # noqa: E402
from conftest import driver_settings  # noqa: E402


def test_options_read_name_value_pairs():
    assert bench_train.options(['--configs=64,default', '--batches=20'], 'usage') == {
        'configs': '64,default', 'batches': '20'}


def test_help_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        bench_train.options(['--batches=20', '--help'], 'usage: the docstring')
    assert stop.value.code == 0 and capsys.readouterr().out == 'usage: the docstring\n'


@pytest.mark.parametrize('argv', [['--nepoch'], ['nepoch=2'], ['--configs=64', '-x']])
def test_anything_else_stops_with_the_remedy(argv):
    with pytest.raises(SystemExit) as stop:
        bench_train.options(argv, 'usage')
    assert 'arguments are --name=value (see --help)' in str(stop.value.code)


def test_the_twin_evaluates_in_the_drivers_minibatches():
    import nnet
    assert bench_train.EVAL_ROWS == nnet.EVAL_ROWS


@pytest.mark.parametrize('config', sorted(bench_train.CONFIGS))
def test_each_configuration_is_its_drivers_network_and_settings(config):
    """What bench_train times and the twin computes is what bench_run's driver command runs."""
    setup = bench_train.CONFIGS[config]
    settings = driver_settings(bench_run.driver_command(config))
    assert [settings[k] for k in ('H1', 'H2', 'H3') if settings.get(k)] == setup.hidden
    assert (settings['eta'], settings['mu'], settings['lam'], settings['batchsize'], settings['Wstd']) == (
        setup.eta, setup.mu, setup.lam, bench_train.BATCH, bench_train.WSTD)
    if setup.convpool:
        filters, ds, st = setup.convpool
        assert (settings['W1dim'], settings['ds1'], settings['st1']) == ([filters, 5, 5], list(ds), st and list(st))
    else:
        assert 'W1dim' not in settings
