/* Weights quantized into the formats of experts/quant.py (int8 as llama.cpp's Q8_0, int4 as its Q4_0: blocks of
   32 weights along a row, one float16 scale each), at memory speed, so that a worker quantizes its shard at its
   first launch in about the time it takes to read it. The same arithmetic as experts/quant.py's
   quantize_reference, bit for bit (tests/test_quant.py holds them equal):

   int8: d = amax / 127 in float32, rounded to float16 to nearest even, or the next float16 up where d * 127 < amax
         (the largest weight would clip); codes round(w / d) (float32 division, halves to even) in [-127, 127].
   int4: m the block's weight of largest magnitude (the first, on a tie), d = |m| / 8 rounded and moved up the same
         way, negated where m > 0 (so that m is code 0, q - 8 = -8); codes clamp(round(w / d) + 8, 0, 15), weight j
         in the low four bits of byte j and weight j + 16 in the high four bits.
   A block with d = 0 has codes 0 (int8) or 8 (int4). Threads: OpenMP, over rows. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "convert.h"
#include "fiddler_native.h"

/* float32 to IEEE half, to nearest even, as PyTorch's .half(): subnormal halves included, too large to infinity. */
static uint16_t float_to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFF;
    if (a >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (a > 0x7F800000 ? 0x200 : 0));
    if (a >= 0x477FF000) return (uint16_t)(sign | 0x7C00); /* 65520 and above round to infinity */
    if (a < 0x38800000) {                                  /* below 2^-14: a subnormal half, round(|f| * 2^24) */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(v * 16777216.0f));
    }
    a -= 112u << 23; /* rebias the exponent from 127 to 15 */
    return (uint16_t)(sign | ((a + 0xFFF + ((a >> 13) & 1)) >> 13));
}

/* The block's float16 scale for `reach` (its largest magnitude) and `top` (127 or 8), moved one step up where
   rounding would clip the largest weight. */
static uint16_t block_scale(float reach, float top) {
    uint16_t d = float_to_half(reach / top);
    if (half_to_float(d) * top < reach) d++; /* float16 bits count up with the value */
    return d;
}

#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* The block's 32 weights as float32 into x; their largest magnitude, and the first weight with it into *m.
   Returns 0, or -3 where a weight is NaN or infinite. */
AVX2 static int load_block(const void *w, int w_bf16, int64_t b, float *x, float *reach, float *m) {
    __m256 top = _mm256_setzero_ps(), finite = _mm256_set1_ps(INFINITY), bad = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        __m256 v = w_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                                (const __m128i *)((const uint16_t *)w + 32 * b + 8 * k))), 16))
                          : _mm256_loadu_ps((const float *)w + 32 * b + 8 * k);
        __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, finite, _CMP_NLT_UQ)); /* infinite or NaN */
        top = _mm256_max_ps(top, a);
        _mm256_storeu_ps(x + 8 * k, v);
    }
    if (!_mm256_testz_ps(bad, bad)) return -3;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    *reach = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    *m = 0.0f;
    for (int k = 0; k < 32; k++)
        if (fabsf(x[k]) == *reach) {
            *m = x[k];
            break;
        }
    return 0;
}

/* round(x / d) for the block's 32 weights (d != 0), clamped to [lo, hi] after adding `offset`. */
AVX2 static void block_codes(const float *x, float d, float offset, float lo, float hi, float *c) {
    for (int k = 0; k < 4; k++) {
        __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + 8 * k), _mm256_set1_ps(d)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, _mm256_set1_ps(offset)), _mm256_set1_ps(lo)),
                          _mm256_set1_ps(hi));
        _mm256_storeu_ps(c + 8 * k, v);
    }
}

/* One row (bfloat16 when w_bf16, else float32), a block at a time. */
AVX2 static int quantize_row(int format, const void *w, int w_bf16, int64_t cols, uint8_t *q, uint16_t *scale) {
    for (int64_t b = 0; b < cols / 32; b++) {
        float x[32], c[32], reach, m;
        if (load_block(w, w_bf16, b, x, &reach, &m) != 0) return -3;
        uint16_t d = block_scale(reach, format == QUANT_INT8 ? 127.0f : 8.0f);
        if ((d & 0x7C00) == 0x7C00) return -3; /* the scale is not finite in float16 */
        if (format == QUANT_INT4 && m > 0) d ^= 0x8000;
        scale[b] = d;
        float df = half_to_float(d);
        if (format == QUANT_INT8) {
            if (df == 0.0f) memset(c, 0, sizeof c);
            else block_codes(x, df, 0.0f, -127.0f, 127.0f, c);
            for (int k = 0; k < 32; k++) q[32 * b + k] = (uint8_t)(int8_t)c[k];
        } else {
            if (df == 0.0f) for (int k = 0; k < 32; k++) c[k] = 8.0f;
            else block_codes(x, df, 8.0f, 0.0f, 15.0f, c);
            for (int k = 0; k < 16; k++) q[16 * b + k] = (uint8_t)((uint8_t)c[k] | (uint8_t)c[k + 16] << 4);
        }
    }
    return 0;
}

/* w [rows, cols] (bfloat16 when w_bf16, else float32) into codes q and float16 scales [rows, cols / 32] in
   `format`. Returns 0, -2 for a format or shape it does not take, -3 where a weight is NaN or infinite or a scale
   too large for float16 (the row is left partly written). */
int fiddler_quantize(int format, const void *w, int w_bf16, int64_t rows, int64_t cols, uint8_t *q,
                     uint16_t *scale) {
    if ((format != QUANT_INT8 && format != QUANT_INT4) || cols <= 0 || cols % 32 != 0 || rows < 0) return -2;
    int64_t row_codes = format == QUANT_INT8 ? cols : cols / 2;
    int status = 0;
#pragma omp parallel for schedule(static) reduction(min : status)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)w + r * cols * (w_bf16 ? 2 : 4);
        int s = quantize_row(format, row, w_bf16, cols, q + r * row_codes, scale + r * (cols / 32));
        if (s < status) status = s;
    }
    return status;
}
