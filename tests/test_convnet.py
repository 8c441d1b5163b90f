"""convnet.py against numpy references, the compiled graphs' ops, and both drivers end to end."""
import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import convnet
import nnet
from engine import gpustack, runlog
import theano
import theano.tensor as T
from conftest import ROOT, driver_settings, make_cifar, make_mnist, only_record, theano_flags

floatX = nnet.floatX


def np_correlate(x, W):
    N, C, H, Wd = x.shape
    F, _, h, w = W.shape
    out = np.zeros((N, F, H - h + 1, Wd - w + 1))
    for i in range(H - h + 1):
        for j in range(Wd - w + 1):
            out[:, :, i, j] = np.tensordot(x[:, :, i:i + h, j:j + w], W, axes=([1, 2, 3], [1, 2, 3]))
    return out


def np_maxpool(x, ds, st):
    H = (x.shape[2] - ds[0]) // st[0] + 1
    W = (x.shape[3] - ds[1]) // st[1] + 1
    out = np.empty(x.shape[:2] + (H, W))
    for i in range(H):
        for j in range(W):
            out[:, :, i, j] = x[:, :, i * st[0]:i * st[0] + ds[0], j * st[1]:j * st[1] + ds[1]].max(axis=(2, 3))
    return out


@pytest.mark.parametrize('impl', convnet.CONV_IMPLS)
def test_conv_layer_is_an_unpadded_stride_1_correlation_without_bias(impl):
    rng = np.random.RandomState(0)
    layer = convnet.ConvLayer(rng, (3, 9, 8), 4, (3, 2), impl=impl)
    assert layer.output_shape == (4, 7, 7) and layer.params == [layer.W]
    x = rng.randn(2, 3, 9, 8).astype(floatX)
    x_ = T.tensor4()
    out = theano.function([x_], layer.output(x_))(x)
    np.testing.assert_allclose(out, np_correlate(x, layer.W.get_value()), rtol=1e-4, atol=1e-5)


def test_conv_auto_is_conv2d_on_the_cpu_and_layers_refuse_unknown_names():
    assert runlog.conv_impl('auto') == 'conv2d' and runlog.conv_impl('im2col') == 'im2col'
    for impl in ('fft', 'auto'):
        with pytest.raises(ValueError, match='use one of conv2d, im2col'):
            convnet.ConvLayer(np.random.RandomState(0), (3, 9, 8), 4, (3, 2), impl=impl)


def test_im2col_convolution_gradient_matches_finite_differences():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 3, 6, 5)
    layer = convnet.ConvLayer(rng, (3, 6, 5), 2, (3, 2), impl='im2col')
    target = rng.randn(2, 2, 4, 4)

    def cost(W):
        layer.W = W                              # the layer's graph with W as the variable
        return (layer.output(T.as_tensor_variable(x)) * target).sum()     # any upstream gradient
    theano.gradient.verify_grad(cost, [rng.randn(2, 3, 3, 2)], rng=rng, eps=1e-3, abs_tol=1e-3, rel_tol=1e-3)


@pytest.mark.parametrize('ds, st, shape', [((4, 4), None, (3, 3, 2)), ((4, 4), (2, 2), (3, 5, 4)),
                                           ((2, 3), (1, 2), (3, 11, 4))])
def test_pool_layer_max_pools_then_thresholds_per_channel_then_relu(ds, st, shape):
    rng = np.random.RandomState(0)
    layer = convnet.PoolLayer((3, 12, 10), ds, st)
    assert layer.output_shape == shape
    b = np.array([-0.5, 0.0, 0.5], floatX)
    layer.b.set_value(b)
    x = rng.randn(2, 3, 12, 10).astype(floatX)
    x_ = T.tensor4()
    out = theano.function([x_], layer.output(x_))(x)
    expected = np.maximum(np_maxpool(x, ds, st or ds) + b[None, :, None, None], 0)
    assert out.shape[1:] == shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_the_published_cnn_starts_from_zero_mean_normal_weights_and_zero_thresholds():
    net = convnet.CNN(np.random.RandomState(0), (3, 32, 32), [(16, (5, 5), (4, 4), None)], [1000], 10, Wstd=0.01)
    weights = [p.get_value() for p in net.decay]
    assert [w.shape for w in weights] == [(16, 3, 5, 5), (784, 1000), (1000, 10)]
    for w in weights:
        assert abs(w.mean()) < 0.002 and w.std() == pytest.approx(0.01, rel=0.1)
    thresholds = [p.get_value() for p in net.params if not any(p is w for w in net.decay)]
    assert [b.shape for b in thresholds] == [(16,), (1000,), (10,)]    # after the pooling, then each dense layer's
    assert not any(b.any() for b in thresholds)


