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
AVX-512, MaxPool takes a row of windows at once, a window per vector lane (MAX_POOL_LANES),
and the gradient for overlapping windows a row of the map at once (OVERLAPPING_LANES).

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
from theano.gof.opt import TopoOptimizer, local_optimizer
from theano.tensor.nnet import corr
from theano.tensor.nnet.abstract_conv import AbstractConv2d, AbstractConv2d_gradWeights
from theano.tensor.signal import pool

from . import openblas
from .csource import KeyedBySource
from . import rewrites
from .rewrites import register, register_as_built


UNSIGNED = {'float32': 'npy_uint32', 'float64': 'npy_uint64'}    # same width: the gradient's masks
NPY_FLOAT = {'float32': 'npy_float', 'float64': 'npy_double'}     # support code has no dtype_ typedefs
# The AVX-512 paths' intrinsics and flags are x86's (g++ for ARM has no such header: the plain loops run)
X86 = openblas.is_x86()
INTRINSICS_HEADERS = ['<immintrin.h>'] if X86 else []


def _c_array(var, dims, like, fail, ndim='4'):
    """C that (re)allocates output `var` unless it already is a C-contiguous array of those dims
    (ndim of them: a C expression) and like's type."""
    return """
    if (!%(var)s || PyArray_NDIM(%(var)s) != %(ndim)s || !PyArray_IS_C_CONTIGUOUS(%(var)s)
        || PyArray_TYPE(%(var)s) != PyArray_TYPE(%(like)s)
        || !PyArray_CompareLists(PyArray_DIMS(%(var)s), %(dims)s, %(ndim)s)) {
        Py_XDECREF(%(var)s);
        %(var)s = (PyArrayObject*)PyArray_EMPTY(%(ndim)s, %(dims)s, PyArray_TYPE(%(like)s), 0);
        if (!%(var)s) { %(fail)s }
    }
    """ % locals()


def c_alias(var, source):
    """C that makes output `var` the array `source` itself (an in-place op's output)."""
    return """
    if (%(var)s != %(source)s) {
        Py_XDECREF(%(var)s);
        %(var)s = %(source)s;
        Py_INCREF(%(var)s);
    }""" % locals()


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
    return ('const __mmask16 {f} = {n} >= 16 ? 0xFFFF : (__mmask16)((1u << {n}) - 1);\n'
            '        const __mmask16 {s} = {n} >= 32 ? 0xFFFF : {n} > 16 ? (__mmask16)((1u << ({n} - 16)) - 1) : 0;'
            ).format(f=first, s=second, n=count)


# MaxPool with AVX-512 (float32), where a row of windows lies within 32 columns (ow <= 16): a
# window per vector lane, its maximum taken over the window's elements in the same order as the
# plain loop (the element of lane j, row[j * sw + b], picked out of the row's two vectors by a
# permutation), with the same comparison (x > m: ordered, so NaN and -0 come out alike).  The
# plain loop took 0.14 ms of a 5.1 ms training step and 0.9 ms an evaluation call of 500 images.
MAX_POOL_LANES_SETUP = """
        #ifdef __AVX512F__
        const int lanes16 = ow <= 16 && (ow - 1) * %(sw)d + %(ww)d <= 32;
        %(row_masks)s
        const __mmask16 stored = (__mmask16)((1u << (ow < 16 ? ow : 16)) - 1);
        __m512i columns[%(ww)d];                    // lane j: column j * sw + b
        for (int b = 0; b < %(ww)d; b++)
            columns[b] = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                             _mm512_set1_epi32(%(sw)d)), _mm512_set1_epi32(b));
        #endif"""
MAX_POOL_LANES = """
            #ifdef __AVX512F__
            if (lanes16) {
                for (npy_intp i = 0; i < oh; i++) {
                    __m512 m = _mm512_setzero_ps();
                    for (int a = 0; a < %(wh)d; a++) {
                        const float* row = xp + (i * %(sh)d + a) * W;
                        const __m512 low = _mm512_maskz_loadu_ps(first, row), high = _mm512_maskz_loadu_ps(second, row + 16);
                        for (int b = 0; b < %(ww)d; b++) {
                            const __m512 e = _mm512_permutex2var_ps(low, columns[b], high);
                            m = a == 0 && b == 0 ? e : _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(e, m, _CMP_GT_OQ), e);
                        }
                    }
                    _mm512_mask_storeu_ps(zp + i * ow, stored, m);
                }
                continue;
            }
            #endif"""


