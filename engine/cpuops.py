"""Faster CPU code for three of Theano's ops and for a layer's threshold and ReLU, giving their
values bit for bit (the forward convolution up to float rounding), and for the filter gradient
through max-pooling, giving it up to float rounding.

Max-pooling and its gradient: Theano's Pool and MaxPoolGrad serve any number of
dimensions, padding and modes through per-element index arithmetic, and the gradient
first zeroes its whole output in one thread.  On the published network they took 22% of
a training step (the gradient alone 17%), on the 64-filter network with overlapping
windows 27%.  MaxPool and MaxPoolGrad here do what Theano's do for 4-d inputs, no padding,
borders left out, in plain loops over one (image, channel) plane per OpenMP thread: the
maximum starts from a window's first element and takes a later one only if larger (so a
NaN is kept only if it comes first), and the gradient goes to every element equal to its
window's maximum, summed over the windows that hold it in the same order as Theano's.  With
AVX-512, MaxPool takes a row of windows at once, a window per vector lane,
and the gradient for overlapping windows a row of the map at once.  Their C is in engine/c/.

Thresholds and ReLU: BiasReLU, max(x + b, 0) in one pass (see its docstring).

The convolution: Theano's CorrMM copies each image's 5x5 patches into a matrix (im2col)
and multiplies it with the filters; its im2col checks the padding bounds of every single
element, 18% of the published network's training step (forward and filter gradient).
CorrMM and CorrMM_gradWeights here are Theano's with an im2col that copies whole rows
when there is no padding, stride or dilation; the same products follow.  Where the output
maps are at most 32 columns wide and the CPU has AVX-512, CorrMM skips the patch matrix:
the direct correlation below sums each output row in registers from the image rows (each
output over the patch in order, as OpenBLAS's FMA kernels do: the same bits here, rounding
elsewhere).

The filter gradient through disjoint max-pooling: the pooling's gradient is zero but at
each window's maximum, so PooledFilterGrad sums gz times the patch under each maximum
instead of multiplying the dense, mostly zero gradient with all the patches (with 4x4
windows, 16 times fewer products).  The rewrite of the filter gradient chooses it when the
output's gradient comes through MaxPool alone; the sums run in another order, so the run's
figures move by float rounding.

All enter through Theano's optimizer (the rewrites at the end; engine/rewrites.py): conv2d,
pool_2d and maximum(x + b, 0), with their gradients, as the layers write them.  No GPU code:
on the GPU, Theano's own rewrites take the same graph (GpuCorrMM, GpuPool).
"""
import numpy as np
import theano
import theano.tensor as T
from theano.gof import OpenMPOp
from theano.gof.opt import TopoOptimizer, copy_stack_trace, local_optimizer
from theano.tensor.nnet import corr
from theano.tensor.nnet.abstract_conv import AbstractConv2d, AbstractConv2d_gradWeights
from theano.tensor.signal import pool

from . import openblas
from .csource import KeyedBySource, c_sections
from .rewrites import elemwise, register, register_as_built

C = c_sections('outputs.c', 'max_pool.c', 'max_pool_grad.c', 'pooled_filter_grad.c', 'correlation.c', 'bias_relu.c')


UNSIGNED = {'float32': 'npy_uint32', 'float64': 'npy_uint64'}    # same width: the gradient's masks
NPY_FLOAT = {'float32': 'npy_float', 'float64': 'npy_double'}     # support code has no dtype_ typedefs
# The AVX-512 paths' intrinsics and flags are x86's (g++ for ARM has no such header: the plain loops run)
X86 = openblas.is_x86()
INTRINSICS_HEADERS = ['<immintrin.h>'] if X86 else []


def _c_array(var, dims, like, fail, ndim='4'):
    """C that (re)allocates output `var` unless it already is a C-contiguous array of those dims
    (ndim of them: a C expression) and like's type."""
    return C['alloc_output'] % locals()


def c_alias(var, source):
    """C that makes output `var` the array `source` itself (an in-place op's output)."""
    return C['alias_output'] % locals()