def test_cnn_gradient_matches_finite_differences():
    """Through our own layers (conv, overlapping pool with threshold and ReLU, flatten, softmax)."""
    rng = np.random.RandomState(0)
    x = rng.randn(3, 2, 8, 8)
    y = np.array([0, 2, 1], 'int32')
    net = convnet.CNN(rng, (2, 8, 8), [(2, (3, 3), (2, 2), (1, 1))], [], 3)
    conv, pool, flat, out = net.layers

    def mean_cost(Wc, b, Wf, bf):
        conv.W, pool.b, out.W, out.b = Wc, b, Wf, bf    # the network's graph with these as variables
        return net.cost_terms(T.as_tensor_variable(x), y)[0] / 3
    theano.gradient.verify_grad(mean_cost, [rng.randn(2, 2, 3, 3), rng.randn(2) * 0.1 + 0.3, rng.randn(50, 3),
                                            rng.randn(3)], rng=rng, eps=1e-3, abs_tol=1e-3, rel_tol=1e-3)


def test_only_weights_are_decayed_never_the_pool_threshold_or_biases():
    net = convnet.CNN(np.random.RandomState(0), (3, 8, 8), [(2, (3, 3), (2, 2), None)], [4], 3)
    conv, pool, flat, hidden, out = net.layers
    assert net.decay == [conv.W, hidden.W, out.W]
    assert net.params == [conv.W, pool.b, hidden.W, hidden.b, out.W, out.b]
    assert [p.name for p in net.params] == ['W1', 'b2', 'W4', 'b4', 'W5', 'b5']


@pytest.mark.parametrize('script, published', [
    ('cifar10_convnet.py', dict(W1dim=[16, 5, 5], ds1=[4, 4], st1=None, H2=1000, H3=None, eta=0.01, mu=0.9,
                                lam=0.0001, batchsize=100, nepoch=50, ZCAwhitening=True, quickL=False)),
    ('mnist_mlp.py', dict(H1=1000, H2=1000, eta=0.1, mu=0.9, lam=0.0, batchsize=100, nepoch=50, quickL=False))])
def test_drivers_default_to_the_published_settings(script, published):
    settings = driver_settings([script])
    assert {k: settings[k] for k in published} == published
    text = run_script(script, '-h').stdout                       # for people: the docstring and the settings
    assert text.startswith(('The published CIFAR-10', 'The MNIST')) and '{' not in text
    assert '#   --eta=%r\n' % published['eta'] in text and '\n# device here: cpu' in text


def python_ops(fn):
    """The ops of a compiled function that run as Python `perform` instead of C code."""
    return [type(node.op).__name__ for node, thunk in zip(fn.fn.nodes, fn.fn.thunks)
            if not hasattr(thunk, 'cthunk')]


@pytest.mark.parametrize('ds, st, conv', [((4, 4), None, 'conv2d'), ((4, 4), (2, 2), 'conv2d'),
                                          ((4, 4), (2, 2), 'im2col')])
def test_training_function_compiles_to_c_ops_only(ds, st, conv):
    rng = np.random.RandomState(0)
    net = convnet.CNN(rng, (3, 32, 32), [(4, (5, 5), ds, st)], [10], 10, conv=conv)
    X = rng.randn(20, 3072).astype(floatX)
    trainer = nnet.Trainer(net, {'L': (X, rng.randint(0, 10, 20).astype('int32'))}, 10, 0.01, 0.9, 1e-4,
                           input_shape=(3, 32, 32))
    ops = [type(node.op).__name__ for node in trainer.train_fn.maker.fgraph.apply_nodes]
    assert {'MaxPool', 'CrossentropySoftmaxArgmax1HotWithBias'} <= set(ops)   # cpuops's, Theano's fused op
    assert 'Argmax' not in ops                   # the fused op's argmax serves the accuracy
    if conv == 'conv2d' and st is None:          # disjoint windows: the filter gradient from the maxima
        assert 'CorrMM' in ops and 'PooledFilterGrad' in ops and 'MaxPoolGrad' not in ops
    elif conv == 'conv2d':
        assert {'CorrMM', 'CorrMM_gradWeights', 'MaxPoolGrad'} <= set(ops)
    else:       # patches once, then products: forward, filter gradient, and the dense layers'
        assert ops.count('Images2Neibs') == 1 and 'CorrMM' not in ops and 'MaxPoolGrad' in ops
    assert python_ops(trainer.train_fn) == [] and python_ops(trainer.eval_fn) == []


