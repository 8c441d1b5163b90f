"""The compiled graphs as Theano builds them for the GPU (device=cuda), checked without a GPU.

Our CPU ops (engine/cpuops.py, engine/cpublas.py) must stay out of the GPU's graphs: Theano cannot move
them, so each would run on the host between two transfers, every step, and the run would
still pass the driver's own check (some GPU op in the step).  A real GPU is rare here, so
this file runs Theano's optimizer on the training and evaluation graphs under a stand-in GPU
context: the GPU's optimizations and shared variables enabled as `device=cuda` does, host
arrays standing in for the GPU's, nothing executed.  Needs pygpu (bash setup.sh --gpu).

Run as a script (python tests/test_gpu_graph.py), it prints each graph's nodes as JSON; the
tests run it in a subprocess, as the stand-in changes Theano for the whole process.  With
--as-built it writes gpu_graphs_as_built.txt: the graphs before Theano's optimizer, as the
layers build them for the GPU, which the tests then hold them to.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

CONFIGS = {   # name: (convolution stages (nfilter, (h, w), ds, st), hidden layers, conv)
    'default': ([(16, (5, 5), (4, 4), None)], [1000], 'auto'),
    'conv2d': ([(16, (5, 5), (4, 4), None)], [1000], 'conv2d'),
    '64-overlap': ([(64, (5, 5), (4, 4), (2, 2))], [1000], 'auto'),
    'two-relu': ([(64, (5, 5), (4, 4), None)], [1000, 1000], 'auto'),
    'mlp': ([], [1000], None),
}


def gpu_graphs():
    """{config: {'train'|'eval': [node, ...]}}, a node {'op', 'module', 'inputs': [...], 'outputs': [...]}."""
    compile_folder = [f for f in os.environ.get('THEANO_FLAGS', '').split(',')      # the suite's, never ~/.theano
                      if f.split('=')[0] in ('base_compiledir', 'compiledir')]
    os.environ['THEANO_FLAGS'] = ','.join(compile_folder + ['device=cpu', 'on_opt_error=warn', 'on_shape_error=raise'])
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import logging

    from engine import machine
    machine.set_up()    # first, as in the drivers
    import numpy as np
    import pygpu
    import theano
    import theano.gpuarray.type as gtype
    from theano.compile import optdb

    class StandInContext:
        kind = b'cuda'
        devname = 'stand-in'

    # what theano.gpuarray.use() does once the device has started
    gtype._context_reg[None] = StandInContext()
    optdb.add_tags('gpuarray_opt', 'fast_run', 'fast_compile')
    optdb.add_tags('gpua_scanOp_make_inplace', 'fast_run')
    theano.compile.shared_constructor(gtype.gpuarray_shared_constructor)
    machine.gpu_asked = lambda: True
    # host arrays stand in for the GPU's
    to_gpu, gpu_filter = pygpu.gpuarray.array, gtype.GpuArrayType.filter_inplace
    pygpu.gpuarray.array = lambda value, *a, context=None, **kw: (
        np.array(value) if isinstance(context, StandInContext) else to_gpu(value, *a, context=context, **kw))
    gtype.GpuArrayType.filter_inplace = lambda self, data, old, strict=False, allow_downcast=None: (
        np.asarray(data, self.dtype) if isinstance(self.context, StandInContext)
        else gpu_filter(self, data, old, strict, allow_downcast))
    # constant folding of a transfer runs it: that fails here, and the constant stays unfolded
    logging.getLogger('theano.gof.opt').setLevel(logging.CRITICAL)

    import convnet
    import nnet
    from engine import runlog

    class Optimized(Exception):
        pass

    class StopAtLinker:   # FunctionMaker hands the optimized graph to the linker: keep it, compile nothing
        def accept(self, fgraph, no_recycling=None, profile=None):
            raise Optimized(fgraph)

    compile_function, graphs = theano.function, {}

    def optimize(inputs, outputs, name=None, **kwargs):
        # as built, before Theano's optimizer: what the layers and the update rule write
        updated = [new for _, new in kwargs.get('updates', [])]
        graphs[name + ' as built'] = theano.printing.debugprint(list(outputs) + updated, file='str', print_type=True)
        try:
            compile_function(inputs, outputs, name=name, mode=theano.compile.Mode(StopAtLinker(), 'fast_run'),
                             **kwargs)
        except Optimized as done:
            fgraph = done.args[0]
        graphs[name] = [describe(node) for node in theano.gof.graph.io_toposort(fgraph.inputs, fgraph.outputs)]

    def describe(node):
        def var(v):
            return {'ndim': v.type.ndim if hasattr(v.type, 'ndim') else None, 'dtype': getattr(v.type, 'dtype', None),
                    'constant': isinstance(v, theano.gof.Constant), 'name': v.name}
        return {'op': type(node.op).__name__, 'module': type(node.op).__module__, 'str': str(node)[:200],
                'inputs': [var(v) for v in node.inputs], 'outputs': [var(v) for v in node.outputs]}

    theano.function = optimize
    result = {}
    for config, (convpool, hidden, conv) in CONFIGS.items():
        rng = np.random.RandomState(0)
        if convpool:
            net, shape, D = convnet.CNN(rng, (3, 32, 32), convpool, hidden, 10, conv=runlog.conv_impl(conv)), (3, 32, 32), 3072
        else:
            net, shape, D = nnet.MLP(rng, 784, hidden, 10), None, 784
        data = {k: (np.zeros((n, D), 'float32'), np.zeros(n, 'int32')) for k, n in (('L', 200), ('V', 100))}
        graphs.clear()
        nnet.Trainer(net, data, 100, 0.01, 0.9, 0.0001, input_shape=shape)
        result[config] = dict(graphs)
    return result


@pytest.fixture(scope='module')
def graphs():
    if importlib.util.find_spec('pygpu') is None:
        pytest.skip('needs pygpu: bash setup.sh --gpu')
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def on_gpu(node):
    return node['module'].startswith('theano.gpuarray')


def ops(graphs, config, fn):
    return [n['op'] for n in graphs[config][fn]]


def shape_arithmetic(node):
    """Theano computes shapes on the host: scalars (0-d, or Theano's own scalars) and int64 vectors."""
    return all(v['ndim'] in (0, None) or (v['ndim'] == 1 and v['dtype'] == 'int64') for v in node['outputs'])


@pytest.mark.parametrize('config', sorted(CONFIGS))
@pytest.mark.parametrize('fn', ['train', 'eval'])
def test_the_host_only_does_shape_arithmetic(graphs, config, fn):
    for node in graphs[config][fn]:
        assert on_gpu(node) or shape_arithmetic(node), node['str']


@pytest.mark.parametrize('config', sorted(CONFIGS))
@pytest.mark.parametrize('fn', ['train', 'eval'])
def test_only_scalars_cross_the_bus(graphs, config, fn):
    """Data, parameters and velocities live on the GPU: in go the shared scalars (eta, mu, lam)
    and the minibatch size, out come the two sums (cost, correct)."""
    nodes = graphs[config][fn]
    for node in nodes:
        if node['op'] == 'GpuFromHost':
            # a constant too: folded on a real GPU (here folding would run the transfer)
            assert node['inputs'][0]['ndim'] == 0 or node['inputs'][0]['constant'], node['str']
    assert ops(graphs, config, fn).count('HostFromGpu') == 2
    assert all(n['inputs'][0]['ndim'] == 0 for n in nodes if n['op'] == 'HostFromGpu')


def test_the_published_step_on_the_gpu(graphs):
    train = ops(graphs, 'default', 'train')
    # im2col: the minibatch's patches in one kernel, products by cuBLAS (no GpuCorrMM's loop)
    assert 'GpuImages2Neibs' in train and 'GpuCorrMM' not in train
    for op in ('GpuPool', 'GpuMaxPoolGrad', 'GpuCrossentropySoftmaxArgmax1HotWithBias',
               'GpuCrossentropySoftmax1HotWithBiasDx'):
        assert op in train
    # forward: the convolution and the two dense layers; back: the three weights' gradients and
    # the gradients through the two dense layers (none for the images)
    assert train.count('GpuDot22') + train.count('GpuGemm') == 8
    # cpublas.momentum's sum for the GPU: the dense layers' gradient products added into v's buffer
    assert sum(n['str'].startswith('GpuGemm{inplace=True}') for n in graphs['default']['train']) == 2
    evaluate = ops(graphs, 'default', 'eval')
    assert 'GpuMaxPoolGrad' not in evaluate and 'GpuCrossentropySoftmax1HotWithBiasDx' not in evaluate


def test_conv2d_is_gpucorrmm(graphs):
    train = ops(graphs, 'conv2d', 'train')
    assert 'GpuCorrMM' in train and 'GpuCorrMM_gradWeights' in train and 'GpuImages2Neibs' not in train


AS_BUILT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_graphs_as_built.txt')


def as_built_text(graphs):
    """Each configuration's training and evaluation graphs as the GPU run builds them (debugprint)."""
    return ''.join('== %s %s\n%s' % (config, fn, graphs[config][fn + ' as built'])
                   for config in sorted(graphs) for fn in ('train', 'eval'))


def test_the_gpu_run_builds_the_graphs_it_built_before(graphs):
    """The graphs the layers, the cost and the update rule build for device=cuda, before Theano's
    optimizer, are those committed in gpu_graphs_as_built.txt (written by `python
    tests/test_gpu_graph.py --as-built`): a change to the layers that reaches the GPU shows here."""
    with open(AS_BUILT) as f:
        assert as_built_text(graphs) == f.read()


def test_none_of_our_cpu_ops(graphs):
    ours = {n['op'] for g in graphs.values() for fn in ('train', 'eval') for n in g[fn]
            if n['module'].startswith('engine.')}
    assert not ours


def test_a_short_run_on_a_real_gpu(tmp_path):
    """Where a GPU works (pygpu, the NVIDIA driver): the MNIST MLP's epoch on it, its step on the GPU."""
    if importlib.util.find_spec('pygpu') is None:
        pytest.skip('needs pygpu: bash setup.sh --gpu')
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from conftest import ROOT, make_mnist, only_record, theano_flags
    from engine import gpustack
    if not gpustack.find_cuda_libraries(gpustack.cuda_folders())['libcuda.so']:
        pytest.skip('no NVIDIA driver here (libcuda.so.1)')
    make_mnist(str(tmp_path), ntrain=600, ntest=100)
    out = subprocess.run([sys.executable, 'mnist_mlp.py', '--nepoch=1', '--H1=50', '--H2=None', '--datadir=%s' % tmp_path,
                          '--outdir=%s' % (tmp_path / 'runs')], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, THEANO_FLAGS=theano_flags('device=cuda')))
    assert out.returncode == 0, out.stdout + out.stderr
    assert '# GPU ops of the training step: ' in out.stdout
    record = only_record(tmp_path / 'runs')
    assert record['device'].endswith('(cuda)') and record['status'] == 'completed' and record['test'][1] > 50


if __name__ == '__main__':
    if sys.argv[1:] == ['--as-built']:
        with open(AS_BUILT, 'w') as f:
            f.write(as_built_text(gpu_graphs()))
    else:
        print(json.dumps(gpu_graphs()))
