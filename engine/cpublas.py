"""The dense layers' float32 matrix products on CPUs with AVX-512 (Theano's Dot22 and Gemm
with their own kernel in place of the BLAS call where it is faster), the momentum update in one
pass (with the weights' gradient, in the same kernel), and the bias gradients' sums.

Why: a training step of the published network spends about half its time in three products of
the 784 x 1000 layer (forward, its weights' gradient, its input's gradient), each with one side
of 100 rows, the minibatch.  On 2 cores OpenBLAS ran them at 140-165 GFLOPS, well under the
~190 its own kernels reach on one core times two: at this size its two threads wait on each other
and, set to sleep between calls so as to leave the cores to the OpenMP ops, wake up late.  Here
the same OpenMP threads as the convolution's share the work: 8 rows x 32 columns of the result
summed in 16 vector registers (gcc vector extensions, no intrinsics), from the second operand's
32 columns copied together first (transposed 16 x 16 at a time where it is stored by columns)
and the first operand read in place.  Each thread takes whole 32-column panels of the result,
or, where the second operand fits the cache packed (the weights' gradient: 100 rows), whole
8-row blocks.  Measured on the AMD EPYC of RESULTS.md, hot caches, one process: 0.81-0.87 ms
against OpenBLAS's 0.92-1.04 ms for each product; inside the training step (Theano's profile):
0.98 and 0.99 ms (forward, input gradient) and 0.87 ms (the weights' gradient into the momentum)
against 1.10-1.12 ms.

Where it is used: float32, the result at least 32 columns wide, and either the second operand
packed within 512 KiB or the first operand's rows times at most KC of its columns within 512 KiB
(read again for each panel, it must stay in the core's cache).  Narrow results (the 10-way
softmax layer), larger operands, float64 and CPUs without AVX-512 keep Theano's call to the
BLAS: the same op, its other branch.  The sums run in another order than OpenBLAS's (over the
columns of the first operand in blocks of KC), so results differ by float rounding.

The momentum update (MomentumUpdate, MomentumGemm) and ChannelSum: see their docstrings.  All
enter through Theano's optimizer (engine/rewrites.py; machine.set_up registers them): the
update from the formula nnet.Trainer writes, the rest after Theano's own rewrites (its BLAS
ones included); the products' only where Theano runs with a BLAS and OpenMP (machine.set_up's
default).
"""
import theano
import theano.tensor as T
from theano.gof import OpenMPOp
from theano.gof.opt import TopoOptimizer, in2out, local_optimizer
from theano.tensor import blas

from .cpuops import c_alias
from .csource import KeyedBySource
from . import rewrites
from .rewrites import register, register_as_built

