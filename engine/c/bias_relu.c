/* BiasReLU (engine/cpuops.py): a layer's threshold and ReLU, max(x + b, 0), in one pass.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
#section bias_relu
{
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
        }
