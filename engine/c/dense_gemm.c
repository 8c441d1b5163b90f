/* Dot22, Gemm and MomentumGemm (engine/cpublas.py): the dense products' kernel with AVX-512, and the
   float32 case put in front of Theano's call to the BLAS.

   Read by engine/csource.py's c_sections: each `#section NAME` is one piece of C, %(name)s
   what the op fills in per node, %% a %; `///` lines document it and are not compiled. */
#section dense_gemm

#ifdef __AVX512F__
#define DENSE_ROWS 8            // a tile: 8 rows x 32 columns, 16 sums in vector registers
#define DENSE_COLUMNS 32
#define DENSE_KC 1024           // the first operand's columns taken at a time
#define DENSE_CACHED (512 * 1024 / 4)   // floats that stay in a core's cache (half of 1 MiB of L2)
typedef float dense_vector __attribute__((vector_size(64)));
typedef float dense_unaligned __attribute__((vector_size(64), aligned(4)));
typedef int dense_indices __attribute__((vector_size(64)));

static inline npy_intp dense_min(npy_intp a, npy_intp b) {
    return a < b ? a : b;
}

// Whether B packed whole (K x N rounded up to panels) fits the cache: then by row blocks.
static int dense_by_rows(npy_intp N, npy_intp K) {
    return K <= DENSE_KC && K * ((N + DENSE_COLUMNS - 1) / DENSE_COLUMNS) * DENSE_COLUMNS <= DENSE_CACHED;
}

// Whether dense_gemm is the faster: wide enough for panels, and by row blocks (A read once) or
// A's block of up to KC columns within the cache (read again for each panel).
static int dense_suits(npy_intp M, npy_intp N, npy_intp K) {
    return N >= DENSE_COLUMNS && (dense_by_rows(N, K) || M * dense_min(K, DENSE_KC) <= DENSE_CACHED);
}

// 16 rows of 16 floats (row r at from + r * step) to 16 columns (column r at to + r, rows
// to_step apart): four rounds of interleaving the first 8 rows with the last 8.
static inline void dense_transpose16(const float* from, npy_intp step, float* to, npy_intp to_step) {
    const dense_indices low = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const dense_indices high = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    dense_vector r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = *(const dense_unaligned*)(from + i * step);
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            t[2 * i] = __builtin_shuffle(r[i], r[i + 8], low);
            t[2 * i + 1] = __builtin_shuffle(r[i], r[i + 8], high);
        }
        for (int i = 0; i < 16; i++)
            r[i] = t[i];
    }
    for (int i = 0; i < 16; i++)
        *(dense_unaligned*)(to + i * to_step) = r[i];
}

// panel[k][0:32] = B[k][0:n], zeros after n, for k < kc; B[k][j] at b[k * rsb + j * csb].
// (The columns past n are summed and dropped; zeros keep stale memory, denormals perhaps, out.)
static void dense_pack(npy_intp kc, npy_intp n, const float* b, npy_intp rsb, npy_intp csb, float* panel) {
    if (csb == 1 && n == DENSE_COLUMNS) {           // rows of 32 contiguous: two vector copies each
        for (npy_intp k = 0; k < kc; k++) {
            *(dense_vector*)(panel + k * DENSE_COLUMNS) = *(const dense_unaligned*)(b + k * rsb);
            *(dense_vector*)(panel + k * DENSE_COLUMNS + 16) = *(const dense_unaligned*)(b + k * rsb + 16);
        }
        return;
    }
    npy_intp k16 = 0, n16 = 0;                      // stored by columns: 16 x 16 blocks
    if (rsb == 1) {
        k16 = kc / 16 * 16;
        n16 = n / 16 * 16;
        for (npy_intp k = 0; k < k16; k += 16)
            for (npy_intp j = 0; j < n16; j += 16)
                dense_transpose16(b + j * csb + k, csb, panel + k * DENSE_COLUMNS + j, DENSE_COLUMNS);
    }
    for (npy_intp k = 0; k < kc; k++)               // the rest one by one
        for (npy_intp j = k < k16 ? n16 : 0; j < DENSE_COLUMNS; j++)
            panel[k * DENSE_COLUMNS + j] = j < n ? b[k * rsb + j * csb] : 0;
}

