/* bfloat16 matrix products with a few rows of activations, for x86-64 CPUs with AVX2 and FMA, and with AVX512-BF16.

   out[i, r] = bf16(sum_c x[i, c] * weight[r, c] + bias[r]): nn.Linear's function for a [rows, cols] bfloat16
   weight, accumulated in float32 and rounded once to nearest-even, as PyTorch's own kernel does.

   Decoding reads every weight once per token, so the speed is how fast one core streams memory. Two things make
   this faster than PyTorch's bfloat16 matrix-vector product on such CPUs (docs/performance-log.md, item 7):
   - bfloat16 is the upper half of a float32, so a 256-bit load of 16 weights becomes two float32 vectors with one
     shift (even elements) and one mask (odd elements); the activations are split the same way once per call.
   - each thread prefetches the weights it reads ahead of them, which keeps more memory reads in flight than the
     hardware prefetcher alone does: short rows for one or two activation rows read one at a time as one stream,
     prefetched PREFETCH_AHEAD weights ahead; else two or four at a time, each prefetched PREFETCH_ROWS rows ahead
     (`linear_rows` has the figures).
   On CPUs with AVX512-BF16 (Intel from Cooper Lake, AMD from Zen 4) a second path multiplies bfloat16 pairs as
   they are (vdpbf16ps: 32 products a instruction, summed pairwise into 16 float32 lanes), with no conversion of
   either side: each 64-byte weight vector is loaded once and used for every activation row (a tile of weight rows
   x activation rows in zmm accumulators), so a few rows cost little more than one (the AVX2 path converts each weight
   once per four activation rows and is compute-bound from about eight). On CPUs with AMX a third path multiplies
   tiles of 16 weight rows by up to 16 activation rows (below). Paths, chosen at run time in one place (`best_isa`;
   `isa` 0 asks for the best, BF16_ISA_* for one).

   Exactness: a product of two bfloat16 numbers is exact in float32 (8-bit significands), so either path differs
   from PyTorch's float32 accumulation only in the order of the float32 sums: within one bfloat16 step after the
   final rounding. vdpbf16ps also treats bfloat16 denormal inputs (below 2^-126 in magnitude) as zero and flushes
   denormal partial sums to zero; each such flush changes a sum by less than 2^-126, far below a bfloat16 step of
   any result larger than about 2^-110 (cols * 2^-126 at most, then rounded), and oneDNN's bfloat16 matmul, which
   PyTorch's own linear uses on these CPUs, does the same (tests/test_kernel.py checks denormal activations).

   Threads: OpenMP, linked against the runtime PyTorch has loaded, so the product uses PyTorch's thread team and
   torch.set_num_threads. Built on first use by native/build.py. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "fiddler_native.h"

#if BF16_ISA_AVX2 != 1 || BF16_ISA_AVX512 != 2 || BF16_ISA_AMX != 3
#error "bf16_gemv.c numbers its paths as native/limits.py's BF16_ISA_* do: build the library with native/build.py"
#endif

#define PREFETCH_ROWS 12 /* a flat optimum between 6 and 32 rows (docs/performance-log.md, item 7) */
#define PREFETCH_AHEAD 512 /* weights (1 KiB) ahead of a row stream: the best of 0-4096 on a Zen 3 */
#define ROW_STREAM_COLS 1024 /* weight rows up to this long are read one at a time (`linear_rows`) */
#define INLINE static inline __attribute__((always_inline))
#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A 16-column block of a weight row as float32: even columns (shifted up) and odd columns (masked). */
#define EVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define ODD(v) _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)))
#define LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)

/* y[0..3] = dot products of 4 weight rows (row stride cols) with one split activation row xs. */
static void dot4(const uint16_t *w, int64_t cols, const float *xs, float *y) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const uint16_t *ahead = w + PREFETCH_ROWS * cols;
    for (int64_t c = 0; c < cols; c += 16) {
        if ((c & 31) == 0) { /* one 64-byte line per row every other step */
            PREFETCH(ahead + c);
            PREFETCH(ahead + cols + c);
            PREFETCH(ahead + 2 * cols + c);
            PREFETCH(ahead + 3 * cols + c);
        }
        __m256 xe = _mm256_loadu_ps(xs + c), xo = _mm256_loadu_ps(xs + c + 8);
        __m256i v0 = LOAD(w + c), v1 = LOAD(w + cols + c), v2 = LOAD(w + 2 * cols + c), v3 = LOAD(w + 3 * cols + c);
        a0 = _mm256_fmadd_ps(EVEN(v0), xe, a0); b0 = _mm256_fmadd_ps(ODD(v0), xo, b0);
        a1 = _mm256_fmadd_ps(EVEN(v1), xe, a1); b1 = _mm256_fmadd_ps(ODD(v1), xo, b1);
        a2 = _mm256_fmadd_ps(EVEN(v2), xe, a2); b2 = _mm256_fmadd_ps(ODD(v2), xo, b2);
        a3 = _mm256_fmadd_ps(EVEN(v3), xe, a3); b3 = _mm256_fmadd_ps(ODD(v3), xo, b3);
    }
    y[0] = hsum(_mm256_add_ps(a0, b0));
    y[1] = hsum(_mm256_add_ps(a1, b1));
    y[2] = hsum(_mm256_add_ps(a2, b2));
    y[3] = hsum(_mm256_add_ps(a3, b3));
}