class MaxPool(_Pooling):
    """x (N, C, H, W) -> z (N, C, (H - wh) // sh + 1, (W - ww) // sw + 1): each window's maximum."""

    def make_node(self, x):
        x = T.as_tensor_variable(x)
        if x.ndim != 4:
            raise TypeError('max_pool pools 4-d tensors (N, C, H, W), not %d-d ones' % x.ndim)
        return theano.Apply(self, [x], [T.TensorType(x.dtype, x.broadcastable[:2] + (False, False))()])

    def infer_shape(self, node, shapes):
        n, c, h, w = shapes[0]
        return [(n, c, (h - self.ws[0]) // self.stride[0] + 1, (w - self.ws[1]) // self.stride[1] + 1)]

    def L_op(self, inputs, outputs, output_grads):      # the pooled output as computed, not a second node
        return [MaxPoolGrad(self.ws, self.stride)(inputs[0], outputs[0], output_grads[0])]

    def c_code(self, node, name, inputs, outputs, sub):
        x, = inputs
        z, = outputs
        c = dict(self.constants(sub), x=x, z=z)
        c['alloc'] = _c_array(z, 'zdims', 'xc', 'Py_DECREF(xc); ' + c['fail'])
        float32 = node.inputs[0].dtype == 'float32'
        c['lanes_setup'] = (MAX_POOL_LANES_SETUP if float32 else '') % c
        c['lanes'] = (MAX_POOL_LANES if float32 else '') % c
        # in braces: `fail` jumps past the block's end, over its declarations
        return """{
        PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
        if (!xc) { %(fail)s }
        const npy_intp* d = PyArray_DIMS(xc);
        const npy_intp H = d[2], W = d[3];
        if (H < %(wh)d || W < %(ww)d) {
            PyErr_Format(PyExc_ValueError, "max_pool: %(wh)dx%(ww)d windows on %%ldx%%ld maps", (long)H, (long)W);
            Py_DECREF(xc);
            %(fail)s
        }
        const npy_intp oh = (H - %(wh)d) / %(sh)d + 1, ow = (W - %(ww)d) / %(sw)d + 1;
        npy_intp zdims[4] = {d[0], d[1], oh, ow};
        %(alloc)s
        const npy_intp planes = d[0] * d[1];
        const dtype_%(x)s* x0 = (const dtype_%(x)s*)PyArray_DATA(xc);
        dtype_%(z)s* z0 = (dtype_%(z)s*)PyArray_DATA(%(z)s);
        %(lanes_setup)s
        %(parallel)s
        for (npy_intp p = 0; p < planes; p++) {
            const dtype_%(x)s* xp = x0 + p * H * W;
            dtype_%(z)s* zp = z0 + p * oh * ow;
            %(lanes)s
            for (npy_intp i = 0; i < oh; i++)
                for (npy_intp j = 0; j < ow; j++) {
                    const dtype_%(x)s* window = xp + i * %(sh)d * W + j * %(sw)d;
                    dtype_%(x)s m = window[0];
                    for (int a = 0; a < %(wh)d; a++)
                        for (int b = 0; b < %(ww)d; b++)
                            m = window[a * W + b] > m ? window[a * W + b] : m;
                    zp[i * ow + j] = m;
                }
        }
        Py_DECREF(xc);
        }""" % c


# The gradient's loop over one plane (xp, zp, gzp -> gp).  Where gz goes is decided by a mask,
# g & -(x == m), not a branch (gcc made `x == m ? g : 0` two branches an element).
# Disjoint windows (stride >= window): every element is in at most one window, so each row
# of gx is written once, whole: the row of windows' maxima and gradients spread over their
# columns (gradient 0 on columns in no window), then one masked pass, which vectorises.
DISJOINT_WINDOWS = """
            dtype_%(z)s mrow[W];
            %(bits)s grow[W];
            for (npy_intp r = 0; r < H; r++) {
                const npy_intp i = r / %(sh)d, a = r %% %(sh)d;
                dtype_%(gx)s* gr = gp + r * W;
                if (i >= oh || a >= %(wh)d) {                       // a row in no window
                    memset(gr, 0, W * sizeof(dtype_%(gx)s));
                    continue;
                }
                if (a == 0) {                                       // a new row of windows
                    memset(mrow, 0, sizeof mrow);
                    memset(grow, 0, sizeof grow);
                    for (npy_intp j = 0; j < ow; j++)
                        for (int b = 0; b < %(ww)d; b++) {
                            mrow[j * %(sw)d + b] = zp[i * ow + j];
                            memcpy(grow + j * %(sw)d + b, gzp + i * ow + j, sizeof grow[0]);
                        }
                }
                const dtype_%(x)s* xr = xp + r * W;
                for (npy_intp c = 0; c < W; c++) {
                    const %(bits)s masked = grow[c] & -(%(bits)s)(xr[c] == mrow[c]);
                    dtype_%(gx)s add;
                    memcpy(&add, &masked, sizeof add);
                    gr[c] = (dtype_%(gx)s)0 + add;      // as Theano's 0 += gz: a gradient of -0 lands as +0
                }
            }"""

# Overlapping windows: in Theano's order, so an element in several windows sums their
# gradients alike.  With AVX-512 (float32) and maps at most 32 columns wide, a row of gx is two
# vectors; a map's rows are summed on the thread's stack and stored once, when complete.  The window columns b
# are taken sw at a time, from the last: those cover different columns (c - b differ by less
# than sw), so one permutation spreads their windows' maxima and gradients over the row
# (OVERLAPPING_LANES_SETUP says which window j each column c is in), one comparison finds
# the row's maxima and one masked addition adds their gz, as Theano's `if (x == m) gx += gz`.
# Per element the windows come in Theano's order (row of windows i, then column j), because
# b runs down, so for column c, j = (c - b) / sw runs up.  The op alone (100 images, 64 maps
# of 28 x 28, 4x4 windows at stride 2), alternating in one process with the plain loop below:
# 0.22-0.24 of its time (1.40 against 6.27 ms); a window column at a time it was 0.31.
OVERLAPPING_LANES_SETUP = """
        #ifdef __AVX512F__
        const int lanes32 = W <= 32 && H <= 256;    // a map's sums on the thread's stack: 32 KB at most
        %(row_masks)s
        %(window_masks)s
        __m512i window[%(groups)d][2];             // group k, column c: the window j = (c - b) / sw of its b
        __mmask16 covered[%(groups)d][2];          // and whether c has one
        for (int k = 0; k < %(groups)d; k++)
            for (int half = 0; half < 2; half++) {
                int js[16] = {0};
                __mmask16 in = 0;
                for (int lane = 0; lane < 16; lane++)
                    for (int b = %(ww)d - 1 - k * %(sw)d; b >= 0 && b > %(ww)d - 1 - (k + 1) * %(sw)d; b--) {
                        const npy_intp c = 16 * half + lane - b, j = c / %(sw)d;
                        if (c >= 0 && c %% %(sw)d == 0 && j < ow) {
                            js[lane] = (int)j;
                            in |= (__mmask16)(1u << lane);
                        }
                    }
                window[k][half] = _mm512_loadu_si512(js);
                covered[k][half] = in;
            }
        #endif"""
OVERLAPPING_LANES = """
            #ifdef __AVX512F__
            if (lanes32) {
                __m512 sums[H][2];
                for (npy_intp r = 0; r < H; r++)
                    sums[r][0] = sums[r][1] = _mm512_setzero_ps();
                for (npy_intp i = 0; i < oh; i++) {
                    const __m512 zlow = _mm512_maskz_loadu_ps(zfirst, zp + i * ow), zhigh = _mm512_maskz_loadu_ps(zsecond, zp + i * ow + 16);
                    const __m512 glow = _mm512_maskz_loadu_ps(zfirst, gzp + i * ow), ghigh = _mm512_maskz_loadu_ps(zsecond, gzp + i * ow + 16);
                    __m512 m[%(groups)d][2], g[%(groups)d][2];
                    for (int k = 0; k < %(groups)d; k++)
                        for (int half = 0; half < 2; half++) {
                            m[k][half] = _mm512_permutex2var_ps(zlow, window[k][half], zhigh);
                            g[k][half] = _mm512_permutex2var_ps(glow, window[k][half], ghigh);
                        }
                    for (int a = 0; a < %(wh)d; a++) {
                        const float* xr = xp + (i * %(sh)d + a) * W;
                        const __m512 x[2] = {_mm512_maskz_loadu_ps(first, xr), _mm512_maskz_loadu_ps(second, xr + 16)};
                        __m512* sum = sums[i * %(sh)d + a];
                        for (int k = 0; k < %(groups)d; k++)
                            for (int half = 0; half < 2; half++) {
                                const __mmask16 max = _mm512_mask_cmp_ps_mask(covered[k][half], x[half], m[k][half], _CMP_EQ_OQ);
                                sum[half] = _mm512_mask_add_ps(sum[half], max, sum[half], g[k][half]);
                            }
                    }
                }
                for (npy_intp r = 0; r < H; r++) {
                    _mm512_mask_storeu_ps(gp + r * W, first, sums[r][0]);
                    _mm512_mask_storeu_ps(gp + r * W + 16, second, sums[r][1]);
                }
                continue;
            }
            #endif"""
OVERLAPPING_WINDOWS = """
            memset(gp, 0, H * W * sizeof(dtype_%(gx)s));
            for (npy_intp i = 0; i < oh; i++)
                for (npy_intp j = 0; j < ow; j++) {
                    const dtype_%(z)s m = zp[i * ow + j];
                    %(bits)s g;
                    memcpy(&g, gzp + i * ow + j, sizeof g);
                    const dtype_%(x)s* xw = xp + i * %(sh)d * W + j * %(sw)d;
                    dtype_%(gx)s* gw = gp + i * %(sh)d * W + j * %(sw)d;
                    for (int a = 0; a < %(wh)d; a++)
                        for (int b = 0; b < %(ww)d; b++) {
                            const %(bits)s masked = g & -(%(bits)s)(xw[a * W + b] == m);
                            dtype_%(gx)s add;
                            memcpy(&add, &masked, sizeof add);
                            gw[a * W + b] += add;
                        }
                }"""


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
        c['lanes_setup'] = (OVERLAPPING_LANES_SETUP if lanes else '') % c
        c['loop'] = ((OVERLAPPING_LANES if lanes else '') + (DISJOINT_WINDOWS if disjoint else OVERLAPPING_WINDOWS)) % c
        return """{
        PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
        PyArrayObject* zc = PyArray_GETCONTIGUOUS(%(z)s);
        PyArrayObject* gzc = PyArray_GETCONTIGUOUS(%(gz)s);
        if (!xc || !zc || !gzc) { %(release)s %(fail)s }
        const npy_intp H = PyArray_DIMS(xc)[2], W = PyArray_DIMS(xc)[3];
        const npy_intp oh = PyArray_DIMS(zc)[2], ow = PyArray_DIMS(zc)[3];
        if (!PyArray_SAMESHAPE(zc, gzc) || !PyArray_CompareLists(PyArray_DIMS(zc), PyArray_DIMS(xc), 2)
            || oh != (H - %(wh)d) / %(sh)d + 1 || ow != (W - %(ww)d) / %(sw)d + 1) {
            PyErr_SetString(PyExc_ValueError, "max_pool gradient: the shapes of x, z and gz disagree");
            %(release)s
            %(fail)s
        }
        %(alloc)s
        const npy_intp planes = PyArray_DIMS(xc)[0] * PyArray_DIMS(xc)[1];
        const dtype_%(x)s* x0 = (const dtype_%(x)s*)PyArray_DATA(xc);
        const dtype_%(z)s* z0 = (const dtype_%(z)s*)PyArray_DATA(zc);
        const dtype_%(gz)s* gz0 = (const dtype_%(gz)s*)PyArray_DATA(gzc);
        dtype_%(gx)s* gx0 = (dtype_%(gx)s*)PyArray_DATA(%(gx)s);
        %(lanes_setup)s
        %(parallel)s
        for (npy_intp p = 0; p < planes; p++) {
            const dtype_%(x)s* xp = x0 + p * H * W;
            const dtype_%(z)s* zp = z0 + p * oh * ow;
            const dtype_%(gz)s* gzp = gz0 + p * oh * ow;
            dtype_%(gx)s* gp = gx0 + p * H * W;
%(loop)s
        }
        %(release)s
        }""" % c


# PooledFilterGrad: the columns w < across of row cy equal to their window's maximum (maxima[w]),
# appended in order to place (y * W + w) and weight (their gz, grads[w]).  8 at a time, as bits of
# a word for each 64 columns, then one by one.
FIND_EQUAL = """
                            for (npy_intp chunk = 0; chunk < across; chunk += 64) {
                                npy_uint64 bits = 0;
                                for (npy_intp w = chunk; w < across && w < chunk + 64; w += 8) {
                                    npy_uint64 bytes = 0;       // element v: byte v (little-endian), 0 or 1
                                    if (cy + w + 8 <= cend) {
                                        eight row, tops;
                                        memcpy(&row, cy + w, sizeof row);
                                        memcpy(&tops, maxima + w, sizeof tops);
                                        const eight_chars same = __builtin_convertvector(row == tops, eight_chars);
                                        memcpy(&bytes, &same, sizeof bytes);
                                        bytes &= 0x0101010101010101ULL;
                                    } else {
                                        for (int v = 0; v < 8 && w + v < across; v++)
                                            bytes |= (npy_uint64)(cy[w + v] == maxima[w + v]) << 8 * v;
                                    }
                                    bits |= (bytes * 0x0102040810204080ULL >> 56) << (w - chunk);   // byte v -> bit v
                                }
                                for (; bits; bits &= bits - 1) {
                                    const npy_intp x = chunk + __builtin_ctzll(bits);
                                    place[found] = (npy_int32)(y * W + x);
                                    weight[found++] = grads[x];
                                }
                            }"""

# With AVX-512 (float32): 16 columns at a time, their equalities a mask, the places and gz of the
# equal ones packed to the front of a vector and stored whole (the rest overwritten next):
# no branch per maximum.  The op alone (100 images): 0.66 of the time of the bits with 16
# filters, 0.79 with 64, the same values.
FIND_EQUAL_16 = """
                            #ifdef __AVX512F__
                            for (npy_intp w = 0; w < across; w += 16) {
                                const __mmask16 lanes = across - w >= 16 ? 0xFFFF : (__mmask16)((1u << (across - w)) - 1);
                                const __mmask16 equal = _mm512_mask_cmp_ps_mask(
                                    lanes, _mm512_maskz_loadu_ps(lanes, cy + w), _mm512_maskz_loadu_ps(lanes, maxima + w), _CMP_EQ_OQ);
                                const __m512i columns = _mm512_add_epi32(_mm512_set1_epi32((int)(y * W + w)),
                                    _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
                                _mm512_storeu_si512(place + found, _mm512_maskz_compress_epi32(equal, columns));
                                _mm512_storeu_ps(weight + found, _mm512_maskz_compress_ps(equal, _mm512_maskz_loadu_ps(lanes, grads + w)));
                                found += __builtin_popcount(equal);
                            }
                            #else
                            """ + FIND_EQUAL + """
                            #endif"""


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
        c['find'] = FIND_EQUAL_16 if node.inputs[0].dtype == 'float32' else FIND_EQUAL
        return """{
        PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
        PyArrayObject* cc = PyArray_GETCONTIGUOUS(%(c)s);
        PyArrayObject* zc = PyArray_GETCONTIGUOUS(%(z)s);
        PyArrayObject* gzc = PyArray_GETCONTIGUOUS(%(gz)s);
        if (!xc || !cc || !zc || !gzc) { %(release)s %(fail)s }
        const npy_intp* dx = PyArray_DIMS(xc);
        const npy_intp* dc = PyArray_DIMS(cc);
        const npy_intp N = dx[0], C = dx[1], H = dx[2], W = dx[3], F = dc[1], Hc = dc[2], Wc = dc[3];
        const npy_intp oh = PyArray_DIMS(zc)[2], ow = PyArray_DIMS(zc)[3];
        if (dc[0] != N || Hc > H || Wc > W || !PyArray_SAMESHAPE(zc, gzc)
            || !PyArray_CompareLists(PyArray_DIMS(zc), dc, 2)
            || oh != (Hc - %(wh)d) / %(sh)d + 1 || ow != (Wc - %(ww)d) / %(sw)d + 1) {
            PyErr_SetString(PyExc_ValueError, "pooled filter gradient: the shapes of x, c, z and gz disagree");
            %(release)s
            %(fail)s
        }
        const npy_intp kh = H - Hc + 1, kw = W - Wc + 1, rows = C * kh;
        npy_intp wdims[4] = {F, C, kh, kw};
        %(alloc)s
        // each thread sums into its own F x rows x span block (a patch row padded to 8, so that
        // one vector takes it: the 8 - kw extra columns collect pixels to the right, unused),
        // then the blocks are added in thread order
        const npy_intp span = kw > 8 ? kw : 8, most = oh * ow * %(wh)d * %(ww)d;   // maxima a map at most
        const npy_intp across = (ow - 1) * %(sw)d + %(ww)d;        // columns of c under windows
        const int threads = %(threads)s;
        typedef %(t)s eight __attribute__((vector_size(8 * sizeof(%(t)s))));
        typedef char eight_chars __attribute__((vector_size(8)));
        %(t)s* sums = (%(t)s*)calloc((size_t)threads * F * rows * span, sizeof(%(t)s));
        npy_intp* offsets = (npy_intp*)malloc(rows * sizeof(npy_intp));   // patch row -> offset in x
        // a thread's maxima of a map (where in the image, their gz), then a row of windows' maxima
        // and gz spread over their columns; 16 more of each, written past the end by vector stores
        const npy_intp own = most + 16 + 2 * (across + 16);
        npy_int32* places = (npy_int32*)malloc((size_t)threads * (most + 16) * sizeof(npy_int32));
        %(t)s* weights = (%(t)s*)malloc((size_t)threads * own * sizeof(%(t)s));
        if (!sums || !offsets || !places || !weights) {
            free(sums); free(offsets); free(places); free(weights);
            PyErr_NoMemory();
            %(release)s
            %(fail)s
        }
        for (npy_intp q = 0; q < rows; q++)
            offsets[q] = ((q / kh) * H + q %% kh) * W;
        const %(t)s* x0 = (const %(t)s*)PyArray_DATA(xc);
        const %(t)s* c0 = (const %(t)s*)PyArray_DATA(cc);
        const %(t)s* cend = c0 + N * F * Hc * Wc;
        const %(t)s* z0 = (const %(t)s*)PyArray_DATA(zc);
        const %(t)s* gz0 = (const %(t)s*)PyArray_DATA(gzc);
        %(region)s
        {
            const int me = %(thread)s;
            %(t)s* mine = sums + (npy_intp)me * F * rows * span;
            npy_int32* place = places + (npy_intp)me * (most + 16);
            %(t)s* weight = weights + (npy_intp)me * own;
            %(t)s* maxima = weight + most + 16;
            %(t)s* grads = maxima + across + 16;
            for (npy_intp w = across; w < across + 16; w++)
                maxima[w] = NAN;        // equal to nothing
            %(images)s
            for (npy_intp n = 0; n < N; n++) {
                const %(t)s* image = x0 + n * C * H * W;
                // 8-wide reads of a patch row stay inside x up to this place of a maximum
                const npy_intp inside = (N - n) * C * H * W - offsets[rows - 1] - 8;
                for (npy_intp f = 0; f < F; f++) {
                    const %(t)s* cp = c0 + (n * F + f) * Hc * Wc;
                    const %(t)s* zp = z0 + (n * F + f) * oh * ow;
                    const %(t)s* gzp = gz0 + (n * F + f) * oh * ow;
                    npy_intp found = 0;
                    for (npy_intp i = 0; i < oh; i++) {
                        // each column's window maximum (NaN in the gaps between windows: equal to
                        // nothing) and gz
                        for (npy_intp j = 0; j < ow; j++)
                            for (int b = 0; b < %(sw)d && j * %(sw)d + b < across; b++) {
                                maxima[j * %(sw)d + b] = b < %(ww)d ? zp[i * ow + j] : NAN;
                                grads[j * %(sw)d + b] = gzp[i * ow + j];
                            }
                        for (int a = 0; a < %(wh)d; a++) {
                            const npy_intp y = i * %(sh)d + a;
                            const %(t)s* cy = cp + y * Wc;
                            // the elements equal to their window's maximum (a few a row), recorded in order
                            %(find)s
                        }
                    }
                    const npy_intp furthest = found ? place[found - 1] : 0;
                    // gz times the patch under each maximum, two patch rows at a time over all the
                    // maxima: their sums stay in registers (two each, to overlap the additions)
                    %(t)s* __restrict__ acc = mine + f * rows * span;
                    if (kw <= 8 && furthest <= inside) {
                        for (npy_intp q = 0; q < rows; q += 2) {
                            const npy_intp next = q + 1 < rows ? q + 1 : q;   // an odd last row twice, summed once
                            const %(t)s* top = image + offsets[q];
                            const %(t)s* bottom = image + offsets[next];
                            eight top0 = {0}, top1 = {0}, bottom0 = {0}, bottom1 = {0}, pixels;   // gcc's vector extension
                            npy_intp k = 0;
                            for (; k + 1 < found; k += 2) {
                                memcpy(&pixels, top + place[k], sizeof pixels);
                                top0 += weight[k] * pixels;
                                memcpy(&pixels, bottom + place[k], sizeof pixels);
                                bottom0 += weight[k] * pixels;
                                memcpy(&pixels, top + place[k + 1], sizeof pixels);
                                top1 += weight[k + 1] * pixels;
                                memcpy(&pixels, bottom + place[k + 1], sizeof pixels);
                                bottom1 += weight[k + 1] * pixels;
                            }
                            if (k < found) {
                                memcpy(&pixels, top + place[k], sizeof pixels);
                                top0 += weight[k] * pixels;
                                memcpy(&pixels, bottom + place[k], sizeof pixels);
                                bottom0 += weight[k] * pixels;
                            }
                            eight sum;
                            memcpy(&sum, acc + q * span, sizeof sum);
                            sum += top0 + top1;
                            memcpy(acc + q * span, &sum, sizeof sum);
                            if (next != q) {
                                memcpy(&sum, acc + next * span, sizeof sum);
                                sum += bottom0 + bottom1;
                                memcpy(acc + next * span, &sum, sizeof sum);
                            }
                        }
                    } else {
                        for (npy_intp k = 0; k < found; k++)
                            for (npy_intp q = 0; q < rows; q++)
                                for (npy_intp s = 0; s < kw; s++)
                                    acc[q * span + s] += weight[k] * image[place[k] + offsets[q] + s];
                    }
                }
            }
        }
        %(t)s* out = (%(t)s*)PyArray_DATA(%(dw)s);
        for (npy_intp f = 0; f < F; f++)
            for (npy_intp q = 0; q < rows; q++)
                for (npy_intp s = 0; s < kw; s++) {
                    %(t)s total = 0;
                    for (int t = 0; t < threads; t++)
                        total += sums[(((npy_intp)t * F + f) * rows + q) * span + s];
                    out[(f * rows + q) * kw + s] = total;
                }
        free(sums); free(offsets); free(places); free(weights);
        %(release)s
        }""" % c


# Theano's im2col renamed, and this one in front of it: whole rows of the image when the
# patches are unpadded, unstrided and undilated (each row of the patch matrix is then
# height_col runs of width_col consecutive pixels); Theano's code for every other case.
FAST_IM2COL = """
__attribute__((optimize("no-tree-loop-distribute-patterns")))   // short runs: no memcpy calls
void im2col(const %(t)s* data_im, const int channels, const int height, const int width,
            const int kernel_h, const int kernel_w, const int dilation_h, const int dilation_w,
            const int pad_hl, const int pad_hr, const int pad_wl, const int pad_wr,
            const int stride_h, const int stride_w, %(t)s* data_col) {
    if (dilation_h != 1 || dilation_w != 1 || pad_hl || pad_hr || pad_wl || pad_wr
        || stride_h != 1 || stride_w != 1) {
        im2col_theano(data_im, channels, height, width, kernel_h, kernel_w, dilation_h, dilation_w,
                      pad_hl, pad_hr, pad_wl, pad_wr, stride_h, stride_w, data_col);
        return;
    }
    const int height_col = height - kernel_h + 1, width_col = width - kernel_w + 1;
    // runs copied 8 at a time, each but the last of a row overrunning into the next run's
    // place (written next) and reading into the image's next row (there is one): no tails
    const int eights = (width_col + 7) / 8 * 8 <= width ? (width_col + 7) / 8 : 0;
    for (int c = 0; c < channels * kernel_h * kernel_w; ++c) {
        const %(t)s* src = data_im + ((npy_intp)(c / kernel_h / kernel_w) * height + (c / kernel_w) %% kernel_h) * width
                           + c %% kernel_w;
        %(t)s* dst = data_col + (npy_intp)c * height_col * width_col;
        int h = 0;
        for (; h < height_col - 1 && eights; ++h, src += width, dst += width_col)
            for (int e = 0; e < eights; ++e)
                for (int v = 0; v < 8; ++v)
                    dst[8 * e + v] = src[8 * e + v];
        for (; h < height_col; ++h, src += width, dst += width_col)
            for (int w = 0; w < width_col; ++w)
                dst[w] = src[w];
    }
}
"""


class _RowsIm2col:
    """Theano's CorrMM C code with FAST_IM2COL in place of its im2col (Theano 1.0.5's text)."""

    def c_support_code_apply(self, node, nodename):
        code = super().c_support_code_apply(node, nodename)
        theirs, next_function = 'void im2col(const ', 'void col2im(const '
        if code.count(theirs) != 1 or code.count(next_function) != 1:
            raise RuntimeError('cpuops: Theano\'s corr_gemm.c is not 1.0.5\'s; install theano==1.0.5')
        ours = FAST_IM2COL % dict(t=NPY_FLOAT[node.inputs[0].dtype])
        return code.replace(theirs, 'void im2col_theano(const ').replace(next_function, ours + next_function)


# The forward correlation without a patch matrix, for maps of at most 32 columns: each output
# row of a block of 8 filters summed in 16 vector registers (2 vectors of 16 columns a filter),
# reading the image rows in place.  Per-image patch matrices cost a third of CorrMM's time.
# Built only for CPUs with AVX-512 (32 vector registers): with AVX2's 16, the sums that fit
# made it slower than Theano's im2col and OpenBLAS's Haswell kernels (1.09 / 1.28 of the time
# with 16 / 64 filters), so there CorrMM stays Theano's.
DIRECT_CORRELATION = """
#ifdef __AVX512F__
#define DIRECT_LANES 16         // 2 vectors a row of 32 columns
#define DIRECT_FILTERS 8        // 16 sums in registers
#define DIRECT_VECTORS (32 / DIRECT_LANES)
typedef %(t)s direct_vector __attribute__((vector_size(DIRECT_LANES * sizeof(%(t)s))));   // gcc's vector extension

static inline direct_vector direct_load(const %(t)s* from) {
    direct_vector v;
    memcpy(&v, from, sizeof v);
    return v;
}

// to[0:n] = v[0:n] for 0 < n < DIRECT_LANES (a row's last columns): in float32 one masked store
static inline void direct_store_part(%(t)s* to, direct_vector v, npy_intp n) {
    %(store_part)s
}

// out (N, F, H - kh + 1, W - kw + 1) = x (N, C, H, W) correlated with w (F, C, kh, kw), all
// C-contiguous; W - kw + 1 <= 32.  0 on success, -1 out of memory.
static int direct_correlate(const %(t)s* x, const %(t)s* w, %(t)s* out, const npy_intp N, const npy_intp C,
                            const npy_intp H, const npy_intp W, const npy_intp F, const npy_intp kh, const npy_intp kw) {
    const npy_intp Hc = H - kh + 1, Wc = W - kw + 1, K = C * kh * kw, FB = DIRECT_FILTERS;
    const npy_intp blocks = (F + FB - 1) / FB, plane = C * H * W;
    // filters in blocks of FB, the FB weights of one patch element together (zeros past F)
    %(t)s* packed = (%(t)s*)calloc(blocks * K * FB + 1, sizeof(%(t)s));     // + 1: never calloc(0)
    if (!packed)
        return -1;
    for (npy_intp f = 0; f < F; f++)
        for (npy_intp k = 0; k < K; k++)
            packed[((f / FB) * K + k) * FB + f %% FB] = w[f * K + k];
    int failed = 0;
    #pragma omp parallel
    {
        // an image copied with 32 zeros after it: the vectors read from any row stay inside
        %(t)s* image = (%(t)s*)calloc(plane + 32, sizeof(%(t)s));
        if (!image) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (npy_intp n = 0; n < N; n++) {
            if (!image)
                continue;
            memcpy(image, x + n * plane, plane * sizeof(%(t)s));
            for (npy_intp b = 0; b < blocks; b++)
                for (npy_intp y = 0; y < Hc; y++) {
                    direct_vector sums[DIRECT_FILTERS][DIRECT_VECTORS] = {{{0}}};
                    const %(t)s* weights = packed + b * K * FB;
                    for (npy_intp c = 0; c < C; c++)
                        for (npy_intp a = 0; a < kh; a++) {
                            const %(t)s* row = image + (c * H + y + a) * W;
                            for (npy_intp e = 0; e < kw; e++, weights += FB) {
                                direct_vector pixels[DIRECT_VECTORS];
                                #pragma GCC unroll 4
                                for (int v = 0; v < DIRECT_VECTORS; v++)
                                    pixels[v] = direct_load(row + e + DIRECT_LANES * v);
                                #pragma GCC unroll 8
                                for (int f = 0; f < DIRECT_FILTERS; f++)
                                    #pragma GCC unroll 4
                                    for (int v = 0; v < DIRECT_VECTORS; v++)
                                        sums[f][v] += weights[f] * pixels[v];
                            }
                        }
                    for (int f = 0; f < DIRECT_FILTERS && b * FB + f < F; f++) {
                        %(t)s* to = out + ((n * F + b * FB + f) * Hc + y) * Wc;
                        #pragma GCC unroll 4
                        for (int v = 0; v < DIRECT_VECTORS; v++) {
                            const direct_vector sum = sums[f][v];    // a copy: sums' address never taken
                            if (DIRECT_LANES * (v + 1) <= Wc)
                                memcpy(to + DIRECT_LANES * v, &sum, sizeof sum);
                            else if (DIRECT_LANES * v < Wc)
                                direct_store_part(to + DIRECT_LANES * v, sum, Wc - DIRECT_LANES * v);
                        }
                    }
                }
        }
        free(image);
    }
    free(packed);
    return failed ? -1 : 0;
}
#endif
"""

# A row's last columns: element by element they took 15% of the correlation's time (28 columns).
DIRECT_STORE_PART = {'float32': '_mm512_mask_storeu_ps(to, (__mmask16)((1u << n) - 1), (__m512)v);',
                     'float64': 'for (npy_intp i = 0; i < n; i++) to[i] = v[i];'}


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
        return code + DIRECT_CORRELATION % dict(t=NPY_FLOAT[node.inputs[0].dtype],
                                                store_part=DIRECT_STORE_PART[node.inputs[0].dtype])

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
        return """
        #ifdef __AVX512F__
        if (PyArray_NDIM(%(x)s) == 4 && PyArray_NDIM(%(w)s) == 4 && PyArray_DIMS(%(x)s)[1] == PyArray_DIMS(%(w)s)[1]
            && PyArray_DIMS(%(w)s)[2] <= PyArray_DIMS(%(x)s)[2]
            && PyArray_DIMS(%(x)s)[3] - 32 < PyArray_DIMS(%(w)s)[3] && PyArray_DIMS(%(w)s)[3] <= PyArray_DIMS(%(x)s)[3]) {
            PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
            PyArrayObject* wc = PyArray_GETCONTIGUOUS(%(w)s);
            if (!xc || !wc) { %(release)s %(fail)s }
            const npy_intp* dx = PyArray_DIMS(xc);
            const npy_intp* dw = PyArray_DIMS(wc);
            npy_intp zdims[4] = {dx[0], dw[0], dx[2] - dw[2] + 1, dx[3] - dw[3] + 1};
            %(alloc)s
            if (direct_correlate((const %(t)s*)PyArray_DATA(xc), (const %(t)s*)PyArray_DATA(wc),
                                 (%(t)s*)PyArray_DATA(%(z)s), dx[0], dx[1], dx[2], dx[3], dw[0], dw[2], dw[3])) {
                PyErr_NoMemory();
                %(release)s
                %(fail)s
            }
            %(release)s
        } else
        #endif
        {
        %(theirs)s
        }""" % c


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
        return """{
        PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
        PyArrayObject* bc = PyArray_GETCONTIGUOUS(%(b)s);
        if (!xc || !bc) { %(release)s %(fail)s }
        const npy_intp* d = PyArray_DIMS(xc);
        const npy_intp N = d[0], C = d[1], S = PyArray_NDIM(xc) == 4 ? d[2] * d[3] : 1;
        if (PyArray_DIMS(bc)[0] != C) {
            PyErr_Format(PyExc_ValueError, "relu_with_bias: %%ld channels, %%ld thresholds",
                         (long)C, (long)PyArray_DIMS(bc)[0]);
            %(release)s
            %(fail)s
        }
        %(alloc)s
        const %(t)s* from = (const %(t)s*)PyArray_DATA(xc);
        const %(t)s* bias = (const %(t)s*)PyArray_DATA(bc);
        %(t)s* to = (%(t)s*)PyArray_DATA(%(z)s);
        // a < 0 ? 0 : a, as Theano's maximum(a, 0): NaN and -0 kept
        if (S == 1) {                               // rows: b along them
            %(parallel)s
            for (npy_intp n = 0; n < N; n++)
                for (npy_intp c = 0; c < C; c++) {
                    const %(t)s a = from[n * C + c] + bias[c];
                    to[n * C + c] = a < 0 ? 0 : a;
                }
        } else {                                    // maps: one threshold a map
            %(parallel)s
            for (npy_intp m = 0; m < N * C; m++) {
                const %(t)s threshold = bias[m %% C];
                for (npy_intp s = 0; s < S; s++) {
                    const %(t)s a = from[m * S + s] + threshold;
                    to[m * S + s] = a < 0 ? 0 : a;
                }
            }
        }
        %(release)s
        }""" % locals()


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
    """Whether the node's tensor inputs and outputs are float32 or float64 arrays of the CPU."""
    return all(isinstance(v.type, T.TensorType) and v.dtype in NPY_FLOAT
               for v in node.inputs[:1] + node.outputs)


def filter_gradient(image, top, shape, props):
    """The filters' gradient of a correlation with those settings, from the images, the
    output's gradient and the filters' (h, w) (or None: valid, unstrided): PooledFilterGrad where that gradient comes through disjoint max-pooling
    (our ops) of the same images' correlation, else our CorrMM_gradWeights."""
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
    if not (rewrites.cpu_graph() and float_tensors(node)):
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
    if not (rewrites.cpu_graph() and float_tensors(node)):
        return False
    image, top = node.inputs[:2]
    if isinstance(node.op, AbstractConv2d_gradWeights):
        shape = node.inputs[2]
        grad = filter_gradient(image, top, shape, corr_props(node.op))
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
    windows = rewrites.cpu_graph() and isinstance(node.op, pool.Pool) and pooling_windows(node, 1)
    return [MaxPool(*windows)(node.inputs[0])] if windows else False


@register_as_built
@local_optimizer([pool.MaxPoolGrad])
def use_max_pool_grad(node):
    """Its gradient, Theano's MaxPoolGrad, to ours."""
    windows = rewrites.cpu_graph() and isinstance(node.op, pool.MaxPoolGrad) and pooling_windows(node, 3)
    return [MaxPoolGrad(*windows)(*node.inputs[:3])] if windows else False


def elemwise(var, scalar_op):
    """var's node if it is an elementwise op of that scalar op class, else None."""
    node = var.owner
    if node and isinstance(node.op, T.Elemwise) and isinstance(node.op.scalar_op, scalar_op):
        return node
    return None


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
    a = rewrites.cpu_graph() and relu_input(node.outputs[0])
    parts = a is not None and a is not False and biased(a)
    return [BiasReLU()(*parts)] if parts else False


@register_as_built
@local_optimizer([T.mul])
def use_bias_relu_grad(node):
    """Theano's gradient of maximum(a, 0) with a = x + b, gz * (maximum(a, 0) == a), to
    BiasReLU's, gz * (BiasReLU(x, b) > 0): with the forward pass replaced, a is not computed.
    The one value that changes: the gradient at a == 0 exactly, 0 here (as PyTorch's ReLU)."""
    mul = elemwise(node.outputs[0], theano.scalar.Mul)
    if not (rewrites.cpu_graph() and mul and len(mul.inputs) == 2):
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
