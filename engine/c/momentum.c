/* MomentumUpdate and MomentumGemm (engine/cpublas.py): one step of SGD with momentum in one pass.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
#section momentum_step
const @t s = mu * @v + c * @g%s; @v = s; @p += s;
#section momentum_update
{
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
        }
#section momentum_gemm
{
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
        }
#section momentum_copy

        Py_XDECREF(%(out)s);
        %(out)s = (PyArrayObject*)PyArray_NewCopy(%(a)s, NPY_CORDER);
        if (!%(out)s) { Py_DECREF(gc); %(fail)s }
#section momentum_gemm_before
if (PyArray_CompareLists(PyArray_STRIDES(momentum_p), PyArray_STRIDES(%(_zout)s), 2)) {
            dense_w = (float*)PyArray_DATA(momentum_p);     // stored as v: into the tiles' stores
            dense_d = momentum_d;
        }
