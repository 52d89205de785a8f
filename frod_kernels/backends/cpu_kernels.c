/* The two kernel families for the CPU, in plain C (no torch headers: built in well under a second by the system's
 * compiler and loaded with ctypes; see frod_kernels/backends/cpu.py).
 *
 * Both walk the tokens (the m columns of their operands) in tiles of TILE. A tile of each operand is first copied
 * to a feature-major scratch (row r's TILE values contiguous, zero past the last token), whatever the operand's
 * strides: the layer's activations arrive token-major at few tokens (the transpose of the GEMM's output), where a
 * gather along a feature would touch one cache line per token. After the copy every nonzero costs one
 * TILE-wide multiply-add on contiguous rows, which the compiler vectorizes; results are stored through the output's
 * strides, so the caller picks the layout the next GEMM reads fastest.
 *
 * One thread: these kernels serve few tokens, where the work is tens of microseconds and a thread pool's wake-up
 * would cost as much (the torch backend's CSR kernels, parallel, serve the rest).
 * Accumulation in the element type (float for float32, double for float64), in a fixed order: the group's
 * nonzeros in layout order, tiles in token order. Deterministic.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 8  /* tokens per tile: a few tokens is these kernels' use, and a wider tile would be mostly padding */

/* 0 if ptr (n + 1 offsets) and src (nnz rows) describe a grouping of nnz nonzeros over n rows; else -2 (ptr) or
 * -3 (src). One pass over both: a few microseconds, against an out-of-bounds read or write. */
static int check_groups(int64_t n, int64_t nnz, const int64_t *ptr, const int64_t *src) {
    if (ptr[0] != 0 || ptr[n] != nnz) return -2;
    for (int64_t r = 0; r < n; ++r)
        if (ptr[r + 1] < ptr[r]) return -2;
    int bad = 0;
    for (int64_t k = 0; k < nnz; ++k) bad |= src[k] < 0 || src[k] >= n;
    return bad ? -3 : 0;
}

#define DEFINE_KERNELS(T, SUFFIX)                                                                                   \
                                                                                                                    \
/* s[r * TILE + j] = A[r, j0 + j] for j < jn, 0 for jn <= j < TILE */                                               \
static void load_tile_##SUFFIX(T *s, const T *A, int64_t n, int64_t a0, int64_t a1, int64_t j0, int64_t jn) {      \
    if (jn < TILE) memset(s, 0, (size_t)n * TILE * sizeof(T));                                                       \
    for (int64_t j = 0; j < jn; ++j) {                                                                              \
        const T *col = A + (j0 + j) * a1;                                                                           \
        for (int64_t r = 0; r < n; ++r) s[r * TILE + j] = col[r * a0];                                              \
    }                                                                                                               \
}                                                                                                                   \
                                                                                                                    \
/* <a, b> over a tile, summed as a fixed tree of lane-wise adds: vectorizable without reassociating (no fast-math), \
 * and the same order on every call. */                                                                            \
static inline T dot_tile_##SUFFIX(const T *a, const T *b) {                                                         \
    T p[TILE];                                                                                                      \
    for (int j = 0; j < TILE; ++j) p[j] = a[j] * b[j];                                                              \
    for (int half = TILE / 2; half > 0; half /= 2)                                                                  \
        for (int j = 0; j < half; ++j) p[j] += p[j + half];                                                         \
    return p[0];                                                                                                    \
}                                                                                                                   \
                                                                                                                    \
/* out[r, j] = d[r] A[r, j] + sum_{k in [ptr[r], ptr[r+1])} w[k] A[src[k], j].                                   \
 * Returns 0, -1 if out of memory, or check_groups' error. */                                                      \
int frod_row_gather_diag_##SUFFIX(int64_t n, int64_t m, const T *A, int64_t a0, int64_t a1, const T *d,           \
                                  const T *w, int64_t nnz, const int64_t *ptr, const int64_t *src, T *out,          \
                                  int64_t o0, int64_t o1) {                                                         \
    int err = check_groups(n, nnz, ptr, src);                                                                       \
    if (err != 0 || n == 0 || m == 0) return err;                                                                   \
    T *s = (T *)malloc((size_t)n * TILE * sizeof(T));                                                               \
    if (s == NULL) return -1;                                                                                       \
    for (int64_t j0 = 0; j0 < m; j0 += TILE) {                                                                      \
        int64_t jn = m - j0 < TILE ? m - j0 : TILE;                                                                 \
        load_tile_##SUFFIX(s, A, n, a0, a1, j0, jn);                                                                \
        for (int64_t r = 0; r < n; ++r) {                                                                           \
            T acc[TILE];                                                                                            \
            const T dr = d[r], *own = s + r * TILE;                                                                 \
            for (int j = 0; j < TILE; ++j) acc[j] = dr * own[j];                                                    \
            for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {                                                         \
                const T wk = w[k], *row = s + src[k] * TILE;                                                        \
                for (int j = 0; j < TILE; ++j) acc[j] += wk * row[j];                                               \
            }                                                                                                       \
            T *o = out + r * o0 + j0 * o1;                                                                          \
            for (int64_t j = 0; j < jn; ++j) o[j * o1] = acc[j];                                                    \
        }                                                                                                           \
    }                                                                                                               \
    free(s);                                                                                                        \
    return 0;                                                                                                       \
}                                                                                                                   \
                                                                                                                    \
/* vals[k] = <P[r, :], Q[src[k], :]> for k in [ptr[r], ptr[r+1]), diag[r] = <P[r, :], Q[r, :]>; P and Q are n x m.  \
 * Returns 0, -1 if out of memory, or check_groups' error. */                                                      \
int frod_sampled_dot_diag_##SUFFIX(int64_t n, int64_t m, const T *P, int64_t p0, int64_t p1, const T *Q,          \
                                   int64_t q0, int64_t q1, int64_t nnz, const int64_t *ptr, const int64_t *src,     \
                                   T *vals, T *diag) {                                                              \
    int err = check_groups(n, nnz, ptr, src);                                                                       \
    if (err != 0) return err;                                                                                       \
    memset(vals, 0, (size_t)nnz * sizeof(T));                                                                       \
    memset(diag, 0, (size_t)n * sizeof(T));                                                                         \
    if (n == 0 || m == 0) return 0;                                                                                 \
    T *sp = (T *)malloc((size_t)n * TILE * 2 * sizeof(T));                                                          \
    if (sp == NULL) return -1;                                                                                      \
    T *sq = sp + n * TILE;                                                                                          \
    for (int64_t j0 = 0; j0 < m; j0 += TILE) {                                                                      \
        int64_t jn = m - j0 < TILE ? m - j0 : TILE;                                                                 \
        load_tile_##SUFFIX(sp, P, n, p0, p1, j0, jn);                                                               \
        load_tile_##SUFFIX(sq, Q, n, q0, q1, j0, jn);                                                               \
        for (int64_t r = 0; r < n; ++r) {                                                                           \
            const T *pr = sp + r * TILE;                                                                            \
            diag[r] += dot_tile_##SUFFIX(pr, sq + r * TILE);                                                        \
            for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) vals[k] += dot_tile_##SUFFIX(pr, sq + src[k] * TILE);     \
        }                                                                                                           \
    }                                                                                                               \
    free(sp);                                                                                                       \
    return 0;                                                                                                       \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