def run_script(*args, **env):
    return subprocess.run([sys.executable] + list(args), cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=600)


ROW = r'\d+ \| \d+\.\d{6} \d+\.\d\d \| \d+\.\d{6} \d+\.\d\d \| [\d.]+ s'


def test_cifar10_convnet_runs_end_to_end(tmp_path):
    make_cifar(str(tmp_path), rows=200, learnable=True)
    out = tmp_path / 'runs'
    result = run_script('cifar10_convnet.py', '--W1dim=(4,5,5)', '--H2=32', '--nepoch=2',
                        '--datadir=%s' % tmp_path, '--outdir=%s' % out)
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout
    assert re.search(r'^# cpu: .* \| floatX float32 \| Theano 1\.0\.5 \|', log, re.M)
    for line in ['### Conv-Pool-ReLu-Softmax   Xdim: (3, 32, 32)',
                 '#   W1dim: (4, 5, 5)  ds1: (4, 4)  st1: None  H1: 196',
                 '#   H2: 32', '# eta =  0.01  mu =  0.9  lam =  0.0001', '# ZCAwhitening =  True',
                 '### training:   NL =  800  NV =  200  K =  10  batchsize =  100', '# NT =  200',
                 '# convolution: conv2d']:
        assert line + '\n' in log
    assert re.search(r'^# CPU ops of the training step: .*\bCorrMM\b.*\bMaxPool, MomentumGemm x2, MomentumUpdate x4, PooledFilterGrad\b', log, re.M)
    rows = re.findall('^' + ROW + '$', log, re.M)
    assert [r.split()[0] for r in rows] == ['0', '1', '2']
    assert re.search(r'^2 \| [\d.]+ [\d.]+ \| [\d.]+ [\d.]+ \| [\d.]+ [\d.]+ \*$', log, re.M)
    assert re.search(r'^# seconds: data [\d.]+  compile [\d.]+  train [\d.]+  total [\d.]+$', log, re.M)
    record = only_record(out)
    peak = record['memory_mib']['peak_resident']                   # numpy and Theano alone take more than 50
    assert record['memory_mib'] == {'peak_resident': peak} and 50 < peak < 8192
    assert '\n# memory: peak %.2f GiB resident\n' % (peak / 1024) in log
    assert record['status'] == 'completed' and record['settings']['W1dim'] == [4, 5, 5]
    assert record['H1'] == 196 and len(record['test']) == 2 and len(record['epochs']) == 3
    assert set(record['seconds']) == {'data', 'compile', 'train', 'total'}
    assert np.load(out / record['params'])['00_W1'].shape == (4, 3, 5, 5)
    assert record['epochs'][-1][1] < record['epochs'][0][1]          # the training cost fell
    assert record['data_sizes'] == {'L': 800, 'V': 200, 'T': 200} and len(record['data_fingerprint']) == 40


def test_cifar10_convnet_overlapping_pool_and_second_layer(tmp_path):
    make_cifar(str(tmp_path), rows=100)
    result = run_script('cifar10_convnet.py', '--W1dim=(2,5,5)', '--st1=(2,2)', '--H2=8', '--H3=8',
                        '--nepoch=1', '--ZCAwhitening=False', '--conv=im2col', '--datadir=%s' % tmp_path,
                        '--outdir=%s' % (tmp_path / 'runs'))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '#   W1dim: (2, 5, 5)  ds1: (4, 4)  st1: (2, 2)  H1: 338\n' in result.stdout
    assert '#   H2: 8   H3: 8\n' in result.stdout
    assert '# override: st1 = (2, 2)\n' in result.stdout
    assert '# convolution: im2col\n' in result.stdout
    assert re.search(r'^# CPU ops of the training step: .*\bImages2Neibs\b', result.stdout, re.M)
    assert 'CorrMM' not in result.stdout
    record = only_record(tmp_path / 'runs')
    assert record['conv_impl'] == 'im2col' and record['settings']['conv'] == 'im2col'


