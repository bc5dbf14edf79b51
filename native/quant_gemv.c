/* Products with quantized weights (experts/quant.py describes the formats: int8 as llama.cpp's Q8_0, int4 as its
   Q4_0, blocks of QUANT_BLOCK weights along a row with one float16 scale each) for a few rows of activations.

   out[i, r] = sum_c x[i, c] * w[r, c], w the dequantized weight d * code, accumulated in float32 and rounded once
   to the activations' dtype (bfloat16 or float32). Each dequantized weight is exact in float32 (an 11-bit scale
   times a code of at most 8 bits), so the only difference from the float64 reference is the order and rounding
   of the float32 sums. The activations stay in float32, not quantized per block as llama.cpp's integer dot
   products take them: the kernel computes with exactly the reference's weights and activations. A row of int8
   streams about as fast as bfloat16 does; int4, and several rows, are bound by the float32 multiply-adds, which
   integer dot products would cut (docs/performance-log.md, 2026-12-02).

   A weight row's codes are read once for all the activation rows of the call: each block of 32 weights is
   dequantized into registers, then multiplied with every row. Paths: AVX-512, AVX2 (with FMA and F16C) and plain
   C, chosen at run time (`isa` 0: the best this CPU has; QUANT_ISA_PLAIN, _AVX2 or _AVX512 to ask for one). Threads:
   OpenMP, over weight rows, as bf16_gemv.c. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "fiddler_native.h"

#if QUANT_BLOCK != 32
#error "quant_gemv.c reads blocks of 32 weights, but native/limits.py sets another QUANT_BLOCK"
#endif

#define PIECE_ROWS 16 /* weight rows a thread takes at a time */

static int64_t codes_per_row(int format, int64_t cols) { return format == QUANT_INT8 ? cols : cols / 2; }

/* --- the plain path --- */

/* The 32 weights of block b of a row, dequantized. */
static void block_plain(int format, const uint8_t *codes, float d, float *w) {
    if (format == QUANT_INT8) {
        for (int k = 0; k < 32; k++) w[k] = d * (float)(int8_t)codes[k];
    } else {
        for (int k = 0; k < 16; k++) {
            w[k] = d * (float)((codes[k] & 15) - 8);
            w[k + 16] = d * (float)((codes[k] >> 4) - 8);
        }
    }
}

/* y[i * ystride + r] for weight rows r0 <= r < r1 and activation rows i < n (xs [n, cols] float32). */
static void rows_plain(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int64_t r1, int64_t cols,
                       const float *xs, int64_t n, float *y, int64_t ystride) {
    int64_t blocks = cols / 32, row_codes = codes_per_row(format, cols), block_codes = row_codes / blocks;
    for (int64_t r = r0; r < r1; r++) {
        float acc[MAX_ROWS] = {0}, w[32];
        for (int64_t b = 0; b < blocks; b++) {
            block_plain(format, q + r * row_codes + b * block_codes, half_to_float(scale[r * blocks + b]), w);
            for (int64_t i = 0; i < n; i++)
                for (int k = 0; k < 32; k++) acc[i] += w[k] * xs[i * cols + b * 32 + k];
        }
        for (int64_t i = 0; i < n; i++) y[i * ystride + r] = acc[i];
    }
}

/* --- the AVX2 path --- */

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

AVX2 INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 weights of one block as four vectors of 8, in order, from its scale d and off = -8d: int8 d * q, int4
   d * q + off, both exact (see above). int4 codes: weights 0-7 and 16-23 are the low and high four bits of bytes
   0-7, weights 8-15 and 24-31 those of bytes 8-15. */
