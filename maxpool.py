"""2-d max-pooling for the CPU: Theano's Pool and MaxPoolGrad for one case, in loops a compiler vectorizes.

Theano's own ops serve any number of dimensions, padding and modes through per-element
index arithmetic, and the gradient first zeroes its whole output in one thread.  On the
published network they took 22% of a training step (the gradient alone 17%), on the
64-filter network with overlapping windows 27%.  These two do what Theano's do for 4-d
inputs, no padding, borders left out, in plain loops over one (image, channel) plane per
OpenMP thread, and give the same values bit for bit: the maximum starts from a window's
first element and takes a later one only if larger (so a NaN is kept only if it comes
first), and the gradient goes to every element equal to its window's maximum, summed over
the windows that hold it in the same order as Theano's.  No GPU code: on the GPU,
convnet.py keeps Theano's GpuPool and GpuMaxPoolGrad.
"""
import theano
import theano.tensor as T
from theano.gof import OpenMPOp


def max_pool(x, ws, stride):
    """Max over ws windows of a 4-d tensor's last two axes, every `stride`; borders left out."""
    return MaxPool(ws, stride)(x)


def _c_array(var, dims, like, fail):
    """C that (re)allocates output `var` unless it already is a C-contiguous array of those dims and like's type."""
    return """
    if (!%(var)s || PyArray_NDIM(%(var)s) != 4 || !PyArray_IS_C_CONTIGUOUS(%(var)s)
        || PyArray_TYPE(%(var)s) != PyArray_TYPE(%(like)s)
        || !PyArray_CompareLists(PyArray_DIMS(%(var)s), %(dims)s, 4)) {
        Py_XDECREF(%(var)s);
        %(var)s = (PyArrayObject*)PyArray_EMPTY(4, %(dims)s, PyArray_TYPE(%(like)s), 0);
        if (!%(var)s) { %(fail)s }
    }
    """ % locals()


class _Pooling(OpenMPOp):
    """What both ops share: window and stride as compile-time constants, one plane per thread."""
    __props__ = ('ws', 'stride')

    def __init__(self, ws, stride, openmp=None):
        super().__init__(openmp=openmp)
        self.ws, self.stride = tuple(int(n) for n in ws), tuple(int(n) for n in stride)
        if len(self.ws) != 2 or len(self.stride) != 2 or min(self.ws + self.stride) < 1:
            raise ValueError('max_pool: window and stride must be two positive sizes each, not %s and %s'
                             % (ws, stride))

    def c_code_cache_version(self):
        return (1, self.openmp)

    def constants(self, sub):
        """The C code's substitutions: window, stride, the OpenMP pragma, the failure code."""
        (wh, ww), (sh, sw) = self.ws, self.stride
        parallel = '#pragma omp parallel for schedule(static)' if self.openmp else ''
        return dict(wh=wh, ww=ww, sh=sh, sw=sw, parallel=parallel, fail=sub['fail'])


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

    def grad(self, inputs, output_grads):
        x, = inputs
        return [MaxPoolGrad(self.ws, self.stride)(x, self(x), output_grads[0])]

    def c_code(self, node, name, inputs, outputs, sub):
        x, = inputs
        z, = outputs
        c = dict(self.constants(sub), x=x, z=z)
        c['alloc'] = _c_array(z, 'zdims', 'xc', 'Py_DECREF(xc); ' + c['fail'])
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
        %(parallel)s
        for (npy_intp p = 0; p < planes; p++) {
            const dtype_%(x)s* xp = x0 + p * H * W;
            dtype_%(z)s* zp = z0 + p * oh * ow;
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


class MaxPoolGrad(_Pooling):
    """(x, z = max_pool(x), gz) -> gx: gz added to every element of a window equal to its maximum."""

    def make_node(self, x, z, gz):
        x, z, gz = (T.as_tensor_variable(v) for v in (x, z, gz))
        if not x.ndim == z.ndim == gz.ndim == 4:
            raise TypeError('max_pool gradient: x, z and gz must be 4-d')
        return theano.Apply(self, [x, z, gz], [x.type()])

    def infer_shape(self, node, shapes):
        return [shapes[0]]

    def c_code(self, node, name, inputs, outputs, sub):
        x, z, gz = inputs
        gx, = outputs
        c = dict(self.constants(sub), x=x, z=z, gz=gz, gx=gx)
        c['release'] = 'Py_XDECREF(xc); Py_XDECREF(zc); Py_XDECREF(gzc);'
        c['alloc'] = _c_array(gx, 'PyArray_DIMS(xc)', 'xc', c['release'] + c['fail'])
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
        %(parallel)s
        for (npy_intp p = 0; p < planes; p++) {
            const dtype_%(x)s* xp = x0 + p * H * W;
            dtype_%(gx)s* gp = gx0 + p * H * W;
            memset(gp, 0, H * W * sizeof(dtype_%(gx)s));
            // windows in Theano's order, so an element in several windows sums their gradients alike
            for (npy_intp i = 0; i < oh; i++)
                for (int a = 0; a < %(wh)d; a++) {
                    const dtype_%(x)s* xr = xp + (i * %(sh)d + a) * W;
                    dtype_%(gx)s* gr = gp + (i * %(sh)d + a) * W;
                    const dtype_%(z)s* zr = z0 + (p * oh + i) * ow;
                    const dtype_%(gz)s* gzr = gz0 + (p * oh + i) * ow;
                    for (npy_intp j = 0; j < ow; j++)
                        for (int b = 0; b < %(ww)d; b++)
                            gr[j * %(sw)d + b] += xr[j * %(sw)d + b] == zr[j] ? gzr[j] : 0;
                }
        }
        %(release)s
        }""" % c