/* The dot product of one weight row with one split activation row xs: 64 columns a step into 8 accumulators (4 FMAs
   in flight a step hide their latency), the row read front to back, so that a thread's rows form one sequential
   stream; `ahead`: prefetch PREFETCH_AHEAD weights ahead of each step (in a row stream, for the first activation
   row only: the others find the row in L1). Also the last rows of a weight read two or four rows at a time. */
static float dot_row(const uint16_t *w, int64_t cols, const float *xs, int ahead) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int64_t c = 0;
    for (; c + 64 <= cols; c += 64) {
        if (ahead) {
            PREFETCH(w + c + PREFETCH_AHEAD);
            PREFETCH(w + c + PREFETCH_AHEAD + 32);
        }
        __m256i v0 = LOAD(w + c), v1 = LOAD(w + c + 16), v2 = LOAD(w + c + 32), v3 = LOAD(w + c + 48);
        a0 = _mm256_fmadd_ps(EVEN(v0), _mm256_loadu_ps(xs + c), a0);
        a1 = _mm256_fmadd_ps(ODD(v0), _mm256_loadu_ps(xs + c + 8), a1);
        a2 = _mm256_fmadd_ps(EVEN(v1), _mm256_loadu_ps(xs + c + 16), a2);
        a3 = _mm256_fmadd_ps(ODD(v1), _mm256_loadu_ps(xs + c + 24), a3);
        a4 = _mm256_fmadd_ps(EVEN(v2), _mm256_loadu_ps(xs + c + 32), a4);
        a5 = _mm256_fmadd_ps(ODD(v2), _mm256_loadu_ps(xs + c + 40), a5);
        a6 = _mm256_fmadd_ps(EVEN(v3), _mm256_loadu_ps(xs + c + 48), a6);
        a7 = _mm256_fmadd_ps(ODD(v3), _mm256_loadu_ps(xs + c + 56), a7);
    }
    for (; c < cols; c += 16) { /* a row of 16, 32 or 48 columns past the last 64 */
        __m256i v = LOAD(w + c);
        a0 = _mm256_fmadd_ps(EVEN(v), _mm256_loadu_ps(xs + c), a0);
        a1 = _mm256_fmadd_ps(ODD(v), _mm256_loadu_ps(xs + c + 8), a1);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                              _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))));
}

/* The activations in float32 for dot4 and dot_row, each 16-column block split into its 8 even then its 8 odd
   columns. */
static float *split_rows(const uint16_t *x, int64_t n, int64_t cols) {
    float *xs = aligned_alloc(64, (size_t)(n * cols * sizeof(float) + 63) / 64 * 64);
    if (xs == NULL) return NULL;
    for (int64_t i = 0; i < n * cols; i += 16)
        for (int k = 0; k < 8; k++) {
            xs[i + k] = bf16_to_float(x[i + 2 * k]);
            xs[i + 8 + k] = bf16_to_float(x[i + 2 * k + 1]);
        }
    return xs;
}

/* y[k][i] = dot products of 2 weight rows (k, row stride cols) with N (1 to 4) split activation rows (i, stride
   cols): each 16-column block of the weights is loaded and converted once for all N rows, 2 x N sums in registers
   (even and odd columns into one sum, 8 at most beside the 4 converted weight vectors and 2 activation ones).
   `ahead`: prefetch the 2 rows PREFETCH_ROWS rows ahead (in the first pass over these rows only). */