AVX2 INLINE void block_avx2(int format, const uint8_t *codes, float scale, float off, __m256 w[4]) {
    __m256 d = _mm256_set1_ps(scale);
    if (format == QUANT_INT8) {
        for (int k = 0; k < 4; k++) {
            __m128i v = _mm_loadl_epi64((const __m128i *)(codes + 8 * k));
            w[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
        }
    } else {
        __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)codes));
        __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8)));
        __m256i nibble = _mm256_set1_epi32(15);
        __m256i parts[4] = {_mm256_and_si256(lo, nibble), _mm256_and_si256(hi, nibble), _mm256_srli_epi32(lo, 4),
                            _mm256_srli_epi32(hi, 4)};
        __m256 o = _mm256_set1_ps(off);
        for (int k = 0; k < 4; k++) w[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[k]), d, o);
    }
}

/* Up to 16 blocks' scales as float32 (d) and -8 d (off), converted together; returns how many. */
AVX2 INLINE int scales_avx2(const uint16_t *scale, int64_t left, float *d, float *off) {
    if (left >= 16) {
        for (int k = 0; k < 2; k++) {
            __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + 8 * k)));
            _mm256_storeu_ps(d + 8 * k, s);
            _mm256_storeu_ps(off + 8 * k, _mm256_mul_ps(s, _mm256_set1_ps(-8.0f)));
        }
        return 16;
    }
    for (int j = 0; j < left; j++) {
        d[j] = _cvtsh_ss(scale[j]);
        off[j] = -8.0f * d[j];
    }
    return (int)left;
}

/* One weight row against N activation rows (N a constant in each instance, so the accumulators stay in
   registers): A independent sums per activation row keep the FMA units busy when N is small. */
AVX2 INLINE void row_avx2(int format, const uint8_t *codes, const uint16_t *scale, int64_t cols, const float *xs,
                          const int N, float *y, int64_t ystride) {
    const int A = N == 1 ? 4 : N <= 4 ? 2 : 1;
    __m256 acc[MAX_ROWS][4];
    for (int i = 0; i < N; i++)
        for (int a = 0; a < A; a++) acc[i][a] = _mm256_setzero_ps();
    int64_t blocks = cols / 32, block_codes = format == QUANT_INT8 ? 32 : 16;
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        float d[16], off[16];
        int count = scales_avx2(scale + b0, blocks - b0, d, off);
        for (int j = 0; j < count; j++) {
            int64_t b = b0 + j;
            __m256 w[4];
            block_avx2(format, codes + b * block_codes, d[j], off[j], w);
            for (int i = 0; i < N; i++)
                for (int k = 0; k < 4; k++)
                    acc[i][k % A] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xs + i * cols + b * 32 + 8 * k),
                                                    acc[i][k % A]);
        }
    }
    for (int i = 0; i < N; i++) {
        __m256 sum = acc[i][0];
        for (int a = 1; a < A; a++) sum = _mm256_add_ps(sum, acc[i][a]);
        y[i * ystride] = hsum8(sum);
    }
}

/* --- the AVX-512 path: the same with vectors of 16 --- */

#define AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

/* int4 codes: weights 0-15 and 16-31 are the low and high four bits of bytes 0-15. d * k + off is exact for the
   codes k as for the weights (the same products). */
AVX512 INLINE void block_avx512(int format, const uint8_t *codes, float scale, float off, __m512 w[2]) {
    __m512 d = _mm512_set1_ps(scale);
    if (format == QUANT_INT8) {
        for (int k = 0; k < 2; k++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(codes + 16 * k));
            w[k] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d);
        }
    } else { /* the block's 16 values d * (k - 8) in a register, looked up by code (vpermps reads 4 index bits) */
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes));
        __m512 k = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512 values = _mm512_fmadd_ps(k, d, _mm512_set1_ps(off));
        w[0] = _mm512_permutexvar_ps(v, values);
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), values);
    }
}

AVX512 INLINE int scales_avx512(const uint16_t *scale, int64_t left, float *d, float *off) {
    if (left >= 16) {
        __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scale));
        _mm512_storeu_ps(d, s);
        _mm512_storeu_ps(off, _mm512_mul_ps(s, _mm512_set1_ps(-8.0f)));
        return 16;
    }
    for (int j = 0; j < left; j++) {
        d[j] = _cvtsh_ss(scale[j]);
        off[j] = -8.0f * d[j];
    }
    return (int)left;
}

