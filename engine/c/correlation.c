/* CorrMM and CorrMM_gradWeights (engine/cpuops.py): the faster patch copy put in Theano's corr_gemm.c,
   the direct correlation, and CorrMM's code that chooses it.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
/// Theano's im2col renamed, and this one in front of it: whole rows of the image when the
/// patches are unpadded, unstrided and undilated (each row of the patch matrix is then
/// height_col runs of width_col consecutive pixels); Theano's code for every other case.
#section fast_im2col

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

/// The forward correlation without a patch matrix, for maps of at most 32 columns: each output
/// row of a block of 8 filters summed in 16 vector registers (2 vectors of 16 columns a filter),
/// reading the image rows in place.  Per-image patch matrices cost a third of CorrMM's time.
/// Built only for CPUs with AVX-512 (32 vector registers): with AVX2's 16, the sums that fit
/// made it slower than Theano's im2col and OpenBLAS's Haswell kernels (1.09 / 1.28 of the time
/// with 16 / 64 filters), so there CorrMM stays Theano's.
#section direct_correlation

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

/// A row's last columns: element by element they took 15% of the correlation's time (28 columns).
#section store_part_float32
_mm512_mask_storeu_ps(to, (__mmask16)((1u << n) - 1), (__m512)v);
#section store_part_float64
for (npy_intp i = 0; i < n; i++) to[i] = v[i];
#section corr_mm

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
        }
