/* MaxPoolGrad (engine/cpuops.py): gz to every element equal to its window's maximum, in Theano's
   order; the loops over a plane for disjoint and for overlapping windows.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
/// The gradient's loop over one plane (xp, zp, gzp -> gp).  Where gz goes is decided by a mask,
/// g & -(x == m), not a branch (gcc made `x == m ? g : 0` two branches an element).
/// Disjoint windows (stride >= window): every element is in at most one window, so each row
/// of gx is written once, whole: the row of windows' maxima and gradients spread over their
/// columns (gradient 0 on columns in no window), then one masked pass, which vectorises.
#section disjoint_windows

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
            }
/// Overlapping windows: in Theano's order, so an element in several windows sums their
/// gradients alike.  With AVX-512 (float32) and maps at most 32 columns wide, a row of gx is two
/// vectors; a map's rows are summed on the thread's stack and stored once, when complete.  The window columns b
/// are taken sw at a time, from the last: those cover different columns (c - b differ by less
/// than sw), so one permutation spreads their windows' maxima and gradients over the row
/// (OVERLAPPING_LANES_SETUP says which window j each column c is in), one comparison finds
/// the row's maxima and one masked addition adds their gz, as Theano's `if (x == m) gx += gz`.
/// Per element the windows come in Theano's order (row of windows i, then column j), because
/// b runs down, so for column c, j = (c - b) / sw runs up.  The op alone (100 images, 64 maps
/// of 28 x 28, 4x4 windows at stride 2), alternating in one process with the plain loop below:
/// 0.22-0.24 of its time (1.40 against 6.27 ms); a window column at a time it was 0.31.
#section overlapping_lanes_setup

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
        #endif
#section overlapping_lanes

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
            #endif
#section overlapping_windows

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
                }
#section max_pool_grad
{
        PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
        PyArrayObject* zc = PyArray_GETCONTIGUOUS(%(z)s);
        PyArrayObject* gzc = PyArray_GETCONTIGUOUS(%(gz)s);
        if (!xc || !zc || !gzc) { %(release)s %(fail)s }
        const npy_intp H = PyArray_DIMS(xc)[2], W = PyArray_DIMS(xc)[3];
        const npy_intp oh = PyArray_DIMS(zc)[2], ow = PyArray_DIMS(zc)[3];
        if (!PyArray_SAMESHAPE(zc, gzc) || !PyArray_CompareLists(PyArray_DIMS(zc), PyArray_DIMS(xc), 2)
            || oh != (H < %(wh)d ? 0 : (H - %(wh)d) / %(sh)d + 1) || ow != (W < %(ww)d ? 0 : (W - %(ww)d) / %(sw)d + 1)) {
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
        }