/* One step of row_avx512: block b into accumulators (2 * PARITY + k) % A. */
AVX512 INLINE void step_avx512(int format, const uint8_t *codes, float d, float off, int64_t b, int64_t cols,
                               const float *xs, const int N, const int A, const int PARITY, __m512 acc[][4]) {
    __m512 w[2];
    block_avx512(format, codes + b * (format == QUANT_INT8 ? 32 : 16), d, off, w);
    for (int i = 0; i < N; i++)
        for (int k = 0; k < 2; k++) {
            int a = (2 * PARITY + k) % A;
            acc[i][a] = _mm512_fmadd_ps(w[k], _mm512_loadu_ps(xs + i * cols + b * 32 + 16 * k), acc[i][a]);
        }
}

AVX512 INLINE void row_avx512(int format, const uint8_t *codes, const uint16_t *scale, int64_t cols,
                              const float *xs, const int N, float *y, int64_t ystride) {
    const int A = N == 1 ? 4 : N <= 4 ? 2 : 1;
    __m512 acc[MAX_ROWS][4];
    for (int i = 0; i < N; i++)
        for (int a = 0; a < A; a++) acc[i][a] = _mm512_setzero_ps();
    int64_t blocks = cols / 32;
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        float d[16], off[16];
        int count = scales_avx512(scale + b0, blocks - b0, d, off), j = 0;
        for (; j + 1 < count; j += 2) { /* two blocks a step: four independent sums for one row */
            step_avx512(format, codes, d[j], off[j], b0 + j, cols, xs, N, A, 0, acc);
            step_avx512(format, codes, d[j + 1], off[j + 1], b0 + j + 1, cols, xs, N, A, 1, acc);
        }
        if (j < count) step_avx512(format, codes, d[j], off[j], b0 + j, cols, xs, N, A, 0, acc);
    }
    for (int i = 0; i < N; i++) {
        __m512 sum = acc[i][0];
        for (int a = 1; a < A; a++) sum = _mm512_add_ps(sum, acc[i][a]);
        y[i * ystride] = _mm512_reduce_add_ps(sum);
    }
}

#define ROW_CASE(ROW, FORMAT, N) \
    case N: ROW(FORMAT, q + r * row_codes, scale + r * blocks, cols, xs, N, y + r, ystride); break;
#define ROW_SWITCH(ROW, FORMAT)                                                                                \
    switch (n) {                                                                                               \
        ROW_CASE(ROW, FORMAT, 1) ROW_CASE(ROW, FORMAT, 2) ROW_CASE(ROW, FORMAT, 3) ROW_CASE(ROW, FORMAT, 4)  \
        ROW_CASE(ROW, FORMAT, 5) ROW_CASE(ROW, FORMAT, 6) ROW_CASE(ROW, FORMAT, 7) ROW_CASE(ROW, FORMAT, 8)  \
    }

#if MAX_ROWS != 8
#error "rows_avx2 and rows_avx512 have a case for each row count up to 8; native/limits.py's MAX_ROWS differs"
#endif

AVX2 static void rows_avx2(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int64_t r1,
                           int64_t cols, const float *xs, int64_t n, float *y, int64_t ystride) {
    int64_t blocks = cols / 32, row_codes = codes_per_row(format, cols);
    for (int64_t r = r0; r < r1; r++) {
        if (format == QUANT_INT8) {
            ROW_SWITCH(row_avx2, QUANT_INT8)
        } else {
            ROW_SWITCH(row_avx2, QUANT_INT4)
        }
    }
}

AVX512 static void rows_avx512(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int64_t r1,
                               int64_t cols, const float *xs, int64_t n, float *y, int64_t ystride) {
    int64_t blocks = cols / 32, row_codes = codes_per_row(format, cols);
    for (int64_t r = r0; r < r1; r++) {
        if (format == QUANT_INT8) {
            ROW_SWITCH(row_avx512, QUANT_INT8)
        } else {
            ROW_SWITCH(row_avx512, QUANT_INT4)
        }
    }
}