class _Pooling(KeyedBySource, OpenMPOp):
    """What the pooling ops share: window and stride as compile-time constants, OpenMP."""
    __props__ = ('ws', 'stride')

    def __init__(self, ws, stride, openmp=None):
        super().__init__(openmp=openmp)
        self.ws, self.stride = tuple(int(n) for n in ws), tuple(int(n) for n in stride)
        if len(self.ws) != 2 or len(self.stride) != 2 or min(self.ws + self.stride) < 1:
            raise ValueError('max_pool: window and stride must be two positive sizes each, not %s and %s'
                             % (ws, stride))

    def c_headers(self):
        return super().c_headers() + INTRINSICS_HEADERS

    def constants(self, sub):
        """The C code's substitutions: window, stride, the OpenMP pragma, the failure code."""
        (wh, ww), (sh, sw) = self.ws, self.stride
        parallel = '#pragma omp parallel for schedule(static)' if self.openmp else ''
        return dict(wh=wh, ww=ww, sh=sh, sw=sw, parallel=parallel, fail=sub['fail'],
                    row_masks=c_vector_pair_masks('W', 'first', 'second'))


def c_vector_pair_masks(count, first, second):
    """C declaring `first` and `second`, the lanes of two 16-lane vectors that hold `count` (a C
    expression, at most 32) elements."""
    return C['vector_pair_masks'] % dict(first=first, second=second, count=count)