INLINE void tile2(const uint16_t *w, int64_t cols, const float *xs, const int N, float y[2][4], int ahead) {
    __m256 acc0[4], acc1[4];
    for (int i = 0; i < N; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    const uint16_t *next = w + PREFETCH_ROWS * cols;
    for (int64_t c = 0; c < cols; c += 16) {
        if (ahead && (c & 31) == 0) {
            PREFETCH(next + c);
            PREFETCH(next + cols + c);
        }
        __m256i v0 = LOAD(w + c), v1 = LOAD(w + cols + c);
        __m256 e0 = EVEN(v0), o0 = ODD(v0), e1 = EVEN(v1), o1 = ODD(v1);
        for (int i = 0; i < N; i++) {
            __m256 xe = _mm256_loadu_ps(xs + i * cols + c), xo = _mm256_loadu_ps(xs + i * cols + c + 8);
            acc0[i] = _mm256_fmadd_ps(e0, xe, acc0[i]);
            acc1[i] = _mm256_fmadd_ps(e1, xe, acc1[i]);
            acc0[i] = _mm256_fmadd_ps(o0, xo, acc0[i]);
            acc1[i] = _mm256_fmadd_ps(o1, xo, acc1[i]);
        }
    }
    for (int i = 0; i < N; i++) {
        y[0][i] = hsum(acc0[i]);
        y[1][i] = hsum(acc1[i]);
    }
}

/* out[i, r] = bf16(y + bias[r]), out's rows `stride` apart: each path's last step. */
static inline void store(uint16_t *out, int64_t stride, int64_t i, int64_t r, float y, const uint16_t *bias) {
    out[i * stride + r] = float_to_bf16(bias ? y + bf16_to_float(bias[r]) : y);
}

/* out[i, r] for the rows r of `weight` this thread is given: call inside a parallel region (a worksharing loop,
   ending with a barrier). Three ways, by the activation rows n and the weight rows' length (Zen 3, 2 threads, out
   of cache; docs/performance-log.md, 2026-12-02):
   - one activation row, or two on rows of up to ROW_STREAM_COLS weights: weight rows one at a time, each thread's
     block of the weight front to back as one stream (7168x1024, 1 row: 27-29 GB/s against 22-24.5 four rows at a
     time; 2 rows 0.56 ms against the tiles' 0.58);
   - one activation row on longer rows: four weight rows at a time, each prefetched PREFETCH_ROWS rows ahead
     (11264x2048, 2048x5632: 1.48 and 0.78 ms against the tiles' 1.53 and 0.81);
   - otherwise tiles of 2 weight rows x up to 4 activation rows (`tile2`), which convert each weight once for four
     rows instead of once per row: 3 / 4 / 8 rows of 7168x1024 0.55 / 0.60 / 1.11 ms against 0.65 / 0.75 / 1.24,
     of 1024x3584 0.29 / 0.32 / 0.54 against 0.38 / 0.46 / 0.84, 2 rows of 2048x5632 0.86 against 0.98. */
static void linear_rows(const uint16_t *weight, int64_t rows, int64_t cols, const float *xs, int64_t n,
                        const uint16_t *bias, uint16_t *out) {
    if (n == 1 || (n == 2 && cols <= ROW_STREAM_COLS)) {
        if (cols <= ROW_STREAM_COLS) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t i = 0; i < n; i++) /* the row stays in L1 for the other activation row */
                    store(out, rows, i, r, dot_row(weight + r * cols, cols, xs + i * cols, i == 0), bias);
            return;
        }
        int64_t blocks = (rows + 3) / 4;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t r = 4 * b, count = rows - r < 4 ? rows - r : 4;
            float y[4];
            if (count == 4)
                dot4(weight + r * cols, cols, xs, y);
            else
                for (int64_t k = 0; k < count; k++) y[k] = dot_row(weight + (r + k) * cols, cols, xs, 0);
            for (int64_t k = 0; k < count; k++) store(out, rows, 0, r + k, y[k], bias);
        }
        return;
    }
    int64_t pairs = (rows + 1) / 2;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; p++) {
        int64_t r = 2 * p;
        const uint16_t *w = weight + r * cols;
        if (r + 1 == rows) { /* an odd last row */
            for (int64_t i = 0; i < n; i++) store(out, rows, i, r, dot_row(w, cols, xs + i * cols, 0), bias);
            continue;
        }
        for (int64_t i = 0; i < n; i += 4) { /* the two rows stay in L1 for the next four activation rows */
            float y[2][4];
            const float *x = xs + i * cols;
            const int m = n - i < 4 ? (int)(n - i) : 4;
            switch (m) { /* a constant N for each, so the loops over it unroll */
            case 1: tile2(w, cols, x, 1, y, i == 0); break;
            case 2: tile2(w, cols, x, 2, y, i == 0); break;
            case 3: tile2(w, cols, x, 3, y, i == 0); break;
            default: tile2(w, cols, x, 4, y, i == 0); break;
            }
            for (int j = 0; j < m; j++) {
                store(out, rows, i + j, r, y[0][j], bias);
                store(out, rows, i + j, r + 1, y[1][j], bias);
            }
        }
    }
}

/* bf16(silu(g)) for every bfloat16 g, filled when the library loads: a gate holds one of 65536 values, so a table
   gives the activation the same bits as computing it, a load instead of expf and a division per element. */
static uint16_t silu_of[1 << 16];

__attribute__((constructor)) static void fill_silu_table(void) {
    for (uint32_t u = 0; u < (1u << 16); u++) {
        float g = bf16_to_float((uint16_t)u);
        silu_of[u] = float_to_bf16(g / (1.0f + expf(-g)));
    }
}