// Asks for part `part` of `parts` of the cache lines that dense_pack will read for a panel at b:
// spread over the row blocks of the panel before, the next one's come in while this one computes.
static inline void dense_prefetch(npy_intp kc, const float* b, npy_intp rsb, npy_intp csb, npy_intp part, npy_intp parts) {
    if (csb == 1) {                                 // kc rows of 32 floats: two lines each
        for (npy_intp k = kc * part / parts; k < kc * (part + 1) / parts; k++) {
            __builtin_prefetch(b + k * rsb);
            __builtin_prefetch(b + k * rsb + 16);
        }
    } else if (rsb == 1) {                          // 32 columns of kc floats: a line each 16
        const npy_intp per_column = (kc + 15) / 16, lines = DENSE_COLUMNS * per_column;
        for (npy_intp l = lines * part / parts; l < lines * (part + 1) / parts; l++)
            __builtin_prefetch(b + (l / per_column) * csb + (l % per_column) * 16);
    }
}

// Asks for the cache lines of 32 floats at `row` (two, or three unaligned), to be written.
static inline void dense_prefetch_row(const float* row) {
    __builtin_prefetch(row, 1);
    __builtin_prefetch(row + 16, 1);
    __builtin_prefetch(row + 31, 1);
}

// c[0:m][0:32] (rows ldc apart) = alpha * sum over k < kc of A[i][k] panel[k] + beta * c, with
// A[i][k] at a[i * rsa + k * csa]; rows past m are computed from row 0 and not stored.  With a
// parameter w (rows ldc apart as c's; else NULL), the momentum update's last two terms as well:
// c += d * w, then w += c.
static inline void dense_tile(npy_intp kc, const float* a, npy_intp rsa, npy_intp csa, const float* panel,
                              float* c, npy_intp ldc, int m, float alpha, float beta, float* w, float d) {
    dense_vector sums[DENSE_ROWS][2];
    const float* rows[DENSE_ROWS];
    for (int i = 0; i < DENSE_ROWS; i++) {
        sums[i][0] = sums[i][1] = (dense_vector){0};
        rows[i] = a + (i < m ? i : 0) * rsa;
    }
    for (npy_intp k = 0, at = 0; k < kc; k++, at += csa) {
        const dense_vector b0 = *(const dense_vector*)(panel + k * DENSE_COLUMNS);
        const dense_vector b1 = *(const dense_vector*)(panel + k * DENSE_COLUMNS + 16);
        #pragma GCC unroll 8
        for (int i = 0; i < DENSE_ROWS; i++) {
            const float x = rows[i][at];
            sums[i][0] += x * b0;
            sums[i][1] += x * b1;
        }
    }
    #pragma GCC unroll 8
    for (int i = 0; i < DENSE_ROWS; i++) {          // unrolled: the sums stay in registers
        if (i >= m)
            break;
        dense_unaligned* c0 = (dense_unaligned*)(c + i * ldc);
        dense_unaligned* c1 = (dense_unaligned*)(c + i * ldc + 16);
        dense_vector s0 = alpha * sums[i][0], s1 = alpha * sums[i][1];
        if (beta != 0) {                            // as BLAS: with beta 0, c's old values (NaN too) not read
            s0 += beta * *c0;
            s1 += beta * *c1;
        }
        if (w) {
            dense_unaligned* w0 = (dense_unaligned*)(w + i * ldc);
            dense_unaligned* w1 = (dense_unaligned*)(w + i * ldc + 16);
            if (d != 0) {                           // no decay: no 0 * w (NaN for an infinite w)
                s0 += d * *w0;
                s1 += d * *w1;
            }
            *w0 += s0;
            *w1 += s1;
        }
        *c0 = s0;
        *c1 = s1;
    }
}