def test_drivers_reject_unknown_settings_and_report_missing_data(tmp_path):
    result = run_script('cifar10_convnet.py', '--filters=64')
    assert result.returncode != 0 and 'W1dim=(16, 5, 5)' in result.stderr
    result = run_script('cifar10_convnet.py', '--conv=fft')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert "error: --conv='fft': needs 'auto', 'conv2d' or 'im2col'" in result.stderr
    result = run_script('cifar10_convnet.py', '--datadir=%s' % tmp_path, '--nepoch=1')    # NNET_OFFLINE: no download
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'cifar-10-python.tar.gz' in result.stderr and str(tmp_path) in result.stderr
    assert 'not fetched: NNET_OFFLINE is set' in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('script', ['cifar10_convnet.py', 'mnist_mlp.py'])
def test_drivers_refuse_a_gpu_that_did_not_start_before_loading_data(script, tmp_path):
    # Theano would run on the CPU instead; setuptools >= 82 would break the import first.
    # Without pygpu it says so; with setup.sh --gpu's pygpu on a machine without the NVIDIA
    # driver (CI), that; with a driver but no GPU that answers (none visible here, also on a GPU
    # host), that the GPU did not start.
    result = run_script(script, '--datadir=%s' % tmp_path, THEANO_FLAGS=theano_flags('device=cuda'),
                        CUDA_VISIBLE_DEVICES='')
    cause = ('pygpu is not installed' if not importlib.util.find_spec('pygpu') else 'no NVIDIA driver here'
             if not gpustack.find_cuda_libraries(gpustack.cuda_folders())['libcuda.so'] else 'the GPU did not initialise')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: THEANO_FLAGS asks for cuda, but ' + cause)
    assert '### training' not in result.stdout and os.listdir(tmp_path) == []


def test_a_gpu_asked_for_in_a_theanorc_is_refused_naming_the_theanorc(tmp_path):
    theanorc = tmp_path / 'theanorc'
    theanorc.write_text('[global]\ndevice = cuda\n')
    result = run_script('mnist_mlp.py', '--datadir=%s' % tmp_path, THEANO_FLAGS=theano_flags(), THEANORC=str(theanorc),
                        CUDA_VISIBLE_DEVICES='')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: .theanorc asks for cuda, but ')


def test_mnist_mlp_runs_end_to_end(tmp_path):
    make_mnist(str(tmp_path), ntrain=600, ntest=100)
    result = run_script('mnist_mlp.py', '--H1=50', '--H2=20', '--nepoch=5', '--Wstd=0.1',  # tiny layers
                        '--datadir=%s' % tmp_path,
                        '--outdir=%s' % (tmp_path / 'runs'))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '### ReLu-ReLu-Softmax   Xdim: 784  H1: 50  H2: 20\n' in result.stdout
    assert '### training:   NL =  500  NV =  100  K =  10  batchsize =  100\n' in result.stdout
    assert [r.split()[0] for r in re.findall('^' + ROW + '$', result.stdout, re.M)] == ['0', '1', '2', '3', '4', '5']
    record = only_record(tmp_path / 'runs')
    assert record['test'][1] > 90                                  # the bands are easy to learn


