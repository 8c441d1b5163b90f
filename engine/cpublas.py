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
from .csource import KeyedBySource, c_sections
from .rewrites import elemwise, register, register_as_built

C = c_sections('dense_gemm.c', 'momentum.c', 'channel_sum.c')


# Theano's float32 case (GemmRelated.case_float_gemm) with ours first.  Its set-up before this
# point has checked the shapes, copied operands without a unit stride, and computed a, b, the
# element strides sx_*, sy_*, sz_* and `unit`, whose last hex digit is 0 for z stored by rows, 1 for
# z stored by columns (computed then as z' = y' x', all transposed).  `before` may set dense_w and
# dense_d, the momentum update's parameter and decay factor (see dense_gemm); `after` runs once done
# (not after a product of no terms, which every CPU computes here).
def ours_first(before='', after=''):
    return C['ours_first'].replace('BEFORE', before).replace('AFTER', after)


class _Dense:
    """What the ops add to Theano's: the kernel, OpenMP, and the float32 case."""

    @property
    def case_float_gemm(self):                  # read when the C is made, as the rest of the C
        return ours_first() + blas.GemmRelated.case_float_gemm

    def c_support_code(self):
        return super().c_support_code() + C['dense_gemm']

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
        take = ''.join(c_alias(out, a) if self.inplace else C['momentum_copy'] % dict(out=out, a=a, fail=fail)
                       for out, a in ((v_out, v), (p_out, p)))
        step = C['momentum_step'] % (' + d * @p' if self.decay else '')
        flat = step.replace('@t', t).replace('@v', 'vs[i]').replace('@p', 'ps[i]').replace('@g', 'gs[i]')
        each = step.replace('@t', t)
        for a, it in (('@v', 'iv'), ('@p', 'ip'), ('@g', 'ig')):
            each = each.replace(a, '*(%s*)%s->dataptr' % (t, it))
        parallel = '#pragma omp parallel for schedule(static) if (n > 100000)' if self.openmp else ''
        decay = ('const %s d = *(%s*)PyArray_DATA(%s);' % (t, t, d)) if self.decay else ''
        return C['momentum_update'] % locals()


class MomentumGemm(Gemm):
    """(v, a, x, y, b, p[, d]) -> (v', p'): v' = b v + a x y (+ d p), p' = p + v', in place: the
    momentum update with the gradient's product (MomentumUpdate's c g with g = x y, c = a).  Where
    dense_gemm computes the product and p is stored as v, each tile's stores do the update; else
    Theano's BLAS call, then one pass over v and p."""
    __props__ = ('decay',)

    @property
    def case_float_gemm(self):
        return (ours_first(before=C['momentum_gemm_before'], after='momentum_done = dense_w != NULL;')
                + blas.GemmRelated.case_float_gemm)

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
        return C['momentum_gemm'] % dict(locals(), alias=c_alias(_pout, _p))


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
        return C['channel_sum'] % locals()


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
    mul = elemwise(var, theano.scalar.Mul)
    if not (mul and len(mul.inputs) == 2):
        return None
    for shuffled, x in (mul.inputs, mul.inputs[::-1]):
        if (shuffled.owner and isinstance(shuffled.owner.op, T.DimShuffle) and shuffled.owner.inputs[0].ndim == 0
                and x.type == var.type):
            return shuffled.owner.inputs[0], x
    return None


def difference(var):
    """(a, b) if var is a - b, else None."""
    sub = elemwise(var, theano.scalar.Sub)
    return tuple(sub.inputs) if sub else None


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
        product = elemwise(k, theano.scalar.Mul)
        if product and len(product.inputs) == 2 and product.inputs[0] is eta:
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
    if not (elemwise(node.outputs[0], theano.scalar.Add) and len(node.inputs) == 2):
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
