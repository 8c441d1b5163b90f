/* Pieces the ops share (engine/cpuops.py): an output allocated or aliased, a pair of vector masks.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
#section vector_pair_masks
const __mmask16 %(first)s = %(count)s >= 16 ? 0xFFFF : (__mmask16)((1u << %(count)s) - 1);
        const __mmask16 %(second)s = %(count)s >= 32 ? 0xFFFF : %(count)s > 16 ? (__mmask16)((1u << (%(count)s - 16)) - 1) : 0;
#section alloc_output

    if (!%(var)s || PyArray_NDIM(%(var)s) != %(ndim)s || !PyArray_IS_C_CONTIGUOUS(%(var)s)
        || PyArray_TYPE(%(var)s) != PyArray_TYPE(%(like)s)
        || !PyArray_CompareLists(PyArray_DIMS(%(var)s), %(dims)s, %(ndim)s)) {
        Py_XDECREF(%(var)s);
        %(var)s = (PyArrayObject*)PyArray_EMPTY(%(ndim)s, %(dims)s, PyArray_TYPE(%(like)s), 0);
        if (!%(var)s) { %(fail)s }
    }
    
#section alias_output

    if (%(var)s != %(source)s) {
        Py_XDECREF(%(var)s);
        %(var)s = %(source)s;
        Py_INCREF(%(var)s);
    }