DENSE_GEMM = r"""
#ifdef __AVX512F__
#define DENSE_ROWS 8            // a tile: 8 rows x 32 columns, 16 sums in vector registers
#define DENSE_COLUMNS 32
#define DENSE_KC 1024           // the first operand's columns taken at a time
#define DENSE_CACHED (512 * 1024 / 4)   // floats that stay in a core's cache (half of 1 MiB of L2)
typedef float dense_vector __attribute__((vector_size(64)));
typedef float dense_unaligned __attribute__((vector_size(64), aligned(4)));
typedef int dense_indices __attribute__((vector_size(64)));

static inline npy_intp dense_min(npy_intp a, npy_intp b) {
    return a < b ? a : b;
}

// Whether B packed whole (K x N rounded up to panels) fits the cache: then by row blocks.
static int dense_by_rows(npy_intp N, npy_intp K) {
    return K <= DENSE_KC && K * ((N + DENSE_COLUMNS - 1) / DENSE_COLUMNS) * DENSE_COLUMNS <= DENSE_CACHED;
}

// Whether dense_gemm is the faster: wide enough for panels, and by row blocks (A read once) or
// A's block of up to KC columns within the cache (read again for each panel).
static int dense_suits(npy_intp M, npy_intp N, npy_intp K) {
    return N >= DENSE_COLUMNS && (dense_by_rows(N, K) || M * dense_min(K, DENSE_KC) <= DENSE_CACHED);
}

// 16 rows of 16 floats (row r at from + r * step) to 16 columns (column r at to + r, rows
// to_step apart): four rounds of interleaving the first 8 rows with the last 8.
static inline void dense_transpose16(const float* from, npy_intp step, float* to, npy_intp to_step) {
    const dense_indices low = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const dense_indices high = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    dense_vector r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = *(const dense_unaligned*)(from + i * step);
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            t[2 * i] = __builtin_shuffle(r[i], r[i + 8], low);
            t[2 * i + 1] = __builtin_shuffle(r[i], r[i + 8], high);
        }
        for (int i = 0; i < 16; i++)
            r[i] = t[i];
    }
    for (int i = 0; i < 16; i++)
        *(dense_unaligned*)(to + i * to_step) = r[i];
}

// panel[k][0:32] = B[k][0:n], zeros after n, for k < kc; B[k][j] at b[k * rsb + j * csb].
// (The columns past n are summed and dropped; zeros keep stale memory, denormals perhaps, out.)
static void dense_pack(npy_intp kc, npy_intp n, const float* b, npy_intp rsb, npy_intp csb, float* panel) {
    if (csb == 1 && n == DENSE_COLUMNS) {           // rows of 32 contiguous: two vector copies each
        for (npy_intp k = 0; k < kc; k++) {
            *(dense_vector*)(panel + k * DENSE_COLUMNS) = *(const dense_unaligned*)(b + k * rsb);
            *(dense_vector*)(panel + k * DENSE_COLUMNS + 16) = *(const dense_unaligned*)(b + k * rsb + 16);
        }
        return;
    }
    npy_intp k16 = 0, n16 = 0;                      // stored by columns: 16 x 16 blocks
    if (rsb == 1) {
        k16 = kc / 16 * 16;
        n16 = n / 16 * 16;
        for (npy_intp k = 0; k < k16; k += 16)
            for (npy_intp j = 0; j < n16; j += 16)
                dense_transpose16(b + j * csb + k, csb, panel + k * DENSE_COLUMNS + j, DENSE_COLUMNS);
    }
    for (npy_intp k = 0; k < kc; k++)               // the rest one by one
        for (npy_intp j = k < k16 ? n16 : 0; j < DENSE_COLUMNS; j++)
            panel[k * DENSE_COLUMNS + j] = j < n ? b[k * rsb + j * csb] : 0;
}

// Asks for part `part` of `parts` of the cache lines that dense_pack will read for a panel at b:
// spread over the row blocks of the panel before, the next one's come in while this one computes.
static inline void dense_prefetch(npy_intp kc, const float* b, npy_intp rsb, npy_intp csb, npy_intp part, npy_intp parts) {
    if (csb == 1) {                                 // kc rows of 32 floats: two lines each
        for (npy_intp k = kc * part / parts; k < kc * (part + 1) / parts; k++) {
            __builtin_prefetch(b + k * rsb);
            __builtin_prefetch(b + k * rsb + 16);
        }
    } else if (rsb == 1) {                          // 32 columns of kc floats: a line each 16
        const npy_intp per_column = (kc + 15) / 16, lines = DENSE_COLUMNS * per_column;
        for (npy_intp l = lines * part / parts; l < lines * (part + 1) / parts; l++)
            __builtin_prefetch(b + (l / per_column) * csb + (l % per_column) * 16);
    }
}

// Asks for the cache lines of 32 floats at `row` (two, or three unaligned), to be written.
static inline void dense_prefetch_row(const float* row) {
    __builtin_prefetch(row, 1);
    __builtin_prefetch(row + 16, 1);
    __builtin_prefetch(row + 31, 1);
}

// c[0:m][0:32] (rows ldc apart) = alpha * sum over k < kc of A[i][k] panel[k] + beta * c, with
// A[i][k] at a[i * rsa + k * csa]; rows past m are computed from row 0 and not stored.  With a
// parameter w (rows ldc apart as c's; else NULL), the momentum update's last two terms as well:
// c += d * w, then w += c.
static inline void dense_tile(npy_intp kc, const float* a, npy_intp rsa, npy_intp csa, const float* panel,
                              float* c, npy_intp ldc, int m, float alpha, float beta, float* w, float d) {
    dense_vector sums[DENSE_ROWS][2];
    const float* rows[DENSE_ROWS];
    for (int i = 0; i < DENSE_ROWS; i++) {
        sums[i][0] = sums[i][1] = (dense_vector){0};
        rows[i] = a + (i < m ? i : 0) * rsa;
    }
    for (npy_intp k = 0, at = 0; k < kc; k++, at += csa) {
        const dense_vector b0 = *(const dense_vector*)(panel + k * DENSE_COLUMNS);
        const dense_vector b1 = *(const dense_vector*)(panel + k * DENSE_COLUMNS + 16);
        #pragma GCC unroll 8
        for (int i = 0; i < DENSE_ROWS; i++) {
            const float x = rows[i][at];
            sums[i][0] += x * b0;
            sums[i][1] += x * b1;
        }
    }
    #pragma GCC unroll 8
    for (int i = 0; i < DENSE_ROWS; i++) {          // unrolled: the sums stay in registers
        if (i >= m)
            break;
        dense_unaligned* c0 = (dense_unaligned*)(c + i * ldc);
        dense_unaligned* c1 = (dense_unaligned*)(c + i * ldc + 16);
        dense_vector s0 = alpha * sums[i][0], s1 = alpha * sums[i][1];
        if (beta != 0) {                            // as BLAS: with beta 0, c's old values (NaN too) not read
            s0 += beta * *c0;
            s1 += beta * *c1;
        }
        if (w) {
            dense_unaligned* w0 = (dense_unaligned*)(w + i * ldc);
            dense_unaligned* w1 = (dense_unaligned*)(w + i * ldc + 16);
            if (d != 0) {                           // no decay: no 0 * w (NaN for an infinite w)
                s0 += d * *w0;
                s1 += d * *w1;
            }
            *w0 += s0;
            *w1 += s1;
        }
        *c0 = s0;
        *c1 = s1;
    }
}

// c[0:m][0:n] (rows ldc apart) as dense_tile, for a panel of n <= 32 columns.
static inline void dense_block(npy_intp kc, const float* a, npy_intp rsa, npy_intp csa, const float* panel,
                               float* c, npy_intp ldc, int m, npy_intp n, float alpha, float beta, float* w, float d) {
    if (n == DENSE_COLUMNS) {
        dense_tile(kc, a, rsa, csa, panel, c, ldc, m, alpha, beta, w, d);
        return;
    }
    float edge[DENSE_ROWS * DENSE_COLUMNS] = {0}, edge_w[DENSE_ROWS * DENSE_COLUMNS] = {0};   // the last, narrower panel's tile
    for (int i = 0; i < m; i++)
        for (npy_intp j = 0; j < n; j++) {
            edge[i * DENSE_COLUMNS + j] = c[i * ldc + j];
            edge_w[i * DENSE_COLUMNS + j] = w ? w[i * ldc + j] : 0;
        }
    dense_tile(kc, a, rsa, csa, panel, edge, DENSE_COLUMNS, m, alpha, beta, w ? edge_w : NULL, d);
    for (int i = 0; i < m; i++)
        for (npy_intp j = 0; j < n; j++) {
            c[i * ldc + j] = edge[i * DENSE_COLUMNS + j];
            if (w)
                w[i * ldc + j] = edge_w[i * DENSE_COLUMNS + j];
        }
}

// C (M x N, rows ldc apart, unit columns) = alpha * A B + beta * C, A[i][k] at a[i * rsa + k * csa],
// B[k][j] at b[k * rsb + j * csb]; with w (a parameter stored as C; else NULL), then C += d * w
// and w += C, the momentum update; K >= 1.  0 on success, -1 out of memory.
// Where all of B packed fits the cache (the weights' gradient: 100 rows), it is packed once and
// each OpenMP thread takes whole 8-row blocks of C (whole rows of C and w written by one thread);
// otherwise each thread takes whole 32-column panels of C, packing each panel of B as it comes.
static int dense_gemm(npy_intp M, npy_intp N, npy_intp K, float alpha, const float* a, npy_intp rsa, npy_intp csa,
                      const float* b, npy_intp rsb, npy_intp csb, float beta, float* c, npy_intp ldc,
                      float* w, float d) {
    const npy_intp row_blocks = (M + DENSE_ROWS - 1) / DENSE_ROWS, panels = (N + DENSE_COLUMNS - 1) / DENSE_COLUMNS;
    const npy_intp kc_max = dense_min(K, DENSE_KC);
    const int by_rows = dense_by_rows(N, K);
    float* all = by_rows ? (float*)aligned_alloc(64, (K + 1) * panels * DENSE_COLUMNS * sizeof(float)) : NULL;
    if (by_rows && !all)
        return -1;
    int failed = 0;
    #pragma omp parallel
    {
        if (by_rows) {
            #pragma omp for schedule(static)
            for (npy_intp p = 0; p < panels; p++) {
                const npy_intp n = dense_min(N - p * DENSE_COLUMNS, DENSE_COLUMNS);
                dense_pack(K, n, b + p * DENSE_COLUMNS * csb, rsb, csb, all + p * K * DENSE_COLUMNS);
            }
            #pragma omp for schedule(static)
            for (npy_intp r = 0; r < row_blocks; r++) {
                const int m = (int)dense_min(M - r * DENSE_ROWS, DENSE_ROWS);
                for (npy_intp p = 0; p < panels; p++) {
                    const npy_intp n = dense_min(N - p * DENSE_COLUMNS, DENSE_COLUMNS);
                    if (N - (p + 1) * DENSE_COLUMNS >= DENSE_COLUMNS) {     // the next tile's rows of c and w
                        float* next = c + r * DENSE_ROWS * ldc + (p + 1) * DENSE_COLUMNS;
                        for (npy_intp at = 0; at < m * ldc; at += ldc)
                            dense_prefetch_row(next + at);
                        for (npy_intp at = 0; w && at < m * ldc; at += ldc)
                            dense_prefetch_row(w + (next - c) + at);
                    }
                    dense_block(K, a + r * DENSE_ROWS * rsa, rsa, csa, all + p * K * DENSE_COLUMNS,
                                c + r * DENSE_ROWS * ldc + p * DENSE_COLUMNS, ldc, m, n, alpha, beta,
                                w ? w + r * DENSE_ROWS * ldc + p * DENSE_COLUMNS : NULL, d);
                }
            }
        } else {
            float* panel = (float*)aligned_alloc(64, (kc_max + 1) * DENSE_COLUMNS * sizeof(float));
            if (!panel) {
                #pragma omp atomic write
                failed = 1;
            }
            // the first operand's columns in blocks of KC, outermost: its block stays in the cache
            for (npy_intp k0 = 0; k0 < K; k0 += DENSE_KC) {
                const npy_intp kc = dense_min(K - k0, DENSE_KC);
                const float scale = k0 ? 1.0f : beta;   // later blocks add to the first one's sums
                float* last_w = k0 + kc >= K ? w : NULL;   // the update's terms once, with the last block
                #pragma omp for schedule(static) nowait
                for (npy_intp p = 0; p < panels; p++) {     // a thread keeps its panels for every block
                    if (!panel)                             // every thread meets every loop, as OpenMP asks
                        continue;
                    const npy_intp n = dense_min(N - p * DENSE_COLUMNS, DENSE_COLUMNS);
                    dense_pack(kc, n, b + k0 * rsb + p * DENSE_COLUMNS * csb, rsb, csb, panel);
                    const int next_full = N - (p + 1) * DENSE_COLUMNS >= DENSE_COLUMNS;
                    for (npy_intp r = 0; r < row_blocks; r++) {
                        if (next_full)
                            dense_prefetch(kc, b + k0 * rsb + (p + 1) * DENSE_COLUMNS * csb, rsb, csb, r, row_blocks);
                        const int m = (int)dense_min(M - r * DENSE_ROWS, DENSE_ROWS);
                        float* tile = c + r * DENSE_ROWS * ldc + p * DENSE_COLUMNS;
                        for (npy_intp i = DENSE_ROWS; i < 2 * DENSE_ROWS && r * DENSE_ROWS + i < M && n == DENSE_COLUMNS; i++)
                            dense_prefetch_row(tile + i * ldc);         // the next tile's rows of c
                        dense_block(kc, a + r * DENSE_ROWS * rsa + k0 * csa, rsa, csa, panel, tile, ldc, m, n, alpha, scale,
                                    last_w ? last_w + (tile - c) : NULL, d);
                    }
                }
            }
            free(panel);
        }
    }
    free(all);
    return failed ? -1 : 0;
}
#endif
"""