/* bf16(bf16(silu(gate)) * up), each rounded as PyTorch's bfloat16 operations round. */
static inline uint16_t silu_product(uint16_t gate, uint16_t up) {
    return float_to_bf16(bf16_to_float(silu_of[gate]) * bf16_to_float(up));
}

static int linear_avx2(const uint16_t *weight, int64_t rows, int64_t cols, const uint16_t *x, int64_t n,
                        const uint16_t *bias, uint16_t *out) {
    float *xs = split_rows(x, n, cols);
    if (xs == NULL) return -1;
#pragma omp parallel
    linear_rows(weight, rows, cols, xs, n, bias, out);
    free(xs);
    return 0;
}

static int silu_expert_avx2(const uint16_t *gate_up, const uint16_t *down, int64_t hidden, int64_t inter,
                             const uint16_t *x, int64_t n, uint16_t *out) {
    float *xs = split_rows(x, n, hidden);
    uint16_t *h = malloc((size_t)(n * 2 * inter * sizeof(uint16_t)));
    float *ps = aligned_alloc(64, (size_t)(n * inter * sizeof(float) + 63) / 64 * 64);
    if (xs == NULL || h == NULL || ps == NULL) {
        free(xs);
        free(h);
        free(ps);
        return -1;
    }
#pragma omp parallel
    {
        linear_rows(gate_up, 2 * inter, hidden, xs, n, NULL, h);
        /* silu(gate) * up, each rounded, written in the split layout the down product reads */
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n * inter; j++) {
            int64_t i = j / inter, c = j % inter;
            int64_t at = i * inter + (c & ~15) + ((c & 1) ? 8 : 0) + ((c & 15) >> 1);
            ps[at] = bf16_to_float(silu_product(h[i * 2 * inter + c], h[i * 2 * inter + inter + c]));
        }
        linear_rows(down, hidden, inter, ps, n, NULL, out);
    }
    free(xs);
    free(h);
    free(ps);
    return 0;
}

/* --- AVX512-BF16 --- */

/* The sums of four float32 vectors' lanes, in order: 13 instructions instead of 4 separate horizontal sums' 32. */
INLINE BF16 __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); /* a, b, a, b in each 128 bits */
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE)); /* a b c d */
    __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

/* y[j] = the lane sum of acc[j] for j < count (a multiple of 4 or not), four at a time. */
INLINE BF16 void lane_sums(const __m512 *acc, const int count, float *y) {
    int j = 0;
    for (; j + 4 <= count; j += 4) _mm_storeu_ps(y + j, sum4(acc[j], acc[j + 1], acc[j + 2], acc[j + 3]));
    for (; j < count; j++) y[j] = _mm512_reduce_add_ps(acc[j]);
}

/* y[i * 4 + r] = sum over c of x[i, c] * w[r, c] for 4 weight rows and N (1 or 2) activation rows, both of stride
   cols, one weight row after the other: memory read in one sequential stream, which the hardware prefetchers follow
   best (a third faster than the tiles below for one row), with the next rows prefetched SEQUENTIAL_AHEAD rows
   ahead. Two sums per row and activation row (even and odd 32-column steps) hide the instruction's latency. */
#define SEQUENTIAL_AHEAD 4 /* measured: 2 to 8 rows within noise for 1 row, 12 slower */
INLINE BF16 void rows_in_sequence(const uint16_t *w, int64_t cols, const uint16_t *x, const int N, float *y) {
    __m512 acc[4 * 2]; /* acc[i * 4 + r] */
    for (int r = 0; r < 4; r++) {
        const uint16_t *row = w + r * cols, *ahead = row + SEQUENTIAL_AHEAD * cols;
        __m512 a[2], b[2];
        for (int i = 0; i < N; i++) a[i] = b[i] = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 64 <= cols; c += 64) {
            PREFETCH(ahead + c);
            PREFETCH(ahead + c + 32);
            __m512i v0 = _mm512_loadu_si512(row + c), v1 = _mm512_loadu_si512(row + c + 32);
            for (int i = 0; i < N; i++) {
                a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)v0, (__m512bh)_mm512_loadu_si512(x + i * cols + c));
                b[i] = _mm512_dpbf16_ps(b[i], (__m512bh)v1, (__m512bh)_mm512_loadu_si512(x + i * cols + c + 32));
            }
        }
        for (; c < cols; c += 16) { /* the last 32 or 16 columns: 16 at a time, the other lanes zero */
            __m512i v = _mm512_maskz_loadu_epi16(0xFFFF, row + c);
            for (int i = 0; i < N; i++) {
                __m512i xv = _mm512_maskz_loadu_epi16(0xFFFF, x + i * cols + c);
                a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)v, (__m512bh)xv);
            }
        }
        for (int i = 0; i < N; i++) acc[i * 4 + r] = _mm512_add_ps(a[i], b[i]);
    }
    lane_sums(acc, 4 * N, y);
}