// c[0:m][0:n] (rows ldc apart) as dense_tile, for a panel of n <= 32 columns.
static inline void dense_block(npy_intp kc, const float* a, npy_intp rsa, npy_intp csa, const float* panel,
                               float* c, npy_intp ldc, int m, npy_intp n, float alpha, float beta, float* w, float d) {
    if (n == DENSE_COLUMNS) {
        dense_tile(kc, a, rsa, csa, panel, c, ldc, m, alpha, beta, w, d);
        return;
    }
    float edge[DENSE_ROWS * DENSE_COLUMNS] = {0}, edge_w[DENSE_ROWS * DENSE_COLUMNS] = {0};   // the last, narrower panel's tile
    for (int i = 0; i < m; i++)
        for (npy_intp j = 0; j < n; j++) {
            edge[i * DENSE_COLUMNS + j] = c[i * ldc + j];
            edge_w[i * DENSE_COLUMNS + j] = w ? w[i * ldc + j] : 0;
        }
    dense_tile(kc, a, rsa, csa, panel, edge, DENSE_COLUMNS, m, alpha, beta, w ? edge_w : NULL, d);
    for (int i = 0; i < m; i++)
        for (npy_intp j = 0; j < n; j++) {
            c[i * ldc + j] = edge[i * DENSE_COLUMNS + j];
            if (w)
                w[i * ldc + j] = edge_w[i * DENSE_COLUMNS + j];
        }
}

// C (M x N, rows ldc apart, unit columns) = alpha * A B + beta * C, A[i][k] at a[i * rsa + k * csa],
// B[k][j] at b[k * rsb + j * csb]; with w (a parameter stored as C; else NULL), then C += d * w
// and w += C, the momentum update; K >= 1.  0 on success, -1 out of memory.
// Where all of B packed fits the cache (the weights' gradient: 100 rows), it is packed once and
// each OpenMP thread takes whole 8-row blocks of C (whole rows of C and w written by one thread);
// otherwise each thread takes whole 32-column panels of C, packing each panel of B as it comes.
static int dense_gemm(npy_intp M, npy_intp N, npy_intp K, float alpha, const float* a, npy_intp rsa, npy_intp csa,
                      const float* b, npy_intp rsb, npy_intp csb, float beta, float* c, npy_intp ldc,
                      float* w, float d) {
    const npy_intp row_blocks = (M + DENSE_ROWS - 1) / DENSE_ROWS, panels = (N + DENSE_COLUMNS - 1) / DENSE_COLUMNS;
    const npy_intp kc_max = dense_min(K, DENSE_KC);
    const int by_rows = dense_by_rows(N, K);
    float* all = by_rows ? (float*)aligned_alloc(64, (K + 1) * panels * DENSE_COLUMNS * sizeof(float)) : NULL;
    if (by_rows && !all)
        return -1;
    int failed = 0;
    #pragma omp parallel
    {
        if (by_rows) {
            #pragma omp for schedule(static)
            for (npy_intp p = 0; p < panels; p++) {
                const npy_intp n = dense_min(N - p * DENSE_COLUMNS, DENSE_COLUMNS);
                dense_pack(K, n, b + p * DENSE_COLUMNS * csb, rsb, csb, all + p * K * DENSE_COLUMNS);
            }
            #pragma omp for schedule(static)
            for (npy_intp r = 0; r < row_blocks; r++) {
                const int m = (int)dense_min(M - r * DENSE_ROWS, DENSE_ROWS);
                for (npy_intp p = 0; p < panels; p++) {
                    const npy_intp n = dense_min(N - p * DENSE_COLUMNS, DENSE_COLUMNS);
                    if (N - (p + 1) * DENSE_COLUMNS >= DENSE_COLUMNS) {     // the next tile's rows of c and w
                        float* next = c + r * DENSE_ROWS * ldc + (p + 1) * DENSE_COLUMNS;
                        for (npy_intp at = 0; at < m * ldc; at += ldc)
                            dense_prefetch_row(next + at);
                        for (npy_intp at = 0; w && at < m * ldc; at += ldc)
                            dense_prefetch_row(w + (next - c) + at);
                    }
                    dense_block(K, a + r * DENSE_ROWS * rsa, rsa, csa, all + p * K * DENSE_COLUMNS,
                                c + r * DENSE_ROWS * ldc + p * DENSE_COLUMNS, ldc, m, n, alpha, beta,
                                w ? w + r * DENSE_ROWS * ldc + p * DENSE_COLUMNS : NULL, d);
                }
            }
        } else {
            float* panel = (float*)aligned_alloc(64, (kc_max + 1) * DENSE_COLUMNS * sizeof(float));
            if (!panel) {
                #pragma omp atomic write
                failed = 1;
            }
            // the first operand's columns in blocks of KC, outermost: its block stays in the cache
            for (npy_intp k0 = 0; k0 < K; k0 += DENSE_KC) {
                const npy_intp kc = dense_min(K - k0, DENSE_KC);
                const float scale = k0 ? 1.0f : beta;   // later blocks add to the first one's sums
                float* last_w = k0 + kc >= K ? w : NULL;   // the update's terms once, with the last block
                #pragma omp for schedule(static) nowait
                for (npy_intp p = 0; p < panels; p++) {     // a thread keeps its panels for every block
                    if (!panel)                             // every thread meets every loop, as OpenMP asks
                        continue;
                    const npy_intp n = dense_min(N - p * DENSE_COLUMNS, DENSE_COLUMNS);
                    dense_pack(kc, n, b + k0 * rsb + p * DENSE_COLUMNS * csb, rsb, csb, panel);
                    const int next_full = N - (p + 1) * DENSE_COLUMNS >= DENSE_COLUMNS;
                    for (npy_intp r = 0; r < row_blocks; r++) {
                        if (next_full)
                            dense_prefetch(kc, b + k0 * rsb + (p + 1) * DENSE_COLUMNS * csb, rsb, csb, r, row_blocks);
                        const int m = (int)dense_min(M - r * DENSE_ROWS, DENSE_ROWS);
                        float* tile = c + r * DENSE_ROWS * ldc + p * DENSE_COLUMNS;
                        for (npy_intp i = DENSE_ROWS; i < 2 * DENSE_ROWS && r * DENSE_ROWS + i < M && n == DENSE_COLUMNS; i++)
                            dense_prefetch_row(tile + i * ldc);         // the next tile's rows of c
                        dense_block(kc, a + r * DENSE_ROWS * rsa + k0 * csa, rsa, csa, panel, tile, ldc, m, n, alpha, scale,
                                    last_w ? last_w + (tile - c) : NULL, d);
                    }
                }
            }
            free(panel);
        }
    }
    free(all);
    return failed ? -1 : 0;
}
#endif

