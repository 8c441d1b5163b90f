/* PooledFilterGrad (engine/cpuops.py): the filters' gradient through disjoint max-pooling, from the
   windows' maxima.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
/// With AVX-512 (float32): 16 columns at a time, their equalities a mask, the places and gz of the
/// equal ones packed to the front of a vector and stored whole (the rest overwritten next):
/// no branch per maximum.  The op alone (100 images): 0.66 of the time of the bits with 16
/// filters, 0.79 with 64, the same values.
#section find_equal_16

                            #ifdef __AVX512F__
                            for (npy_intp w = 0; w < across; w += 16) {
                                const __mmask16 lanes = across - w >= 16 ? 0xFFFF : (__mmask16)((1u << (across - w)) - 1);
                                const __mmask16 equal = _mm512_mask_cmp_ps_mask(
                                    lanes, _mm512_maskz_loadu_ps(lanes, cy + w), _mm512_maskz_loadu_ps(lanes, maxima + w), _CMP_EQ_OQ);
                                const __m512i columns = _mm512_add_epi32(_mm512_set1_epi32((int)(y * W + w)),
                                    _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
                                _mm512_storeu_si512(place + found, _mm512_maskz_compress_epi32(equal, columns));
                                _mm512_storeu_ps(weight + found, _mm512_maskz_compress_ps(equal, _mm512_maskz_loadu_ps(lanes, grads + w)));
                                found += __builtin_popcount(equal);
                            }
                            #else
                            %(find_equal)s
                            #endif
/// PooledFilterGrad: the columns w < across of row cy equal to their window's maximum (maxima[w]),
/// appended in order to place (y * W + w) and weight (their gz, grads[w]).  8 at a time, as bits of
/// a word for each 64 columns, then one by one.
#section find_equal

                            for (npy_intp chunk = 0; chunk < across; chunk += 64) {
                                npy_uint64 bits = 0;
                                for (npy_intp w = chunk; w < across && w < chunk + 64; w += 8) {
                                    npy_uint64 bytes = 0;       // element v: byte v (little-endian), 0 or 1
                                    if (cy + w + 8 <= cend) {
                                        eight row, tops;
                                        memcpy(&row, cy + w, sizeof row);
                                        memcpy(&tops, maxima + w, sizeof tops);
                                        const eight_chars same = __builtin_convertvector(row == tops, eight_chars);
                                        memcpy(&bytes, &same, sizeof bytes);
                                        bytes &= 0x0101010101010101ULL;
                                    } else {
                                        for (int v = 0; v < 8 && w + v < across; v++)
                                            bytes |= (npy_uint64)(cy[w + v] == maxima[w + v]) << 8 * v;
                                    }
                                    bits |= (bytes * 0x0102040810204080ULL >> 56) << (w - chunk);   // byte v -> bit v
                                }
                                for (; bits; bits &= bits - 1) {
                                    const npy_intp x = chunk + __builtin_ctzll(bits);
                                    place[found] = (npy_int32)(y * W + x);
                                    weight[found++] = grads[x];
                                }
                            }
#section pooled_filter_grad
{
        PyArrayObject* xc = PyArray_GETCONTIGUOUS(%(x)s);
        PyArrayObject* cc = PyArray_GETCONTIGUOUS(%(c)s);
        PyArrayObject* zc = PyArray_GETCONTIGUOUS(%(z)s);
        PyArrayObject* gzc = PyArray_GETCONTIGUOUS(%(gz)s);
        if (!xc || !cc || !zc || !gzc) { %(release)s %(fail)s }
        const npy_intp* dx = PyArray_DIMS(xc);
        const npy_intp* dc = PyArray_DIMS(cc);
        const npy_intp N = dx[0], C = dx[1], H = dx[2], W = dx[3], F = dc[1], Hc = dc[2], Wc = dc[3];
        const npy_intp oh = PyArray_DIMS(zc)[2], ow = PyArray_DIMS(zc)[3];
        if (dc[0] != N || Hc > H || Wc > W || !PyArray_SAMESHAPE(zc, gzc)
            || !PyArray_CompareLists(PyArray_DIMS(zc), dc, 2)
            || oh != (Hc < %(wh)d ? 0 : (Hc - %(wh)d) / %(sh)d + 1) || ow != (Wc < %(ww)d ? 0 : (Wc - %(ww)d) / %(sw)d + 1)) {
            PyErr_SetString(PyExc_ValueError, "pooled filter gradient: the shapes of x, c, z and gz disagree");
            %(release)s
            %(fail)s
        }
        const npy_intp kh = H - Hc + 1, kw = W - Wc + 1, rows = C * kh;
        npy_intp wdims[4] = {F, C, kh, kw};
        %(alloc)s
        // each thread sums into its own F x rows x span block (a patch row padded to 8, so that
        // one vector takes it: the 8 - kw extra columns collect pixels to the right, unused),
        // then the blocks are added in thread order
        const npy_intp span = kw > 8 ? kw : 8, most = oh * ow * %(wh)d * %(ww)d;   // maxima a map at most
        const npy_intp across = (ow - 1) * %(sw)d + %(ww)d;        // columns of c under windows
        const int threads = %(threads)s;
        typedef %(t)s eight __attribute__((vector_size(8 * sizeof(%(t)s))));
        typedef char eight_chars __attribute__((vector_size(8)));
        %(t)s* sums = (%(t)s*)calloc((size_t)threads * F * rows * span, sizeof(%(t)s));
        npy_intp* offsets = (npy_intp*)malloc(rows * sizeof(npy_intp));   // patch row -> offset in x
        // a thread's maxima of a map (where in the image, their gz), then a row of windows' maxima
        // and gz spread over their columns; 16 more of each, written past the end by vector stores
        const npy_intp own = most + 16 + 2 * (across + 16);
        npy_int32* places = (npy_int32*)malloc((size_t)threads * (most + 16) * sizeof(npy_int32));
        %(t)s* weights = (%(t)s*)malloc((size_t)threads * own * sizeof(%(t)s));
        if (!sums || !offsets || !places || !weights) {
            free(sums); free(offsets); free(places); free(weights);
            PyErr_NoMemory();
            %(release)s
            %(fail)s
        }
        for (npy_intp q = 0; q < rows; q++)
            offsets[q] = ((q / kh) * H + q %% kh) * W;
        const %(t)s* x0 = (const %(t)s*)PyArray_DATA(xc);
        const %(t)s* c0 = (const %(t)s*)PyArray_DATA(cc);
        const %(t)s* cend = c0 + N * F * Hc * Wc;
        const %(t)s* z0 = (const %(t)s*)PyArray_DATA(zc);
        const %(t)s* gz0 = (const %(t)s*)PyArray_DATA(gzc);
        %(region)s
        {
            const int me = %(thread)s;
            %(t)s* mine = sums + (npy_intp)me * F * rows * span;
            npy_int32* place = places + (npy_intp)me * (most + 16);
            %(t)s* weight = weights + (npy_intp)me * own;
            %(t)s* maxima = weight + most + 16;
            %(t)s* grads = maxima + across + 16;
            for (npy_intp w = across; w < across + 16; w++)
                maxima[w] = NAN;        // equal to nothing
            %(images)s
            for (npy_intp n = 0; n < N; n++) {
                const %(t)s* image = x0 + n * C * H * W;
                // 8-wide reads of a patch row stay inside x up to this place of a maximum
                const npy_intp inside = (N - n) * C * H * W - offsets[rows - 1] - 8;
                for (npy_intp f = 0; f < F; f++) {
                    const %(t)s* cp = c0 + (n * F + f) * Hc * Wc;
                    const %(t)s* zp = z0 + (n * F + f) * oh * ow;
                    const %(t)s* gzp = gz0 + (n * F + f) * oh * ow;
                    npy_intp found = 0;
                    for (npy_intp i = 0; i < oh; i++) {
                        // each column's window maximum (NaN in the gaps between windows: equal to
                        // nothing) and gz
                        for (npy_intp j = 0; j < ow; j++)
                            for (int b = 0; b < %(sw)d && j * %(sw)d + b < across; b++) {
                                maxima[j * %(sw)d + b] = b < %(ww)d ? zp[i * ow + j] : NAN;
                                grads[j * %(sw)d + b] = gzp[i * ow + j];
                            }
                        for (int a = 0; a < %(wh)d; a++) {
                            const npy_intp y = i * %(sh)d + a;
                            const %(t)s* cy = cp + y * Wc;
                            // the elements equal to their window's maximum (a few a row), recorded in order
                            %(find)s
                        }
                    }
                    const npy_intp furthest = found ? place[found - 1] : 0;
                    // gz times the patch under each maximum, two patch rows at a time over all the
                    // maxima: their sums stay in registers (two each, to overlap the additions)
                    %(t)s* __restrict__ acc = mine + f * rows * span;
                    if (kw <= 8 && furthest <= inside) {
                        for (npy_intp q = 0; q < rows; q += 2) {
                            const npy_intp next = q + 1 < rows ? q + 1 : q;   // an odd last row twice, summed once
                            const %(t)s* top = image + offsets[q];
                            const %(t)s* bottom = image + offsets[next];
                            eight top0 = {0}, top1 = {0}, bottom0 = {0}, bottom1 = {0}, pixels;   // gcc's vector extension
                            npy_intp k = 0;
                            for (; k + 1 < found; k += 2) {
                                memcpy(&pixels, top + place[k], sizeof pixels);
                                top0 += weight[k] * pixels;
                                memcpy(&pixels, bottom + place[k], sizeof pixels);
                                bottom0 += weight[k] * pixels;
                                memcpy(&pixels, top + place[k + 1], sizeof pixels);
                                top1 += weight[k + 1] * pixels;
                                memcpy(&pixels, bottom + place[k + 1], sizeof pixels);
                                bottom1 += weight[k + 1] * pixels;
                            }
                            if (k < found) {
                                memcpy(&pixels, top + place[k], sizeof pixels);
                                top0 += weight[k] * pixels;
                                memcpy(&pixels, bottom + place[k], sizeof pixels);
                                bottom0 += weight[k] * pixels;
                            }
                            eight sum;
                            memcpy(&sum, acc + q * span, sizeof sum);
                            sum += top0 + top1;
                            memcpy(acc + q * span, &sum, sizeof sum);
                            if (next != q) {
                                memcpy(&sum, acc + next * span, sizeof sum);
                                sum += bottom0 + bottom1;
                                memcpy(acc + next * span, &sum, sizeof sum);
                            }
                        }
                    } else {
                        for (npy_intp k = 0; k < found; k++)
                            for (npy_intp q = 0; q < rows; q++)
                                for (npy_intp s = 0; s < kw; s++)
                                    acc[q * span + s] += weight[k] * image[place[k] + offsets[q] + s];
                    }
                }
            }
        }
        %(t)s* out = (%(t)s*)PyArray_DATA(%(dw)s);
        for (npy_intp f = 0; f < F; f++)
            for (npy_intp q = 0; q < rows; q++)
                for (npy_intp s = 0; s < kw; s++) {
                    %(t)s total = 0;
                    for (int t = 0; t < threads; t++)
                        total += sums[(((npy_intp)t * F + f) * rows + q) * span + s];
                    out[(f * rows + q) * kw + s] = total;
                }
        free(sums); free(offsets); free(places); free(weights);
        %(release)s
        }