# Theano's float32 case (GemmRelated.case_float_gemm) with ours first.  Its set-up before this
# point has checked the shapes, copied operands without a unit stride, and computed a, b, the
# element strides sx_*, sy_*, sz_* and `unit`, whose last hex digit is 0 for z stored by rows, 1 for
# z stored by columns (computed then as z' = y' x', all transposed).  `before` may set dense_w and
# dense_d, the momentum update's parameter and decay factor (see dense_gemm); `after` runs once done
# (not after a product of no terms, which every CPU computes here).
def ours_first(before='', after=''):
    return """
if (Nx[1] == 0) {           // no terms: z = b z (Theano's BLAS call refuses the strides of empty operands)
    float* z = (float*)PyArray_DATA(%(_zout)s);
    for (npy_intp i = 0; i < Nz[0]; i++)
        for (npy_intp j = 0; j < Nz[1]; j++)
            z[i * sz_0 + j * sz_1] = b == 0 ? 0 : b * z[i * sz_0 + j * sz_1];
    break;
}
#ifdef __AVX512F__
{
    const int by_rows = (unit & 0xF) == 0;
    const npy_intp M = by_rows ? Nz[0] : Nz[1], N = by_rows ? Nz[1] : Nz[0], K = Nx[1];
    if (dense_suits(M, N, K)) {
        float* x = (float*)PyArray_DATA(%(_x)s);
        float* y = (float*)PyArray_DATA(%(_y)s);
        float* z = (float*)PyArray_DATA(%(_zout)s);
        float* dense_w = NULL;
        float dense_d = 0;
        BEFORE
        const int failed = by_rows ? dense_gemm(M, N, K, a, x, sx_0, sx_1, y, sy_0, sy_1, b, z, sz_0, dense_w, dense_d)
                                   : dense_gemm(M, N, K, a, y, sy_1, sy_0, x, sx_1, sx_0, b, z, sz_1, dense_w, dense_d);
        if (failed) {
            PyErr_NoMemory();
            %(fail)s
        }
        AFTER
        break;                  // out of the switch on the dtype: done
    }
}
#endif
""".replace('BEFORE', before).replace('AFTER', after)


