/* MaxPool (engine/cpuops.py): each window's maximum, a plane per OpenMP thread; with AVX-512 a
   window per vector lane.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
/// MaxPool with AVX-512 (float32), where a row of windows lies within 32 columns (ow <= 16): a
/// window per vector lane, its maximum taken over the window's elements in the same order as the
/// plain loop (the element of lane j, row[j * sw + b], picked out of the row's two vectors by a
/// permutation), with the same comparison (x > m: ordered, so NaN and -0 come out alike).  The
/// plain loop took 0.14 ms of a 5.1 ms training step and 0.9 ms an evaluation call of 500 images.
#section max_pool_lanes_setup

        #ifdef __AVX512F__
        const int lanes16 = ow <= 16 && (ow - 1) * %(sw)d + %(ww)d <= 32;
        %(row_masks)s
        const __mmask16 stored = (__mmask16)((1u << (ow < 16 ? ow : 16)) - 1);
        __m512i columns[%(ww)d];                    // lane j: column j * sw + b
        for (int b = 0; b < %(ww)d; b++)
            columns[b] = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                             _mm512_set1_epi32(%(sw)d)), _mm512_set1_epi32(b));
        #endif
#section max_pool_lanes

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
            #endif
#section max_pool
{
        PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
        if (!xc) { %(fail)s }
        const npy_intp* d = PyArray_DIMS(xc);
        const npy_intp H = d[2], W = d[3];
        // windows larger than the maps: none, an empty output (as Theano's Pool)
        const npy_intp oh = H < %(wh)d ? 0 : (H - %(wh)d) / %(sh)d + 1, ow = W < %(ww)d ? 0 : (W - %(ww)d) / %(sw)d + 1;
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
        }