AVX2 static void dequantize_avx2(int format, const uint8_t *codes, const uint16_t *scale, int64_t blocks,
                                 float *out) {
    int64_t block_codes = format == QUANT_INT8 ? 32 : 16;
    for (int64_t b = 0; b < blocks; b++) {
        __m256 w[4];
        float d = _cvtsh_ss(scale[b]);
        block_avx2(format, codes + b * block_codes, d, -8.0f * d, w);
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + b * 32 + 8 * k, w[k]);
    }
}

/* --- choosing a path, and the calls --- */

static int best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return QUANT_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return QUANT_ISA_AVX2;
    return QUANT_ISA_PLAIN;
}

int fiddler_quant_isa(void) { return best_isa(); }

/* The path to take for `isa`, or 0 when the arguments are not ones these kernels take. */
static int checked(int format, int64_t cols, int64_t n, int isa) {
    if ((format != QUANT_INT8 && format != QUANT_INT4) || cols <= 0 || cols % 32 != 0 || n < 0 || n > MAX_ROWS)
        return 0;
    int best = best_isa();
    if (isa == 0) return best;
    return (isa == QUANT_ISA_PLAIN || isa == QUANT_ISA_AVX2 || isa == QUANT_ISA_AVX512) && isa <= best ? isa : 0;
}

/* y [n, rows] float32 for weight rows `rows` of q; call inside a parallel region (ends with a barrier). */
static void quant_rows(int format, int isa, const uint8_t *q, const uint16_t *scale, int64_t rows, int64_t cols,
                       const float *xs, int64_t n, float *y) {
    int64_t pieces = (rows + PIECE_ROWS - 1) / PIECE_ROWS;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pieces; p++) {
        int64_t r0 = p * PIECE_ROWS, r1 = r0 + PIECE_ROWS < rows ? r0 + PIECE_ROWS : rows;
        if (isa == QUANT_ISA_AVX512)
            rows_avx512(format, q, scale, r0, r1, cols, xs, n, y, rows);
        else if (isa == QUANT_ISA_AVX2)
            rows_avx2(format, q, scale, r0, r1, cols, xs, n, y, rows);
        else
            rows_plain(format, q, scale, r0, r1, cols, xs, n, y, rows);
    }
}

static float *float_rows(const void *x, int x_bf16, int64_t count) {
    float *xs = aligned_alloc(64, (size_t)(count * sizeof(float) + 63) / 64 * 64);
    if (xs == NULL) return NULL;
    for (int64_t j = 0; j < count; j++)
        xs[j] = x_bf16 ? bf16_to_float(((const uint16_t *)x)[j]) : ((const float *)x)[j];
    return xs;
}

/* y (float32) into out, rounded to bfloat16 when out_bf16; call inside a parallel region. */
static void store(const float *y, int64_t count, int out_bf16, void *out) {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < count; j++) {
        if (out_bf16)
            ((uint16_t *)out)[j] = float_to_bf16(y[j]);
        else
            ((float *)out)[j] = y[j];
    }
}

/* out [n, rows] = x [n, cols] @ w.T for a quantized weight w [rows, cols] (codes q, float16 scales), x and out
   bfloat16 (x_bf16) or float32; n at most MAX_ROWS, cols a multiple of 32. Returns 0, -1 when scratch memory cannot
   be had, -2 for arguments it does not take (format, shape, or an isa this CPU lacks). */
