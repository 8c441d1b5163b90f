/* ChannelSum (engine/cpublas.py): the bias gradients, float32 summed over every axis but 1 in float64.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
#section channel_sum

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
        