class _Dense:
    """What the ops add to Theano's: the kernel, OpenMP, and the float32 case."""
    case_float_gemm = ours_first() + blas.GemmRelated.case_float_gemm

    def c_support_code(self):
        return super().c_support_code() + DENSE_GEMM

    def c_compile_args(self):
        return super().c_compile_args() + ['-fopenmp']


class Dot22(KeyedBySource, _Dense, blas.Dot22):
    """Theano's Dot22 (z = x y), float32 through dense_gemm where it suits."""


class Gemm(KeyedBySource, _Dense, blas.Gemm):
    """Theano's Gemm (z = b z + a x y), float32 through dense_gemm where it suits."""


class MomentumUpdate(KeyedBySource, OpenMPOp):
    """(v, p, g, mu, c[, d]) -> (v', p'): v' = mu v + c g (+ d p), p' = p + v'; one step of SGD
    with momentum (use_momentum_update), each element read and written once, in v's and p's own
    buffers once in place (momentum_in_place).

    Theano's ops took the product into v, then a pass for the decay term and one for p + v',
    each over all of v and p: for the published network's 784 x 1000 layer 0.24-0.35 ms of a
    6.3-7.6 ms step, where MomentumGemm adds 0.06-0.19 ms to the product.
    """
    __props__ = ('decay', 'inplace')

    def __init__(self, decay, inplace=False, openmp=None):
        super().__init__(openmp=openmp)
        self.decay, self.inplace = bool(decay), bool(inplace)
        if self.inplace:
            self.destroy_map = {0: [0], 1: [1]}

    def make_node(self, v, p, g, mu, c, *d):
        v, p, g = (T.as_tensor_variable(a) for a in (v, p, g))
        scalars = [T.as_tensor_variable(a) for a in (mu, c) + d]
        if len(d) != self.decay:
            raise TypeError('MomentumUpdate(decay=%s) takes %d inputs' % (self.decay, 5 + self.decay))
        if not (v.type == p.type and v.ndim == g.ndim and g.dtype == v.dtype
                and all(a.ndim == 0 and a.dtype == v.dtype for a in scalars)):
            raise TypeError('MomentumUpdate: v, p, g of one shape and dtype, scalars of that dtype, not %s'
                            % [a.type for a in [v, p, g] + scalars])
        return theano.Apply(self, [v, p, g] + scalars, [v.type(), p.type()])

    def perform(self, node, inputs, outputs):
        v, p, g, mu, c = inputs[:5]
        if not self.inplace:
            v, p = v.copy(), p.copy()
        v *= mu
        v += c * g
        if self.decay:
            v += inputs[5] * p
        p += v
        outputs[0][0], outputs[1][0] = v, p

    def infer_shape(self, node, shapes):
        return shapes[:2]

    def c_code(self, node, name, inputs, outputs, sub):
        v, p, g, mu, c = inputs[:5]
        d = inputs[5] if self.decay else None
        v_out, p_out = outputs
        t = 'dtype_' + v
        fail = sub['fail']
        take = ''.join(c_alias(out, a) if self.inplace else """
        Py_XDECREF(%(out)s);
        %(out)s = (PyArrayObject*)PyArray_NewCopy(%(a)s, NPY_CORDER);
        if (!%(out)s) { Py_DECREF(gc); %(fail)s }""" % dict(out=out, a=a, fail=fail)
                       for out, a in ((v_out, v), (p_out, p)))
        step = 'const @t s = mu * @v + c * @g%s; @v = s; @p += s;' % (' + d * @p' if self.decay else '')
        flat = step.replace('@t', t).replace('@v', 'vs[i]').replace('@p', 'ps[i]').replace('@g', 'gs[i]')
        each = step.replace('@t', t)
        for a, it in (('@v', 'iv'), ('@p', 'ip'), ('@g', 'ig')):
            each = each.replace(a, '*(%s*)%s->dataptr' % (t, it))
        parallel = '#pragma omp parallel for schedule(static) if (n > 100000)' if self.openmp else ''
        decay = ('const %s d = *(%s*)PyArray_DATA(%s);' % (t, t, d)) if self.decay else ''
        return """{
        if (!PyArray_SAMESHAPE(%(v)s, %(p)s) || !PyArray_SAMESHAPE(%(v)s, %(g)s)) {
            PyErr_SetString(PyExc_ValueError, "momentum update: v, p and g must have one shape");
            %(fail)s
        }
        PyArrayObject* gc = PyArray_GETCONTIGUOUS(%(g)s);
        if (!gc) { %(fail)s }
        %(take)s
        const %(t)s mu = *(%(t)s*)PyArray_DATA(%(mu)s), c = *(%(t)s*)PyArray_DATA(%(c)s);
        %(decay)s
        const npy_intp n = PyArray_SIZE(%(v_out)s);
        if (PyArray_IS_C_CONTIGUOUS(%(v_out)s) && PyArray_IS_C_CONTIGUOUS(%(p_out)s)) {
            %(t)s* vs = (%(t)s*)PyArray_DATA(%(v_out)s);
            %(t)s* ps = (%(t)s*)PyArray_DATA(%(p_out)s);
            const %(t)s* gs = (const %(t)s*)PyArray_DATA(gc);
            %(parallel)s
            for (npy_intp i = 0; i < n; i++) {
                %(flat)s
            }
        } else {                                    // any strides: element by element, in C order
            PyArrayIterObject* iv = (PyArrayIterObject*)PyArray_IterNew((PyObject*)%(v_out)s);
            PyArrayIterObject* ip = (PyArrayIterObject*)PyArray_IterNew((PyObject*)%(p_out)s);
            PyArrayIterObject* ig = (PyArrayIterObject*)PyArray_IterNew((PyObject*)gc);
            if (!iv || !ip || !ig) {
                Py_XDECREF(iv); Py_XDECREF(ip); Py_XDECREF(ig); Py_DECREF(gc);
                %(fail)s
            }
            for (npy_intp i = 0; i < n; i++) {
                %(each)s
                PyArray_ITER_NEXT(iv); PyArray_ITER_NEXT(ip); PyArray_ITER_NEXT(ig);
            }
            Py_DECREF(iv); Py_DECREF(ip); Py_DECREF(ig);
        }
        Py_DECREF(gc);
        }""" % locals()