@contextlib.contextmanager
def started(*args):
    """A driver started with its output on a pipe; killed if the test fails before it ends.
    Ctrl-C's SIGINT handled as in a terminal's foreground job, also when the tests themselves run
    in a background job (whose children a shell without job control starts with SIGINT ignored:
    `python tests/mutate.py &` saw every stopped run time out)."""
    proc = subprocess.Popen([sys.executable] + list(args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()


def wait_for_training(proc, seconds=300):
    """Read the log until the epoch-1 row: training runs.  Fails (and the caller kills) after `seconds`."""
    lines = []

    def read():
        for line in iter(proc.stdout.readline, ''):
            lines.append(line)
            if line.startswith('1 | '):
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    assert lines and lines[-1].startswith('1 | '), 'no epoch-1 row within %d s:\n%s' % (seconds, ''.join(lines))
    return ''.join(lines)


@pytest.mark.parametrize('how', ['SIGTERM', 'Ctrl-C with the pipe closed'])
def test_a_stopped_run_writes_its_record_and_parameters(tmp_path, how):
    make_cifar(str(tmp_path), rows=100)
    out = tmp_path / 'runs'
    with started('cifar10_convnet.py', '--W1dim=(2,5,5)', '--H2=8', '--nepoch=100000', '--ZCAwhitening=False',
                 '--datadir=%s' % tmp_path, '--outdir=%s' % out) as proc:
        assert wait_for_training(proc).endswith('s\n')
        if how == 'SIGTERM':
            proc.send_signal(signal.SIGTERM)
        else:                       # as `python cifar10_convnet.py | tee log` and Ctrl-C: tee is gone
            proc.stdout.close()
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        log = proc.stdout.read() if how == 'SIGTERM' else ''
    record = only_record(out)
    assert record['status'] == 'interrupted' and record['epochs'][0][0] == 0
    assert np.load(out / record['params'])['00_W1'].shape == (2, 3, 5, 5)
    if how == 'SIGTERM':
        assert '# interrupted at epoch' in log
        assert log.splitlines()[-1] == '# to go on from here: python cifar10_convnet.py --resume=%s' % (
            out / record['params'])


def test_an_output_pipe_closed_before_training_ends_the_run_with_one_line(tmp_path):
    """`python cifar10_convnet.py | head -1`: head leaves after one line, while the data load; the
    next line printed raised BrokenPipeError, with its traceback."""
    make_cifar(str(tmp_path), rows=100)
    proc = subprocess.Popen([sys.executable, 'cifar10_convnet.py', '--W1dim=(2,5,5)', '--H2=8', '--nepoch=1',
                             '--ZCAwhitening=False', '--datadir=%s' % tmp_path, '--outdir=%s' % (tmp_path / 'runs')],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith('# ')
        proc.stdout.close()
        assert proc.wait(timeout=300) == 128 + signal.SIGPIPE
        assert proc.stderr.read() == '# the output pipe closed before training started: nothing to save\n'
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list((tmp_path / 'runs').glob('*.record.json'))
    helped = subprocess.Popen([sys.executable, 'cifar10_convnet.py', '--help'], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    helped.stdout.close()                                   # `--help | head`: gone before the help comes
    assert helped.wait(timeout=300) == 0 and helped.stderr.read() == ''


@pytest.mark.parametrize('script', ['cifar10_convnet.py', 'mnist_mlp.py'])
def test_an_output_pipe_closed_before_the_first_line_ends_the_run_with_one_line(script, tmp_path):
    """Unbuffered (PYTHONUNBUFFERED=1, as in containers and CI), `| head -1` can be gone before
    the second override line: that print raised BrokenPipeError outside run_driver, a traceback
    and exit 1 (seen under emulation, where the driver writes slowly).  Here the pipe is closed
    before the driver starts, so the first override's print meets it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, script, '--nepoch=1', '--datadir=%s' % tmp_path], cwd=ROOT,
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
                                env=dict(os.environ, PYTHONUNBUFFERED='1'))
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr
    assert result.stderr == '# the output pipe closed before training started: nothing to save\n'


def test_a_finished_run_resumed_with_more_epochs_logs_as_one_run(tmp_path):
    make_mnist(str(tmp_path), ntrain=600, ntest=100)
    runs = {}
    for name, args in (('straight', ['--nepoch=2']), ('first', ['--nepoch=1'])):
        result = run_script('mnist_mlp.py', '--H1=20', '--H2=None', '--datadir=%s' % tmp_path,
                            '--outdir=%s' % (tmp_path / name), *args)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = only_record(tmp_path / name)
    first = tmp_path / 'first' / runs['first']['params']
    result = run_script('mnist_mlp.py', '--resume=%s' % first, '--nepoch=2', '--datadir=%s' % tmp_path,
                        '--outdir=%s' % (tmp_path / 'resumed'))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '# resume: H1 = 20, as the run being resumed (this script says 1000)' in result.stdout
    assert '# resume: H2 = None, as the run being resumed (this script says 1000)' in result.stdout
    assert [r.split()[0] for r in re.findall('^' + ROW + '$', result.stdout, re.M)] == ['0', '1', '2']  # 0, 1 again
    resumed = only_record(tmp_path / 'resumed')
    assert [row[:5] for row in resumed['epochs']] == [row[:5] for row in runs['straight']['epochs']]
    assert resumed['test'] == runs['straight']['test'] and resumed['resumed']['epoch'] == 2
    make_mnist(str(tmp_path / 'other'), ntrain=600, ntest=100, seed=1)
    result = run_script('mnist_mlp.py', '--resume=%s' % first, '--nepoch=2', '--datadir=%s' % (tmp_path / 'other'),
                        '--outdir=%s' % (tmp_path / 'resumed'))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
        'error: --resume=%s: its run had other data' % first)
    assert '# data fingerprint' in result.stdout and '# compiled' not in result.stdout      # refused before
