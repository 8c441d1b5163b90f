"""The benchmarks' command lines (their figures are measured by running them, not tested)."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
import bench_run  # noqa: E402
import bench_train  # noqa: E402
from conftest import driver_settings, theano_flags  # noqa: E402


DEFAULTS = {'batches': 100, 'conv': 'auto'}


def test_options_read_name_value_pairs():
    assert bench_train.options(['--configs=64,default', '--batches=20'], 'usage', DEFAULTS) == {
        'configs': ['64', 'default'], 'batches': 20, 'conv': 'auto'}
    assert bench_train.options([], 'usage', DEFAULTS) == dict(DEFAULTS, configs=list(bench_train.CONFIGS))


def test_help_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        bench_train.options(['--batches=20', '--help'], 'usage: the docstring', DEFAULTS)
    assert stop.value.code == 0 and capsys.readouterr().out == 'usage: the docstring\n'


@pytest.mark.parametrize('argv, message', [
    (['--nepoch'], 'arguments are --name=value (see --help)'),
    (['nepoch=2'], 'arguments are --name=value (see --help)'),
    (['--configs=64', '-x'], 'arguments are --name=value (see --help)'),
    (['--batch=20'], '--batch: not an option here; they are --batches, --conv, --configs (see --help)'),
    (['--batches=x'], '--batches=x: needs a positive whole number'),
    (['--batches=0'], '--batches=0: needs a positive whole number'),
    (['--configs=default,128'], '--configs=default,128: needs names from default, 64, 64-overlap, mnist-mlp')])
def test_anything_else_stops_with_one_line_and_the_remedy(argv, message):
    with pytest.raises(SystemExit) as stop:
        bench_train.options(argv, 'usage', DEFAULTS)
    assert stop.value.code == 'error: ' + (argv[-1] + ': ' + message if message.startswith('arguments') else message)


@pytest.mark.parametrize('argv', [['--torch-mode=graph'], ['--torch-mode=compiled', '--torch-device=cuda']])
def test_the_twin_as_a_cuda_graph_is_asked_for_on_the_gpu_only(argv):
    with pytest.raises(SystemExit) as stop:
        bench_train.main(['--only=pytorch'] + argv)
    assert stop.value.code == 'error: %s: needs eager, or graph with --torch-device=cuda' % argv[0]


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


@pytest.mark.parametrize('command', [['bench_train.py', '--only=theano', '--configs=mnist-mlp', '--batches=1'],
                                     ['bench_compile.py', '--configs=mnist-mlp', '--rounds=1']])
def test_a_gpu_that_did_not_start_gets_no_cpu_figures_under_its_label(command):
    """Theano runs on the CPU when the GPU does not start; the benchmarks measured that as `cuda`."""
    bench = os.path.join(os.path.dirname(bench_train.__file__), command[0])
    out = subprocess.run([sys.executable, bench] + command[1:], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, THEANO_FLAGS=theano_flags('device=cuda'), CUDA_VISIBLE_DEVICES=''))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith('error: THEANO_FLAGS asks for cuda, but ')
    assert 'mnist-mlp' not in out.stdout