class MomentumGemm(Gemm):
    """(v, a, x, y, b, p[, d]) -> (v', p'): v' = b v + a x y (+ d p), p' = p + v', in place: the
    momentum update with the gradient's product (MomentumUpdate's c g with g = x y, c = a).  Where
    dense_gemm computes the product and p is stored as v, each tile's stores do the update; else
    Theano's BLAS call, then one pass over v and p."""
    __props__ = ('decay',)
    case_float_gemm = ours_first(
        before='''if (PyArray_CompareLists(PyArray_STRIDES(momentum_p), PyArray_STRIDES(%(_zout)s), 2)) {
            dense_w = (float*)PyArray_DATA(momentum_p);     // stored as v: into the tiles' stores
            dense_d = momentum_d;
        }''',
        after='momentum_done = dense_w != NULL;') + blas.GemmRelated.case_float_gemm

    def __init__(self, decay):
        super().__init__(inplace=True)
        self.decay = bool(decay)
        self.destroy_map = {0: [0], 1: [5]}

    def __str__(self):
        return 'MomentumGemm{%s}' % ('decay' if self.decay else 'no_decay')

    def make_node(self, v, a, x, y, b, p, *d):
        product = super().make_node(v, a, x, y, b)      # Gemm's checks
        v = product.inputs[0]
        p = T.as_tensor_variable(p)
        d = [T.as_tensor_variable(s) for s in d]
        if len(d) != self.decay or p.type != v.type or any(s.ndim or s.dtype != p.dtype for s in d):
            raise TypeError('MomentumGemm(decay=%s): p of v\'s type%s' % (self.decay, ', d a scalar' * self.decay))
        return theano.Apply(self, product.inputs + [p] + d, [v.type(), p.type()])

    def perform(self, node, inputs, outputs, params=None):
        v, a, x, y, b, p = inputs[:6]
        v *= b
        v += a * x.dot(y)
        if self.decay:
            v += inputs[6] * p
        p += v
        outputs[0][0], outputs[1][0] = v, p

    def infer_shape(self, node, shapes):
        return [shapes[0], shapes[5]]

    def c_code(self, node, name, inputs, outputs, sub):
        _z, _a, _x, _y, _b, _p = inputs[:6]
        _zout, _pout = outputs
        params = sub['params']
        gemm = self.build_gemm_call() % dict(sub, _z=_z, _a=_a, _x=_x, _y=_y, _b=_b, _zout=_zout, params=params)
        t = 'npy_' + node.inputs[0].dtype     # no dtype_ typedefs: Gemm's check_input is False
        d = ('*(%s*)PyArray_DATA(%s)' % (t, inputs[6])) if self.decay else '0'
        decay = '*vij += momentum_d * *pij;' if self.decay else ''
        fail = sub['fail']
        return """{
        if (PyArray_NDIM(%(_p)s) != 2 || !PyArray_SAMESHAPE(%(_p)s, %(_z)s)) {
            PyErr_SetString(PyExc_ValueError, "momentum update: p and v must have one shape");
            %(fail)s
        }
        PyArrayObject* momentum_p = %(_p)s;
        const %(t)s momentum_d = %(d)s;
        int momentum_done = 0;
        %(gemm)s
        if (!momentum_done) {
            const npy_intp rows = PyArray_DIMS(%(_zout)s)[0], columns = PyArray_DIMS(%(_zout)s)[1];
            const npy_intp* sv = PyArray_STRIDES(%(_zout)s);
            const npy_intp* sp = PyArray_STRIDES(%(_p)s);
            char* v0 = PyArray_BYTES(%(_zout)s);
            char* p0 = PyArray_BYTES(%(_p)s);
            #pragma omp parallel for schedule(static) if (rows * columns > 100000)
            for (npy_intp i = 0; i < rows; i++)
                for (npy_intp j = 0; j < columns; j++) {
                    %(t)s* vij = (%(t)s*)(v0 + i * sv[0] + j * sv[1]);
                    %(t)s* pij = (%(t)s*)(p0 + i * sp[0] + j * sp[1]);
                    %(decay)s
                    *pij += *vij;
                }
        }
        %(alias)s
        }""" % dict(locals(), alias=c_alias(_pout, _p))