/* y[i * R + r] = sum over c of x[i, c] * w[r, c] for R weight rows and N activation rows, both of stride cols: each
   weight vector (32 columns, one 64-byte line) is loaded once for all N rows, R * N sums in registers. The next
   R rows are prefetched in memory order, R lines a step, as the tile reads its own: one sequential stream ahead of
   the tile's R interleaved ones, which made 3 to 6 rows 5-15% faster than prefetching each row PREFETCH_ROWS
   ahead as the AVX2 path does for long rows (Zen 5, 2026-12-02). A last 16 columns (cols a multiple of 16, not of
   32) are read with masked loads, the rest of the lanes zero. */
INLINE BF16 void tile_bf16(const uint16_t *w, int64_t cols, const uint16_t *x, const int R, const int N, float *y) {
    __m512 acc[4 * MAX_ROWS]; /* acc[i * R + r] */
    for (int j = 0; j < R * N; j++) acc[j] = _mm512_setzero_ps();
    const uint16_t *next = w + R * cols;
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
        __m512i v[4];
        for (int r = 0; r < R; r++) {
            PREFETCH(next + c * R + r * 32);
            v[r] = _mm512_loadu_si512(w + r * cols + c);
        }
        for (int i = 0; i < N; i++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * cols + c);
            for (int r = 0; r < R; r++) acc[i * R + r] = _mm512_dpbf16_ps(acc[i * R + r], (__m512bh)v[r], xv);
        }
    }
    if (c < cols) {
        for (int i = 0; i < N; i++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(0xFFFF, x + i * cols + c);
            for (int r = 0; r < R; r++)
                acc[i * R + r] = _mm512_dpbf16_ps(acc[i * R + r],
                                                  (__m512bh)_mm512_maskz_loadu_epi16(0xFFFF, w + r * cols + c), xv);
        }
    }
    lane_sums(acc, R * N, y);
}

/* Weight rows w[0..count) (count <= 4) against N activation rows, y[i * 4 + r]: 4 rows in sequence for 1 or 2
   activation rows; a tile of the 4 weight rows for 3 to 6 activation rows, two for 7 and 8 (4 x 8 sums would not
   fit in the 32 zmm registers beside the weights); 1 weight row at a time for a last block of fewer than 4. */
INLINE BF16 void block_bf16(const uint16_t *w, int64_t count, int64_t cols, const uint16_t *x, const int N, float *y) {
    float t[4 * MAX_ROWS];
    if (count == 4 && N <= 2) {
        rows_in_sequence(w, cols, x, N, y);
        return;
    }
    if (count == 4 && N <= 6) {
        tile_bf16(w, cols, x, 4, N, y);
        return;
    }
    if (count == 4) { /* two tiles of half the activation rows, the second reading the weights from the L1 cache */
        const int N1 = (N + 1) / 2;
        tile_bf16(w, cols, x, 4, N1, y);
        tile_bf16(w, cols, x + N1 * cols, 4, N - N1, y + N1 * 4);
        return;
    }
    for (int64_t r = 0; r < count; r++) {
        tile_bf16(w + r * cols, cols, x, 1, N, t);
        for (int i = 0; i < N; i++) y[i * 4 + r] = t[i];
    }
}

/* out[i * stride + r] for the rows r of `weight` this thread is given, any number of activation rows (MAX_ROWS at a
   time, the weight block still in cache for the next): call inside a parallel region (a worksharing loop, ending
   with a barrier). */
static BF16 void linear_rows_bf16(const uint16_t *weight, int64_t rows, int64_t cols, const uint16_t *x, int64_t n,
                                  const uint16_t *bias, uint16_t *out, int64_t stride) {
    int64_t blocks = (rows + 3) / 4;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t r = 4 * b, count = rows - r < 4 ? rows - r : 4;
        const uint16_t *w = weight + r * cols;
        for (int64_t i0 = 0; i0 < n; i0 += MAX_ROWS) {
            float y[4 * MAX_ROWS];
            int64_t group = n - i0 < MAX_ROWS ? n - i0 : MAX_ROWS;
            const uint16_t *xg = x + i0 * cols;
            switch (group) { /* a constant N for each, so the tile's loops unroll and its sums stay in registers */
            case 1: block_bf16(w, count, cols, xg, 1, y); break;
            case 2: block_bf16(w, count, cols, xg, 2, y); break;
            case 3: block_bf16(w, count, cols, xg, 3, y); break;
            case 4: block_bf16(w, count, cols, xg, 4, y); break;
            case 5: block_bf16(w, count, cols, xg, 5, y); break;
            case 6: block_bf16(w, count, cols, xg, 6, y); break;
            case 7: block_bf16(w, count, cols, xg, 7, y); break;
            default: block_bf16(w, count, cols, xg, 8, y); break;
            }
            for (int64_t i = 0; i < group; i++)
                for (int64_t k = 0; k < count; k++) store(out, stride, i0 + i, r + k, y[i * 4 + k], bias);
        }
    }
}