class MaxPool(_Pooling):
    """x (N, C, H, W) -> z (N, C, (H - wh) // sh + 1, (W - ww) // sw + 1): each window's maximum
    (no rows or columns where the windows are larger than the maps)."""

    def make_node(self, x):
        x = T.as_tensor_variable(x)
        if x.ndim != 4:
            raise TypeError('max_pool pools 4-d tensors (N, C, H, W), not %d-d ones' % x.ndim)
        return theano.Apply(self, [x], [T.TensorType(x.dtype, x.broadcastable[:2] + (False, False))()])

    def infer_shape(self, node, shapes):
        n, c, h, w = shapes[0]
        # no window where they are larger than the map, as Theano's Pool.out_shape
        return [(n, c) + tuple(T.maximum((size - window) // stride + 1, 0)
                               for size, window, stride in zip((h, w), self.ws, self.stride))]

    def L_op(self, inputs, outputs, output_grads):      # the pooled output as computed, not a second node
        return [MaxPoolGrad(self.ws, self.stride)(inputs[0], outputs[0], output_grads[0])]

    def c_code(self, node, name, inputs, outputs, sub):
        x, = inputs
        z, = outputs
        c = dict(self.constants(sub), x=x, z=z)
        c['alloc'] = _c_array(z, 'zdims', 'xc', 'Py_DECREF(xc); ' + c['fail'])
        float32 = node.inputs[0].dtype == 'float32'
        c['lanes_setup'] = (C['max_pool_lanes_setup'] if float32 else '') % c
        c['lanes'] = (C['max_pool_lanes'] if float32 else '') % c
        # in braces: `fail` jumps past the block's end, over its declarations
        return C['max_pool'] % c


class MaxPoolGrad(_Pooling):
    """(x, z = max_pool(x), gz) -> gx: gz added to every element of a window equal to its maximum."""

    def make_node(self, x, z, gz):
        x, z, gz = (T.as_tensor_variable(v) for v in (x, z, gz))
        if not x.ndim == z.ndim == gz.ndim == 4:
            raise TypeError('max_pool gradient: x, z and gz must be 4-d')
        if not x.dtype == z.dtype == gz.dtype in UNSIGNED:
            raise TypeError('max_pool gradient: x, z and gz must all be float32 or all float64')
        return theano.Apply(self, [x, z, gz], [x.type()])

    def infer_shape(self, node, shapes):
        return [shapes[0]]

    def c_code(self, node, name, inputs, outputs, sub):
        x, z, gz = inputs
        gx, = outputs
        c = dict(self.constants(sub), x=x, z=z, gz=gz, gx=gx, bits=UNSIGNED[node.inputs[2].dtype])
        c['release'] = 'Py_XDECREF(xc); Py_XDECREF(zc); Py_XDECREF(gzc);'
        c['alloc'] = _c_array(gx, 'PyArray_DIMS(xc)', 'xc', c['release'] + c['fail'])
        disjoint = self.stride[0] >= self.ws[0] and self.stride[1] >= self.ws[1]
        lanes = not disjoint and node.inputs[0].dtype == 'float32'
        c['groups'] = -(-self.ws[1] // self.stride[1])        # of window columns, sw to a group
        c['window_masks'] = c_vector_pair_masks('ow', 'zfirst', 'zsecond')
        c['lanes_setup'] = (C['overlapping_lanes_setup'] if lanes else '') % c
        c['loop'] = ((C['overlapping_lanes'] if lanes else '')
                     + (C['disjoint_windows'] if disjoint else C['overlapping_windows'])) % c
        return C['max_pool_grad'] % c


class PooledFilterGrad(_Pooling):
    """(x, c = correlate(x, W), z = max_pool(c), gz) -> the gradient of W through the pooling.

    What CorrMM_gradWeights(x, MaxPoolGrad(c, z, gz)) computes, without the dense gradient
    of c: max-pooling passes gz to each window's maximum only (ties apart), so the filter
    gradient is the sum, over every window's maximum at (h, w), of gz times the patch of x
    under it: ws[0]*ws[1] times fewer products than the dense product's, and no gradient of
    c to write and read back.  Valid correlation, stride 1.  The sums run in another order
    than the dense product's: equal up to float rounding.
    """

    @staticmethod
    def serves(ws, stride):
        """Disjoint windows: each element of c under one window at most, whose maximum it is
        compared with (an earlier version for overlapping windows, with each element's several
        windows, was slower than the dense pair: 16.2 against 14.7 ms with 64 filters and 4x4
        windows at stride 2)."""
        return stride[0] >= ws[0] and stride[1] >= ws[1]

    def make_node(self, x, c, z, gz):
        if not self.serves(self.ws, self.stride):
            raise ValueError('pooled filter gradient: disjoint windows only (stride >= window), not %s at stride %s'
                             % (self.ws, self.stride))
        x, c, z, gz = (T.as_tensor_variable(v) for v in (x, c, z, gz))
        if not x.ndim == c.ndim == z.ndim == gz.ndim == 4:
            raise TypeError('pooled filter gradient: x, c, z and gz must be 4-d')
        if not x.dtype == c.dtype == z.dtype == gz.dtype in UNSIGNED:
            raise TypeError('pooled filter gradient: x, c, z and gz must all be float32 or all float64')
        return theano.Apply(self, [x, c, z, gz], [T.TensorType(x.dtype, (False,) * 4)()])

    def infer_shape(self, node, shapes):
        (n, C, H, W), (n, F, Hc, Wc) = shapes[:2]
        return [(F, C, H - Hc + 1, W - Wc + 1)]

    def c_code(self, node, name, inputs, outputs, sub):
        x, cv, z, gz = inputs
        dw, = outputs
        c = dict(self.constants(sub), x=x, c=cv, z=z, gz=gz, dw=dw, t='dtype_' + x)
        c['release'] = 'Py_XDECREF(xc); Py_XDECREF(cc); Py_XDECREF(zc); Py_XDECREF(gzc);'
        c['alloc'] = _c_array(dw, 'wdims', 'xc', c['release'] + c['fail'])
        c['threads'] = 'omp_get_max_threads()' if self.openmp else '1'
        c['thread'] = 'omp_get_thread_num()' if self.openmp else '0'
        c['region'] = '#pragma omp parallel' if self.openmp else ''
        c['images'] = '#pragma omp for schedule(static)' if self.openmp else ''
        c['find'] = (C['find_equal_16'] % dict(find_equal=C['find_equal']) if node.inputs[0].dtype == 'float32'
                     else C['find_equal'])
        return C['pooled_filter_grad'] % c


class _RowsIm2col:
    """Theano's CorrMM C code with ours (fast_im2col) in place of its im2col (Theano 1.0.5's text)."""

    def c_support_code_apply(self, node, nodename):
        code = super().c_support_code_apply(node, nodename)
        theirs, next_function = 'void im2col(const ', 'void col2im(const '
        if code.count(theirs) != 1 or code.count(next_function) != 1:
            raise RuntimeError('cpuops: Theano\'s corr_gemm.c is not 1.0.5\'s; install theano==1.0.5')
        ours = C['fast_im2col'] % dict(t=NPY_FLOAT[node.inputs[0].dtype])
        return code.replace(theirs, 'void im2col_theano(const ').replace(next_function, ours + next_function)


class CorrMM(KeyedBySource, _RowsIm2col, corr.CorrMM):
    """Theano's CorrMM (the forward correlation) with the faster im2col, and, with AVX-512, the
    direct correlation for valid, stride-1 maps of at most 32 columns; its filter gradients too."""

    def _plain(self):
        """Valid, stride 1, undilated, one group, shared filters: what the direct correlation and
        PooledFilterGrad do."""
        return (self.border_mode == 'valid' and self.subsample == (1, 1) and self.filter_dilation == (1, 1)
                and self.num_groups == 1 and not self.unshared)

    def c_support_code_apply(self, node, nodename):
        code = super().c_support_code_apply(node, nodename)
        if not self._plain():
            return code
        dtype = node.inputs[0].dtype
        return code + C['direct_correlation'] % dict(t=NPY_FLOAT[dtype], store_part=C['store_part_' + dtype])

    def c_headers(self):
        return super().c_headers() + INTRINSICS_HEADERS

    def c_code(self, node, nodename, inputs, outputs, sub):
        theirs = super().c_code(node, nodename, inputs, outputs, sub)
        if not self._plain():
            return theirs
        x, w = inputs
        z, = outputs
        c = dict(x=x, w=w, z=z, theirs=theirs, fail=sub['fail'], t='dtype_' + x)
        c['release'] = 'Py_XDECREF(xc); Py_XDECREF(wc);'
        c['alloc'] = _c_array(z, 'zdims', 'xc', c['release'] + c['fail'])
        return C['corr_mm'] % c


class CorrMM_gradWeights(KeyedBySource, _RowsIm2col, corr.CorrMM_gradWeights):
    """Theano's filter gradient of CorrMM with the faster im2col."""


class BiasReLU(KeyedBySource, OpenMPOp):
    """(x, b) -> max(x + b, 0), b added along axis 1 of x (N, C) or (N, C, H, W): a layer's
    threshold and ReLU in one pass, Theano's values bit for bit (NaN and -0 kept alike).

    Theano's Elemwise ops for the same (an addition with b broadcast, then maximum, fused into one
    loop for the evaluation passes) step through the array one element at a time in loops as
    deep as its axes: 0.84 ms for the pooled maps of 500 images (392,000 elements), 0.52 ms for
    500 rows of the 1000-unit layer, 10% of an evaluation pass of the published network.  The
    gradient passes gz where the output is positive (at exactly 0: none, as PyTorch's ReLU;
    Theano's maximum passed it there).  In x's own buffer where nothing else reads x
    (bias_relu_in_place), as Theano's elementwise ops.
    """
    __props__ = ('inplace',)

    def __init__(self, inplace=False, openmp=None):
        super().__init__(openmp=openmp)
        self.inplace = bool(inplace)
        if self.inplace:
            self.destroy_map = {0: [0]}

    def make_node(self, x, b):
        x, b = T.as_tensor_variable(x), T.as_tensor_variable(b)
        if x.ndim not in (2, 4) or b.ndim != 1 or x.dtype != b.dtype or x.dtype not in NPY_FLOAT:
            raise TypeError('relu_with_bias: x (N, C) or (N, C, H, W) and b (C,), one float dtype, not %s and %s'
                            % (x.type, b.type))
        return theano.Apply(self, [x, b], [x.type()])

    def perform(self, node, inputs, outputs):
        x, b = inputs
        if x.shape[1] != len(b):
            raise ValueError('relu_with_bias: %d channels, %d thresholds' % (x.shape[1], len(b)))
        a = np.add(x, b.reshape((-1,) + (1,) * (x.ndim - 2)), out=x if self.inplace else None)
        a[a < 0] = 0                                                # NaN and -0 kept, as Theano's maximum
        outputs[0][0] = a

    def infer_shape(self, node, shapes):
        return [shapes[0]]

    def L_op(self, inputs, outputs, output_grads):
        x, b = inputs
        gx = output_grads[0] * T.gt(outputs[0], 0)
        return [gx, gx.sum(axis=(0,) + tuple(range(2, x.ndim)))]

    def c_code(self, node, name, inputs, outputs, sub):
        x, b = inputs
        z, = outputs
        t = NPY_FLOAT[node.inputs[0].dtype]
        fail = sub['fail']
        release = 'Py_XDECREF(xc); Py_XDECREF(bc);'
        alloc = _c_array(z, 'PyArray_DIMS(xc)', 'xc', release + fail, ndim='PyArray_NDIM(xc)')
        if self.inplace:        # x itself where contiguous (else its contiguous copy, ours alone)
            alloc = c_alias(z, 'xc')
        parallel = '#pragma omp parallel for schedule(static) if (N * C * S > 100000)' if self.openmp else ''
        return C['bias_relu'] % locals()


@local_optimizer([BiasReLU])
def bias_relu_in_place(node):
    if isinstance(node.op, BiasReLU) and not node.op.inplace:
        return [BiasReLU(inplace=True, openmp=node.op.openmp)(*node.inputs)]
    return False


# as Theano's in-place elementwise optimization (75): where another op still reads x, Theano's
# destroy handler refuses the replacement and the op stays as it is
register('cpuops_bias_relu_in_place', TopoOptimizer(bias_relu_in_place, failure_callback=TopoOptimizer.warn_inplace),
         75.5, 'inplace')


# ---------------------------------------------------------------- the rewrites (engine/rewrites.py)

def corr_props(op):
    """CorrMM's settings from an abstract convolution's (what Theano's own lowering passes)."""
    return dict(border_mode=op.border_mode, subsample=op.subsample, filter_dilation=op.filter_dilation,
                num_groups=op.num_groups, unshared=op.unshared)


def flipped(filters):
    """The filters turned 180 degrees in their last two axes: conv2d's filter_flip."""
    return filters[(slice(None),) * (filters.ndim - 2) + (slice(None, None, -1),) * 2]


def float_tensors(node):
    """Whether the node's first input and its outputs are float32 or float64 arrays of the CPU."""
    return all(isinstance(v.type, T.TensorType) and v.dtype in NPY_FLOAT
               for v in node.inputs[:1] + node.outputs)


def filter_gradient(image, top, shape, props):
    """The filters' gradient of a correlation with those settings, from the images, the
    output's gradient and the filters' (h, w) (or None: valid, unstrided): PooledFilterGrad
    where that gradient comes through disjoint max-pooling (our ops) of the same images'
    correlation, else our CorrMM_gradWeights."""
    pooling = top.owner
    if (pooling and isinstance(pooling.op, MaxPoolGrad) and PooledFilterGrad.serves(pooling.op.ws, pooling.op.stride)
            and CorrMM(**props)._plain()):
        c, z, gz = pooling.inputs
        if c.owner and isinstance(c.owner.op, CorrMM) and c.owner.op._plain() and c.owner.inputs[0] is image:
            return PooledFilterGrad(pooling.op.ws, pooling.op.stride)(image, c, z, gz)
    return CorrMM_gradWeights(**props)(image, top, shape)


@register_as_built
@local_optimizer([AbstractConv2d, corr.CorrMM])
def use_corr_mm(node):
    """conv2d to our CorrMM, as Theano's local_abstractconv_gemm makes it Theano's; and
    Theano's CorrMM to ours."""
    if not float_tensors(node):
        return False
    image, filters = node.inputs
    if isinstance(node.op, AbstractConv2d):
        return [CorrMM(**corr_props(node.op))(image, flipped(filters) if node.op.filter_flip else filters)]
    if type(node.op) is corr.CorrMM:
        return [CorrMM(**node.op._props_dict())(image, filters)]
    return False


@register_as_built
@local_optimizer([AbstractConv2d_gradWeights, corr.CorrMM_gradWeights])
def use_corr_mm_grad_weights(node):
    """conv2d's filter gradient to ours (filter_gradient), as Theano's
    local_abstractconv_gradweight_gemm makes it Theano's CorrMM_gradWeights; and that to ours."""
    if not float_tensors(node):
        return False
    image, top = node.inputs[:2]
    if isinstance(node.op, AbstractConv2d_gradWeights):
        shape = node.inputs[2]
        grad = filter_gradient(image, top, shape, corr_props(node.op))
        copy_stack_trace(node.outputs[0], grad)                 # (the flip's gets it too)
        grad = flipped(grad) if node.op.filter_flip else grad
        return [T.patternbroadcast(grad, node.outputs[0].broadcastable)]
    if type(node.op) is corr.CorrMM_gradWeights:
        shape = tuple(node.inputs[2:]) or None          # its (h, w) as two inputs, or none
        return [filter_gradient(image, top, shape, node.op._props_dict())]
    return False


def pooling_windows(node, first_constant):
    """(window, stride) of a Theano Pool or MaxPoolGrad node that ours compute (2-d max-pooling
    of 4-d float arrays, borders left out, constant windows and strides, no padding), else None."""
    op = node.op
    if not (op.mode == 'max' and op.ignore_border and op.ndim == 2 and node.inputs[0].ndim == 4
            and float_tensors(node)):
        return None
    ws, stride, pad = node.inputs[first_constant:first_constant + 3]
    if not all(isinstance(v, T.TensorConstant) for v in (ws, stride, pad)) or pad.data.any():
        return None
    return tuple(ws.data), tuple(stride.data)


@register_as_built
@local_optimizer([pool.Pool])
def use_max_pool(node):
    """pool_2d(..., ignore_border=True, mode='max') of 4-d maps to our MaxPool."""
    windows = isinstance(node.op, pool.Pool) and pooling_windows(node, 1)
    return [MaxPool(*windows)(node.inputs[0])] if windows else False


@register_as_built
@local_optimizer([pool.MaxPoolGrad])
def use_max_pool_grad(node):
    """Its gradient, Theano's MaxPoolGrad, to ours."""
    windows = isinstance(node.op, pool.MaxPoolGrad) and pooling_windows(node, 3)
    return [MaxPoolGrad(*windows)(*node.inputs[:3])] if windows else False


def is_zero(var):
    try:
        return T.get_scalar_constant_value(var, only_process_constants=False) == 0
    except T.NotScalarConstantError:
        return False


def biased(a):
    """(x, b) if a is x + b with b (C,) broadcast along axis 1 of x (N, C) or (N, C, H, W), one
    float dtype and x's type, else None."""
    add = elemwise(a, theano.scalar.Add)
    if not add or len(add.inputs) != 2:
        return None
    for x, shuffled in (add.inputs, add.inputs[::-1]):
        order = ('x', 0) + ('x',) * (x.ndim - 2)
        if (shuffled.owner and isinstance(shuffled.owner.op, T.DimShuffle) and shuffled.owner.op.new_order == order
                and x.ndim in (2, 4) and x.type == a.type and x.dtype in NPY_FLOAT
                and shuffled.owner.inputs[0].dtype == x.dtype):
            return x, shuffled.owner.inputs[0]
    return None


def relu_input(var):
    """a if var is maximum(a, 0), else None."""
    node = elemwise(var, theano.scalar.Maximum)
    if node and is_zero(node.inputs[1]) and node.inputs[0].type == var.type:
        return node.inputs[0]
    return None


@register_as_built
@local_optimizer([T.maximum])
def use_bias_relu(node):
    """maximum(x + b, 0), b broadcast along axis 1: BiasReLU(x, b)."""
    a = relu_input(node.outputs[0])
    parts = a is not None and biased(a)
    return [BiasReLU()(*parts)] if parts else False


@register_as_built
@local_optimizer([T.mul])
def use_bias_relu_grad(node):
    """Theano's gradient of maximum(a, 0) with a = x + b, gz * (maximum(a, 0) == a), to
    BiasReLU's, gz * (BiasReLU(x, b) > 0): with the forward pass replaced, a is not computed.
    The one value that changes: the gradient at a == 0 exactly, 0 here (as PyTorch's ReLU)."""
    mul = elemwise(node.outputs[0], theano.scalar.Mul)
    if not (mul and len(mul.inputs) == 2):
        return False
    for mask, gz in (mul.inputs, mul.inputs[::-1]):
        eq = elemwise(mask, theano.scalar.EQ)
        if not eq:
            continue
        out, a = eq.inputs
        parts = biased(a)
        if not parts or not out.owner:
            continue
        if isinstance(out.owner.op, BiasReLU) and out.owner.inputs == list(parts):
            return [gz * T.gt(out, 0)]
        if relu_input(out) is a:
            return [gz * T.gt(BiasReLU()(*parts), 0)]
    return False