class ChannelSum(KeyedBySource, theano.Op):
    """A float32 array (N, C) or (N, C, H, W) summed over every axis but 1: the bias gradients.

    Theano's Sum{axis=[0]} and Sum{axis=[0, 2, 3]} of float32 sum in float64 one element at a
    time, each addition waiting for the one before: 0.09 and 0.11 ms a step of the published
    network (3%).  Here the rows are added into a row of float64 sums (C x H x W of them, one
    vector addition for 8), then each channel's H x W sums are added up: float64 sums as
    Theano's, in another order (the same float32 results but for a rare rounding tie).
    """
    __props__ = ()

    def make_node(self, x):
        x = T.as_tensor_variable(x)
        if x.dtype != 'float32' or x.ndim not in (2, 4):
            raise TypeError('ChannelSum: a float32 array of 2 or 4 axes, not %s' % x.type)
        return theano.Apply(self, [x], [T.vector(dtype='float32')])

    def perform(self, node, inputs, outputs):
        x, = inputs
        outputs[0][0] = x.sum(axis=(0,) + tuple(range(2, x.ndim)), dtype='float64').astype('float32')

    def infer_shape(self, node, shapes):
        return [(shapes[0][1],)]

    def c_code(self, node, name, inputs, outputs, sub):
        x, = inputs
        out, = outputs
        fail = sub['fail']
        return """
        {
        PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
        if (!xc) { %(fail)s }
        const npy_intp* d = PyArray_DIMS(xc);
        const npy_intp N = d[0], C = d[1], row = PyArray_NDIM(xc) == 4 ? C * d[2] * d[3] : C, S = row / (C ? C : 1);
        if (!%(out)s || PyArray_DIMS(%(out)s)[0] != C) {
            Py_XDECREF(%(out)s);
            %(out)s = (PyArrayObject*)PyArray_EMPTY(1, &d[1], NPY_FLOAT32, 0);
        }
        double* sums = (double*)calloc(row + 1, sizeof(double));
        if (!%(out)s || !sums) {
            free(sums);
            Py_DECREF(xc);
            if (%(out)s) PyErr_NoMemory();
            %(fail)s
        }
        const npy_float32* from = (const npy_float32*)PyArray_DATA(xc);
        for (npy_intp n = 0; n < N; n++, from += row)
            for (npy_intp j = 0; j < row; j++)
                sums[j] += from[j];
        npy_float32* to = (npy_float32*)PyArray_DATA(%(out)s);
        for (npy_intp c = 0; c < C; c++) {
            double sum = 0;
            for (npy_intp i = 0; i < S; i++)
                sum += sums[c * S + i];
            to[c] = (npy_float32)sum;
        }
        free(sums);
        Py_DECREF(xc);
        }
        """ % locals()