/* --- AMX tiles (Intel from Sapphire Rapids) ---

   The AVX512-BF16 tiles above run out of registers past a few activation rows (4 x 8 sums do not fit), so 8 rows
   cost about 1.7x one. An AMX tile multiply (tdpbf16ps) takes 16 weight rows x 32 columns against 32 columns of up
   to 16 activation rows at once into a 16 x 16 float32 tile, so up to 16 rows read the weights once at the speed
   of one; one row is no slower than on the AVX-512 path (a 32000 x 1024 head, 1 thread: 5.0-5.4 ms for 1 to 8 rows
   against 5.9 ms for 1 row and 10.0 ms for 8 there; docs/performance-log.md, 2026-12-02).
   out^T = W x^T: the weight tile is 16 consecutive rows of `weight` as they lie (row stride cols), and the
   activations are laid out once per call as the second operand wants them: for each group of 16 rows, column pairs
   (k, k+1) of every row side by side, [cols / 2][16][2] (`pack_pairs`, zeros past the last row). A block is one
   weight tile's 16 rows, read along all of their columns into one accumulator: 16 row streams at a time read memory
   about 10% faster than 64 (four tiles sharing each activation tile; 940 MB of 7168 x 1024 weights, 1 and 2
   threads: docs/performance-log.md). cols must be a multiple of 32 (a tile's 64 bytes); weight rows past the last
   whole block of 16 take the AVX-512 path. Products and sums as vdpbf16ps's (bfloat16 pairs multiplied exactly,
   float32 sums, denormals as zero): within one bfloat16 step of PyTorch's result after the rounding, like the
   other paths. Linux hands a process the tile registers only when asked (arch_prctl), which `amx_usable` does
   once. */

#define AMX_ROWS 16 /* activation rows of one tile */

/* Where activation (i, k) lies in the tiles' layout: group i / 16 of 16 rows at (i / 16) * 16 * cols, within it the
   column pairs (k, k + 1) of the group's rows side by side, [cols / 2][16][2]. */
static inline int64_t pair_index(int64_t i, int64_t k, int64_t cols) {
    return (i / AMX_ROWS) * AMX_ROWS * cols + (k / 2) * 2 * AMX_ROWS + (i % AMX_ROWS) * 2 + (k & 1);
}

#if defined(__GNUC__) && (__GNUC__ >= 11 || (defined(__clang__) && __clang_major__ >= 12))
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#define AMX_BLOCK 16 /* weight rows a block: one tile */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static int amx_usable(void) {
    static int usable = -1;
    if (usable < 0) {
        __builtin_cpu_init();
        int cpu = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16")
                  && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")
                  && __builtin_cpu_supports("avx512vl");
        __atomic_store_n(&usable, cpu && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0,
                         __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&usable, __ATOMIC_ACQUIRE);
}

/* Zeroed scratch for n rows of `cols` activations as the tiles read them (`pair_index`), or NULL. */
static uint16_t *pairs_scratch(int64_t n, int64_t cols) {
    int64_t groups = (n + AMX_ROWS - 1) / AMX_ROWS;
    size_t bytes = (size_t)(groups > 0 ? groups * AMX_ROWS * cols * sizeof(uint16_t) : 64); /* a multiple of 64 */
    uint16_t *xp = aligned_alloc(64, bytes);
    if (xp != NULL) memset(xp, 0, bytes);
    return xp;
}

/* x [n, cols] as the tiles read it (`pair_index`). */
static uint16_t *pack_pairs(const uint16_t *x, int64_t n, int64_t cols) {
    uint16_t *xp = pairs_scratch(n, cols);
    if (xp == NULL) return NULL;
    for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k < cols; k += 2) /* a bfloat16 pair as one 32-bit word, wherever x lies */
            memcpy(xp + pair_index(i, k, cols), x + i * cols + k, 2 * sizeof(uint16_t));
    return xp;
}

/* float_to_bf16 of 16 floats at once: round to nearest even, NaN as 0x7FC0. */
AMX INLINE __m256i bf16_of(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

/* An accumulator tile c (weight rows r0 .. r0 + 15 x the 16 activation rows of group g) into out, bias added:
   each activation row's 16 sums are a column of the tile, read with one gather. */
AMX INLINE void store_group(const float *c, int64_t g, int64_t n, int64_t r0, const uint16_t *bias, uint16_t *out,
                            int64_t stride) {
    const int64_t count = n - g * AMX_ROWS < AMX_ROWS ? n - g * AMX_ROWS : AMX_ROWS;
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(AMX_ROWS)); /* c[r * 16 + i], r = 0 .. 15 */
    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + r0))), 16))
                          : _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i++) {
        __m512 v = _mm512_i32gather_ps(column, c + i, 4);
        if (bias) v = _mm512_add_ps(v, b);
        _mm256_storeu_si256((__m256i *)(out + (g * AMX_ROWS + i) * stride + r0), bf16_of(v));
    }
}