int fiddler_quant_linear(int format, const uint8_t *q, const uint16_t *scale, int64_t rows, int64_t cols,
                         const void *x, int x_bf16, int64_t n, void *out, int isa) {
    isa = checked(format, cols, n, isa);
    if (isa == 0) return -2;
    float *xs = float_rows(x, x_bf16, n * cols), *y = x_bf16 ? malloc((size_t)(n * rows) * sizeof(float)) : out;
    if (xs == NULL || y == NULL) {
        free(xs);
        if (x_bf16) free(y);
        return -1;
    }
#pragma omp parallel
    {
        quant_rows(format, isa, q, scale, rows, cols, xs, n, y);
        if (x_bf16) store(y, n * rows, 1, out);
    }
    free(xs);
    if (x_bf16) free(y);
    return 0;
}

/* One gated SiLU expert with quantized weights, as transformers computes it with the dequantized ones:
       h = x @ gate_up.T;  gate, up = h[:, :inter], h[:, inter:];  out = (silu(gate) * up) @ down.T
   rounded to the activations' dtype where PyTorch rounds (each product, the activation, the elementwise product;
   nothing to round in float32), in one parallel region. gate_up [2 * inter, hidden] and down [hidden, inter] in
   `format`; x and out [n, hidden], bfloat16 (x_bf16) or float32; hidden and inter multiples of 32. Returns as
   fiddler_quant_linear. */
int fiddler_quant_silu_expert(int format, const uint8_t *gate_up, const uint16_t *gate_up_scale,
                              const uint8_t *down, const uint16_t *down_scale, int64_t hidden, int64_t inter,
                              const void *x, int x_bf16, int64_t n, void *out, int isa) {
    isa = checked(format, hidden, n, isa);
    if (isa == 0 || checked(format, inter, n, isa) == 0) return -2;
    float *xs = float_rows(x, x_bf16, n * hidden);
    float *h = malloc((size_t)(n * 2 * inter) * sizeof(float));
    float *ps = aligned_alloc(64, (size_t)(n * inter * sizeof(float) + 63) / 64 * 64);
    float *y = x_bf16 ? malloc((size_t)(n * hidden) * sizeof(float)) : out;
    if (xs == NULL || h == NULL || ps == NULL || y == NULL) {
        free(xs);
        free(h);
        free(ps);
        if (x_bf16) free(y);
        return -1;
    }
#pragma omp parallel
    {
        quant_rows(format, isa, gate_up, gate_up_scale, 2 * inter, hidden, xs, n, h);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n * inter; j++) {
            int64_t i = j / inter, c = j % inter;
            float g = h[i * 2 * inter + c], u = h[i * 2 * inter + inter + c];
            if (x_bf16) {
                g = bf16_to_float(float_to_bf16(g));
                u = bf16_to_float(float_to_bf16(u));
                float a = bf16_to_float(float_to_bf16(g / (1.0f + expf(-g))));
                ps[j] = bf16_to_float(float_to_bf16(a * u));
            } else {
                ps[j] = g / (1.0f + expf(-g)) * u;
            }
        }
        quant_rows(format, isa, down, down_scale, hidden, inter, ps, n, y);
        if (x_bf16) store(y, n * hidden, 1, out);
    }
    free(xs);
    free(h);
    free(ps);
    if (x_bf16) free(y);
    return 0;
}

/* out [rows, cols] float32 = the dequantized weights (the prefill path multiplies such tiles). Returns 0, or -2
   for a format or shape these kernels do not take. */
int fiddler_quant_dequantize(int format, const uint8_t *q, const uint16_t *scale, int64_t rows, int64_t cols,
                             float *out) {
    int isa = checked(format, cols, 0, 0);
    if (isa == 0) return -2;
    int64_t blocks = cols / 32, row_codes = codes_per_row(format, cols);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (isa >= QUANT_ISA_AVX2) {
            dequantize_avx2(format, q + r * row_codes, scale + r * blocks, blocks, out + r * cols);
        } else {
            for (int64_t b = 0; b < blocks; b++)
                block_plain(format, q + r * row_codes + b * (row_codes / blocks), half_to_float(scale[r * blocks + b]),
                            out + r * cols + b * 32);
        }
    }
    return 0;
}