@local_optimizer([T.Sum])
def use_channel_sum(node):
    if not isinstance(node.op, T.Sum):
        return False
    x, = node.inputs
    if (x.dtype == 'float32' and node.op.acc_dtype == 'float64' and node.outputs[0].dtype == 'float32'
            and x.ndim in (2, 4) and tuple(node.op.axis or ()) == (0,) + tuple(range(2, x.ndim))):
        return [ChannelSum()(x)]
    return False


@local_optimizer([blas.Dot22, blas.Gemm])
def use_dense_gemm(node):
    if node.outputs[0].dtype != 'float32':
        return False
    if type(node.op) is blas.Dot22:
        return [Dot22()(*node.inputs)]
    if type(node.op) is blas.Gemm:
        return [Gemm(node.op.inplace)(*node.inputs)]
    return False


@local_optimizer([MomentumUpdate])
def momentum_with_product(node):
    """MomentumUpdate whose gradient is our Dot22, used by nothing else: MomentumGemm, in place."""
    if not isinstance(node.op, MomentumUpdate) or node.op.inplace:
        return False
    v, p, g, mu, c = node.inputs[:5]
    if g.owner and isinstance(g.owner.op, Dot22) and len(g.clients) == 1:
        return MomentumGemm(node.op.decay)(v, c, *g.owner.inputs, mu, p, *node.inputs[5:])
    return False