#section ours_first

if (Nx[1] == 0) {           // no terms: z = b z (Theano's BLAS call refuses the strides of empty operands)
    float* z = (float*)PyArray_DATA(%(_zout)s);
    for (npy_intp i = 0; i < Nz[0]; i++)
        for (npy_intp j = 0; j < Nz[1]; j++)
            z[i * sz_0 + j * sz_1] = b == 0 ? 0 : b * z[i * sz_0 + j * sz_1];
    break;
}
#ifdef __AVX512F__
{
    const int by_rows = (unit & 0xF) == 0;
    const npy_intp M = by_rows ? Nz[0] : Nz[1], N = by_rows ? Nz[1] : Nz[0], K = Nx[1];
    if (dense_suits(M, N, K)) {
        float* x = (float*)PyArray_DATA(%(_x)s);
        float* y = (float*)PyArray_DATA(%(_y)s);
        float* z = (float*)PyArray_DATA(%(_zout)s);
        float* dense_w = NULL;
        float dense_d = 0;
        BEFORE
        const int failed = by_rows ? dense_gemm(M, N, K, a, x, sx_0, sx_1, y, sy_0, sy_1, b, z, sz_0, dense_w, dense_d)
                                   : dense_gemm(M, N, K, a, y, sy_1, sy_0, x, sx_1, sx_0, b, z, sz_1, dense_w, dense_d);
        if (failed) {
            PyErr_NoMemory();
            %(fail)s
        }
        AFTER
        break;                  // out of the switch on the dtype: done
    }
}
#endif