/* out[i * stride + r] for the 16-row blocks of `weight` this thread is given, then the rows past the last block on
   the AVX-512 path (x: the activations as they are, for those): call inside a parallel region. */
static AMX void linear_rows_amx(const uint16_t *weight, int64_t rows, int64_t cols, const uint16_t *xp,
                                const uint16_t *x, int64_t n, const uint16_t *bias, uint16_t *out, int64_t stride) {
    tile_config config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;
    _tile_loadconfig(&config);
    float c[AMX_ROWS * AMX_ROWS] __attribute__((aligned(64)));
    const int64_t blocks = rows / AMX_BLOCK, groups = (n + AMX_ROWS - 1) / AMX_ROWS, ld = cols * 2;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint16_t *w = weight + b * AMX_BLOCK * cols;
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *xg = xp + g * AMX_ROWS * cols;
            _tile_zero(0);
            for (int64_t k = 0; k < cols; k += 32) {
                _tile_loadd(4, xg + k * AMX_ROWS, 64); /* pairs k/2 .. k/2 + 15 of the group's 16 rows */
                _tile_loadd(5, w + k, ld);
                _tile_dpbf16ps(0, 5, 4);
            }
            _tile_stored(0, c, 64);
            store_group(c, g, n, b * AMX_BLOCK, bias, out, stride);
        }
    }
    _tile_release();
    const int64_t done = blocks * AMX_BLOCK;
    if (done < rows)
        linear_rows_bf16(weight + done * cols, rows - done, cols, x, n, bias ? bias + done : NULL, out + done, stride);
}

#else
static int amx_usable(void) { return 0; }
static uint16_t *pack_pairs(const uint16_t *x, int64_t n, int64_t cols) { return (void)x, (void)n, (void)cols, NULL; }
static uint16_t *pairs_scratch(int64_t n, int64_t cols) { return (void)n, (void)cols, NULL; }
#endif

/* out[i * stride + r] on the AMX path where the activations' pairs `xp` are given, else on the AVX-512 one: call
   inside a parallel region. */
static BF16 void rows_on(const uint16_t *weight, int64_t rows, int64_t cols, const uint16_t *xp, const uint16_t *x,
                         int64_t n, const uint16_t *bias, uint16_t *out, int64_t stride) {
#ifdef HAVE_AMX
    if (xp != NULL) {
        linear_rows_amx(weight, rows, cols, xp, x, n, bias, out, stride);
        return;
    }
#else
    (void)xp;
#endif
    linear_rows_bf16(weight, rows, cols, x, n, bias, out, stride);
}

/* The AVX-512 family's products: on AMX tiles when `amx` (and the pairs' scratch could be had: else on AVX512-BF16,
   the same function), else on AVX512-BF16. */
static BF16 int linear_bf16(const uint16_t *weight, int64_t rows, int64_t cols, const uint16_t *x, int64_t n,
                            const uint16_t *bias, uint16_t *out, int amx) {
    uint16_t *xp = amx ? pack_pairs(x, n, cols) : NULL;
#pragma omp parallel
    rows_on(weight, rows, cols, xp, x, n, bias, out, rows);
    free(xp);
    return 0;
}

static BF16 int silu_expert_bf16(const uint16_t *gate_up, const uint16_t *down, int64_t hidden, int64_t inter,
                                 const uint16_t *x, int64_t n, uint16_t *out, int amx) {
    uint16_t *h = malloc((size_t)(n * 2 * inter * sizeof(uint16_t)));
    uint16_t *p = malloc((size_t)(n * inter * sizeof(uint16_t)));
    /* on AMX the activation's products go straight into the down product's pairs (pp) too */
    uint16_t *xp = amx ? pack_pairs(x, n, hidden) : NULL, *pp = xp ? pairs_scratch(n, inter) : NULL;
    if (h == NULL || p == NULL) {
        free(h);
        free(p);
        free(xp);
        free(pp);
        return -1;
    }
#pragma omp parallel
    {
        rows_on(gate_up, 2 * inter, hidden, xp, x, n, NULL, h, 2 * inter);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n * inter; j++) {
            int64_t i = j / inter, c = j % inter;
            p[j] = silu_product(h[i * 2 * inter + c], h[i * 2 * inter + inter + c]);
            if (pp) pp[pair_index(i, c, inter)] = p[j];
        }
        rows_on(down, hidden, inter, pp, p, n, NULL, out, hidden);
    }
    free(h);
    free(p);
    free(xp);
    free(pp);
    return 0;
}

/* --- the paths, chosen at run time --- */

static int best_isa(void) {
    __builtin_cpu_init();
    if (amx_usable()) return BF16_ISA_AMX;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512bf16"))
        return BF16_ISA_AVX512;
    return BF16_ISA_AVX2; /* native/build.py builds the library only for CPUs with AVX2 and FMA */
}