@local_optimizer([MomentumUpdate])
def momentum_in_place(node):
    """Any other MomentumUpdate: in v's and p's own buffers."""
    if isinstance(node.op, MomentumUpdate) and not node.op.inplace:
        return MomentumUpdate(node.op.decay, inplace=True, openmp=node.op.openmp)(*node.inputs)
    return False


def scaled(var):
    """(s, x) if var is s * x, a 0-d s broadcast to x, else None."""
    mul = var.owner
    if not (mul and isinstance(mul.op, T.Elemwise) and isinstance(mul.op.scalar_op, theano.scalar.Mul)
            and len(mul.inputs) == 2):
        return None
    for shuffled, x in (mul.inputs, mul.inputs[::-1]):
        if (shuffled.owner and isinstance(shuffled.owner.op, T.DimShuffle) and shuffled.owner.inputs[0].ndim == 0
                and x.type == var.type):
            return shuffled.owner.inputs[0], x
    return None


def difference(var):
    """(a, b) if var is a - b, else None."""
    sub = var.owner
    if sub and isinstance(sub.op, T.Elemwise) and isinstance(sub.op.scalar_op, theano.scalar.Sub):
        return tuple(sub.inputs)
    return None


def momentum_step(v_new, p):
    """(v, g, mu, c, d) if v_new is mu v - k p - eta g (d = -k, or -eta lam where k is eta lam)
    or mu v - eta g (d None), with c = -eta: all of p's type but the 0-d scalars of its dtype;
    else None."""
    kept, step = difference(v_new) or (None, None)
    eta, g = scaled(step) if step is not None else (None, None)
    if eta is None:
        return None
    c, d = -eta, None
    if difference(kept):
        kept, decay = difference(kept)
        k, decayed = scaled(decay) or (None, None)
        if k is None or decayed is not p:
            return None
        product = k.owner
        if (product and isinstance(product.op, T.Elemwise) and isinstance(product.op.scalar_op, theano.scalar.Mul)
                and len(product.inputs) == 2 and product.inputs[0] is eta):
            d = c * product.inputs[1]
        else:
            d = -k
    mu, v = scaled(kept) or (None, None)
    if mu is None or not (v.type == p.type == g.type == v_new.type
                          and all(s.dtype == p.dtype for s in (mu, c, d) if s is not None)):
        return None
    return v, g, mu, c, d


@register_as_built
@local_optimizer([T.add])
def use_momentum_update(node):
    """The momentum update as nnet.Trainer writes it, v' = mu v - eta lam p - eta g and p' = p + v'
    (or without the decay term), to MomentumUpdate(v, p, g, mu, -eta, -eta lam): both in one op.
    Its sums run in another order (mu v + (-eta) g + (-eta lam) p): the same up to float rounding."""
    if not (rewrites.cpu_graph() and isinstance(node.op, T.Elemwise) and isinstance(node.op.scalar_op, theano.scalar.Add)
            and len(node.inputs) == 2):
        return False
    for p, v_new in (node.inputs, node.inputs[::-1]):
        step = momentum_step(v_new, p)
        if step and p.dtype in ('float32', 'float64'):
            v, g, mu, c, d = step
            v_out, p_out = MomentumUpdate(d is not None)(v, p, g, mu, c, *([d] if d is not None else []))
            return {v_new: v_out, node.outputs[0]: p_out}
    return False


register('cpublas_channel_sum', in2out(use_channel_sum, name='cpublas_channel_sum'), 70.6)
if theano.config.blas.ldflags and theano.config.openmp:
    # after Theano's BLAS optimizations, Gemm's in-place one (70) included
    register('cpublas_dense_gemm', in2out(use_dense_gemm, name='cpublas_dense_gemm'), 70.5)
# after the products are ours (70.5), in place as Theano's in-place optimizations (after 49.5, its
# destroy handler): fused with the product where it can be, else alone; where another op still
# reads v or p, the destroy handler refuses the replacement and the op stays out of place
for position, optimizer in ((70.7, momentum_with_product), (70.71, momentum_in_place)):
    register('cpublas_' + optimizer.__name__, TopoOptimizer(optimizer, failure_callback=TopoOptimizer.warn_inplace),
             position, 'inplace')