int fiddler_bf16_isa(void) { return best_isa(); }

/* The path to take for `isa` (0: the best), or 0 when this CPU lacks it. AMX where the CPU has it but the system
   does not hand out its tiles (Linux before 5.16) takes the AVX-512 path. */
static int chosen_isa(int isa) {
    int best = best_isa();
    if (isa == 0) return best;
    if (isa == BF16_ISA_AMX && best < BF16_ISA_AMX) isa = BF16_ISA_AVX512;
    return (isa == BF16_ISA_AVX2 || isa == BF16_ISA_AVX512 || isa == BF16_ISA_AMX) && isa <= best ? isa : 0;
}

/* weight [rows, cols] bfloat16, row-major; x [n, cols] bfloat16; bias [rows] bfloat16 or NULL; out [n, rows]
   bfloat16. cols must be a multiple of 16. isa: 0 for the best path of this CPU, or BF16_ISA_AVX2 / _AVX512 /
   _AMX (which takes the AVX-512 path where cols is not a multiple of 32). Returns 0, -1 when scratch memory cannot
   be had, -2 for an isa this CPU lacks. */
int fiddler_bf16_linear(const uint16_t *weight, int64_t rows, int64_t cols, const uint16_t *x, int64_t n,
                        const uint16_t *bias, uint16_t *out, int isa) {
    isa = chosen_isa(isa);
    if (isa == 0) return -2;
    int amx = isa == BF16_ISA_AMX && cols % 32 == 0;
    return isa >= BF16_ISA_AVX512 ? linear_bf16(weight, rows, cols, x, n, bias, out, amx)
                                  : linear_avx2(weight, rows, cols, x, n, bias, out);
}

/* One gated expert with the SiLU activation, as transformers computes it in bfloat16:
       h = x @ gate_up.T;  gate, up = h[:, :inter], h[:, inter:];  out = (silu(gate) * up) @ down.T
   rounded to bfloat16 where PyTorch rounds (each product, the activation, the elementwise product), all in one
   parallel region, so a decoding step wakes the thread team once per expert instead of once per operation.
   gate_up [2 * inter, hidden], down [hidden, inter], x [n, hidden], out [n, hidden]; hidden and inter multiples
   of 16; isa as for fiddler_bf16_linear. Returns 0, -1 when scratch memory cannot be had, -2 for an isa this CPU
   lacks. */
int fiddler_bf16_silu_expert(const uint16_t *gate_up, const uint16_t *down, int64_t hidden, int64_t inter,
                             const uint16_t *x, int64_t n, uint16_t *out, int isa) {
    isa = chosen_isa(isa);
    if (isa == 0) return -2;
    int amx = isa == BF16_ISA_AMX && hidden % 32 == 0 && inter % 32 == 0;
    return isa >= BF16_ISA_AVX512 ? silu_expert_bf16(gate_up, down, hidden, inter, x, n, out, amx)
                                  : silu_expert_avx2(gate_up, down, hidden, inter, x, n, out);
}

/* The rows of a layer call's token-expert pairs, copied out of the hidden states: dst[i] = src[index[i]], rows of
   row_bytes bytes (the gather that fills a worker's request slot). */
void fiddler_gather_rows(const char *src, int64_t row_bytes, const int64_t *index, int64_t n, char *dst) {
    for (int64_t i = 0; i < n; i++) memcpy(dst + i * row_bytes, src + index[i] * row_bytes, (size_t)row_bytes);
}

/* The experts' outputs weighted and summed over each token's top-k, as transformers' grouped_mm combines them:
       result[t] = bf16(sum over k of outputs[row_of[t * top_k + k]] * weights[t * top_k + k])
   outputs [pairs, hidden] bfloat16 in any row order (row_of says where each pair's row is); weights [tokens *
   top_k] float32 (the product and the sum in float32, one rounding at the end) or bfloat16 (each product rounded
   to bfloat16, the sum in float32 then rounded), PyTorch's type promotion in either case; the sum runs over k in
   order from zero, as PyTorch's reduction over that dimension does. */
void fiddler_combine(const uint16_t *outputs, const int64_t *row_of, const void *weights, int weights_bf16,
                     int64_t tokens, int64_t top_k, int64_t hidden, uint16_t *result) {
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t c = 0; c < hidden; c++) {
            float sum = 0.0f;
            for (int64_t k = 0; k < top_k; k++) {
                int64_t pair = t * top_k + k;
                float v = bf16_to_float(outputs[row_of[pair] * hidden + c]);
                if (weights_bf16)
                    sum += bf16_to_float(float_to_bf16(v * bf16_to_float(((const uint16_t *)weights)[pair])));
                else
                    sum += v * ((const float *)weights)[pair];
            }
            result[t * hidden + c] = float_to_bf16(sum);
        }
}
