/* Products with quantized weights (experts/quant.py describes the formats: int8 as llama.cpp's Q8_0, int4 as its
   Q4_0, blocks of QUANT_BLOCK = 32 weights along a row with one float16 scale each), by integer dot products as
   llama.cpp computes them.

   The activations are quantized too, once per call, each row per block of 32 (`quantize_row`, the same arithmetic
   as experts/quant.py's quantize_activations, bit for bit): dx = amax / 127 in float32, codes round(x / dx) in
   [-127, 127]. Then each block's dot product of weight codes and activation codes is an exact integer, and one
   float multiply-add per block adds it with the two scales:

       out[i, r] = sum_b dw[r, b] * dx[i, b] * sum_{c in b} wq[r, c] * xq[i, c]

   accumulated in float32 and rounded once to the activations' dtype. Its exact reference is the same sum in
   float64 (experts/quant.py's reference_linear); the kernel differs from it only by the float32 products of scales
   and integers and by the order of the float32 sums.

   The integer instructions multiply unsigned by signed bytes, so one side is made unsigned: the weights' codes
   (int8 codes + 128; int4 codes as stored, 0..15), the activations signed; the products then carry K * sum of the
   block's activation codes too (K = 128 for int8, 8 for int4), taken off by starting each block's integer sum at
   -K * sum(xq), computed once per call with the activations.

   Paths, chosen at run time in one place (`best_isa`; `isa` 0 asks for the best, QUANT_ISA_* for one):
   - AVX-512 with VNNI (vpdpbusd: 64 byte products a instruction). Decoding (up to 6 rows, 8 for int4:
     `vnni_decodes`): a weight row's codes 64 bytes a step (2 blocks of int8, 4 of int4), prefetched far ahead,
     against each row (`row_vnni`). More rows: a thread's 32 weight rows packed into two panels whose vectors hold
     one 4-code word of each of 16 rows, each activation row's words broadcast to them, tiles of 32 weight rows x
     6 activation rows with their sums in registers (`tile_vnni`).
   - AVX2 (vpmaddubsw + vpmaddwd, llama.cpp's AVX2 method: |w| times x with w's sign), one weight row's block
     against up to MAX_ROWS rows at a time (int4: two blocks a step, unsigned, `row_avx2_int4`); more rows as the
     VNNI path's tiles, with 8-row panels (`tile_avx2`).
   - plain C, the same sums.
   Threads: OpenMP, over pieces of weight rows. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "fiddler_native.h"

#if QUANT_BLOCK != 32
#error "quant_gemv.c reads blocks of 32 weights, but native/limits.py sets another QUANT_BLOCK"
#endif

#define PANEL 16                     /* weight rows of a packed panel: one vector's lanes */
#define PANEL_BLOCK (8 * 64 + 16 * 4) /* bytes of one block of a panel: 8 vectors of codes, 16 float scales */
#define TILE_P 2                     /* panels of a prefill tile */
#define TILE_N 6                     /* activation rows of a prefill tile */
#define PIECE_ROWS (TILE_P * PANEL)  /* weight rows a thread takes at a time */
#define PIECE_BYTES(blocks) ((blocks) * TILE_P * PANEL_BLOCK) /* a thread's packed panels, on either path */
/* Decoding (both SIMD paths) prefetches the weights' codes DECODE_AHEAD bytes ahead of those it reads, and their
   scales as far ahead, into the rows that follow (a thread's rows follow one another in memory). The hardware
   prefetchers alone kept one row of mini's expert at about 25 GB/s (int4) on the Zen 5 VM; prefetching 1 KiB
   ahead was no faster, 4 KiB 1.2x, 16 KiB 1.5x, 32 and 64 KiB 1.7x, past the 37 GB/s torch.sum reads
   (docs/performance-log.md). */
#define DECODE_AHEAD 32768
#define INLINE static inline __attribute__((always_inline))
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

static int64_t codes_per_row(int format, int64_t cols) { return format == QUANT_INT8 ? cols : cols / 2; }
static void *scratch(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* --- the activations, quantized per block --- */

/* One row's blocks: codes q [cols] and scales d [cols / 32]. float32 multiply, nearest-even rounding: the same
   numbers on every path and in experts/quant.py. */
static void quantize_row_plain(const float *x, int64_t cols, int8_t *q, float *d) {
    for (int64_t b = 0; b < cols / 32; b++) {
        float amax = 0.0f;
        for (int k = 0; k < 32; k++) amax = fmaxf(amax, fabsf(x[32 * b + k]));
        float scale = amax / 127.0f, inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        d[b] = scale;
        for (int k = 0; k < 32; k++) q[32 * b + k] = (int8_t)nearbyintf(x[32 * b + k] * inverse);
    }
}

AVX2 static void quantize_row_avx2(const float *x, int64_t cols, int8_t *q, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < cols / 32; b++) {
        __m256 v[4], m = _mm256_setzero_ps();
        _Pragma("GCC unroll 16")
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 32 * b + 8 * k);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float scale = _mm_cvtss_f32(h) / 127.0f, inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        d[b] = scale;
        __m256i i[4];
        _Pragma("GCC unroll 16")
        for (int k = 0; k < 4; k++) /* cvtps rounds to nearest even, as nearbyintf */
            i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(inverse)));
        __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* packs work per lane */
        _mm256_storeu_si256((__m256i *)(q + 32 * b), w);
    }
}

/* The activation rows of one call: codes, scales and each block's code sum, and the copies laid out for the path
   that reads them. */
typedef struct {
    int64_t n, cols, blocks;
    int8_t *q;    /* [n, cols] */
    float *d;     /* [n, blocks] */
    int32_t *k;   /* [n, blocks]: -K * the block's code sum */
    /* VNNI decoding, and int4 decoding on AVX2: per unit of a weight row's blocks (unit_blocks: the blocks of 64
       bytes of codes) and row, the codes in the order of the weights' vectors (unit_bytes) and 16 starting sums
       in their lanes */
    int8_t *pq;
    int32_t *pk;
    /* prefill (VNNI, and AVX2 beyond MAX_ROWS rows): each thread's packed panels of weight rows (pack_panel,
       pack_panel_avx2), PIECE_BYTES(blocks) a thread */
    uint8_t *panels;
} acts;

/* The VNNI decoding path reads a weight row 64 bytes of codes at a time: a unit of 2 blocks of int8 (one vector
   of codes), 4 of int4 (two vectors: the low nibbles, then the high ones); int4 on AVX2 takes a unit in two
   halves. */
static int unit_blocks(int format) { return format == QUANT_INT8 ? 2 : 4; }
static int64_t units_of(int format, int64_t blocks) { return (blocks + unit_blocks(format) - 1) / unit_blocks(format); }
static int64_t unit_bytes(int format) { return format == QUANT_INT8 ? 64 : 128; }

static void free_acts(acts *a) {
    free(a->q), free(a->d), free(a->k), free(a->pq), free(a->pk), free(a->panels);
    memset(a, 0, sizeof *a);
}

/* Whether the VNNI path takes n rows as decoding (each weight row's blocks against each row) rather than as
   prefill (packed panels, tiles of rows): up to 6 rows, 8 for int4, where decoding was measured faster (one
   expert of mini, the weights from memory, one thread: int8 5 rows 0.72x the tiles' time, 6 rows 0.96x, 7-8 rows
   1.12-1.16x; int4 5-8 rows 0.59-0.73x; docs/performance-log.md). */
static int vnni_decodes(int format, int64_t n) { return n <= (format == QUANT_INT4 ? 8 : 6); }

/* Allocates what `prepare_acts` fills; 0, or -1 when there is no memory. */
static int alloc_acts(acts *a, int format, int isa, int64_t n, int64_t cols) {
    int64_t blocks = cols / 32, units = units_of(format, blocks);
    memset(a, 0, sizeof *a);
    a->n = n, a->cols = cols, a->blocks = blocks;
    a->q = scratch((size_t)(n * cols));
    a->d = scratch((size_t)(n * blocks) * 4), a->k = scratch((size_t)(n * blocks) * 4);
    int ok = a->q && a->d && a->k;
    if ((isa == QUANT_ISA_AVX512 && vnni_decodes(format, n)) || (isa == QUANT_ISA_AVX2 && format == QUANT_INT4
                                                                  && n <= MAX_ROWS)) {
        a->pq = scratch((size_t)(n * units * unit_bytes(format))), a->pk = scratch((size_t)(n * units) * 64);
        ok = ok && a->pq && a->pk;
    } else if (isa == QUANT_ISA_AVX512 || (isa == QUANT_ISA_AVX2 && n > MAX_ROWS)) {
        /* a parallel region started after this has no more threads than this says */
        a->panels = scratch((size_t)omp_get_max_threads() * (size_t)PIECE_BYTES(blocks));
        ok = ok && a->panels;
    }
    if (!ok) free_acts(a);
    return ok ? 0 : -1;
}

/* Row i of `a` from row i of xs [n, cols] float32: its codes, scales and sums, and the decoding path's copies. */
static void prepare_row(acts *a, int format, int isa, const float *xs, int64_t i) {
    int64_t n = a->n, cols = a->cols, blocks = a->blocks;
    int32_t K = format == QUANT_INT8 ? 128 : 8;
    {
        if (isa >= QUANT_ISA_AVX2)
            quantize_row_avx2(xs + i * cols, cols, a->q + i * cols, a->d + i * blocks);
        else
            quantize_row_plain(xs + i * cols, cols, a->q + i * cols, a->d + i * blocks);
        for (int64_t b = 0; b < blocks; b++) {
            int32_t sum = 0;
            for (int c = 0; c < 32; c++) sum += a->q[i * cols + 32 * b + c];
            a->k[i * blocks + b] = -K * sum;
        }
        if (a->pq) { /* blocks past the row's last: zero codes and sums */
            int64_t units = units_of(format, blocks), ub = unit_bytes(format), per = unit_blocks(format);
            for (int64_t u = 0; u < units; u++) {
                int8_t *pq = a->pq + (u * n + i) * ub;
                int32_t *pk = a->pk + (u * n + i) * 16;
                memset(pq, 0, (size_t)ub), memset(pk, 0, 64);
                for (int64_t h = 0; h < per && per * u + h < blocks; h++) {
                    int64_t b = per * u + h;
                    const int8_t *codes = a->q + i * cols + 32 * b;
                    if (format == QUANT_INT8) { /* codes in order: lanes 8h .. 8h + 7 */
                        memcpy(pq + 32 * h, codes, 32);
                        pk[8 * h] = a->k[i * blocks + b];
                    } else { /* codes 0-15 in lanes 4h .. 4h + 3 of the first vector, 16-31 in the second's */
                        memcpy(pq + 16 * h, codes, 16), memcpy(pq + 64 + 16 * h, codes + 16, 16);
                        pk[4 * h] = a->k[i * blocks + b];
                    }
                }
            }
        }
    }
}

/* Row i of x [n, cols] (bfloat16 when x_bf16, else float32) into xs as float32. */
static void float_row(const void *x, int x_bf16, int64_t cols, int64_t i, float *xs) {
    for (int64_t j = i * cols; j < (i + 1) * cols; j++)
        xs[j] = x_bf16 ? bf16_to_float(((const uint16_t *)x)[j]) : ((const float *)x)[j];
}

/* Whether the threads share the preparing of n rows: for prefill; a few decoding rows are prepared on the calling
   thread, since a parallel region's barriers would cost more than preparing them there on a busy machine. */
static int shared_preparing(int64_t n) { return n > MAX_ROWS; }

/* Fills `a` from x [n, cols] (bfloat16 when x_bf16, else float32), through xs (n * cols floats): on the calling
   thread outside a parallel region, or shared among the threads inside one (then ends with a barrier). */
static void prepare_acts(acts *a, int format, int isa, const void *x, int x_bf16, float *xs) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a->n; i++) {
        float_row(x, x_bf16, a->cols, i, xs);
        prepare_row(a, format, isa, xs, i);
    }
}

/* --- the plain path --- */

/* Weight code c of a row (signed: q, or q - 8 for int4). */
static int weight_code(int format, const uint8_t *codes, int64_t c) {
    if (format == QUANT_INT8) return (int8_t)codes[c];
    uint8_t byte = codes[(c / 32) * 16 + c % 16];
    return (c % 32 < 16 ? byte & 15 : byte >> 4) - 8;
}

static void rows_plain(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int64_t r1, const acts *a,
                       float *y, int64_t ystride) {
    int64_t cols = a->cols, blocks = a->blocks, row_codes = codes_per_row(format, cols);
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < a->n; i++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                int32_t sum = 0;
                for (int c = 0; c < 32; c++)
                    sum += weight_code(format, q + r * row_codes, 32 * b + c) * a->q[i * cols + 32 * b + c];
                acc += half_to_float(scale[r * blocks + b]) * a->d[i * blocks + b] * (float)sum;
            }
            y[i * ystride + r] = acc;
        }
}

/* --- the AVX2 path --- */

AVX2 INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 signed codes of a weight block, in order. */
AVX2 INLINE __m256i block_avx2(int format, const uint8_t *codes) {
    if (format == QUANT_INT8) return _mm256_loadu_si256((const __m256i *)codes);
    __m128i v = _mm_loadu_si128((const __m128i *)codes), nibble = _mm_set1_epi8(15);
    __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nibble), _mm_and_si128(v, nibble));
    return _mm256_sub_epi8(w, _mm256_set1_epi8(8));
}

/* One weight row against N activation rows (a constant in each instance: the sums stay in registers). */
AVX2 INLINE void row_avx2(int format, const uint8_t *codes, const uint16_t *scale, const acts *a, int64_t i0,
                          const int N, float *y, int64_t ystride) {
    __m256 acc[MAX_ROWS];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t blocks = a->blocks, block_codes = format == QUANT_INT8 ? 32 : 16;
    for (int64_t b = 0; b < blocks; b++) {
        if (b % (64 / block_codes) == 0) /* a line of codes a step, a line of scales every 16 or 32 steps */
            _mm_prefetch((const char *)(codes + b * block_codes) + DECODE_AHEAD, _MM_HINT_T0);
        if (b % 32 == 0) _mm_prefetch((const char *)(scale + b) + DECODE_AHEAD * 2 / block_codes, _MM_HINT_T0);
        __m256i w = block_avx2(format, codes + b * block_codes), aw = _mm256_sign_epi8(w, w);
        float dw = _cvtsh_ss(scale[b]);
        _Pragma("GCC unroll 16")
        for (int i = 0; i < N; i++) {
            int64_t row = i0 + i;
            __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + row * a->cols + 32 * b));
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), ones);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a->d[row * blocks + b]), acc[i]);
        }
    }
    _Pragma("GCC unroll 16")
    for (int i = 0; i < N; i++) y[i * ystride] = hsum8(acc[i]);
}

#define ROW_CASE(ROW, FORMAT, N) \
    case N: ROW(FORMAT, q + r * row_codes, scale + r * blocks, a, i0, N, y + i0 * ystride + r, ystride); break;
#define ROW_SWITCH(ROW, FORMAT)                                                                                \
    switch (n) {                                                                                               \
        ROW_CASE(ROW, FORMAT, 1) ROW_CASE(ROW, FORMAT, 2) ROW_CASE(ROW, FORMAT, 3) ROW_CASE(ROW, FORMAT, 4)  \
        ROW_CASE(ROW, FORMAT, 5) ROW_CASE(ROW, FORMAT, 6) ROW_CASE(ROW, FORMAT, 7) ROW_CASE(ROW, FORMAT, 8)  \
    }

/* Blocks b0 .. b0 + count (count <= 8) of one int4 weight row against N activation rows, added to acc. */
AVX2 INLINE void group_avx2_int4(const uint8_t *codes, const uint16_t *scale, const acts *a, int64_t b0,
                                 const int count, const int N, __m256 *acc) {
    const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(15);
    int64_t blocks = a->blocks, n = a->n;
    if (b0 % 32 == 0) _mm_prefetch((const char *)(scale + b0) + DECODE_AHEAD / 8, _MM_HINT_T0);
    __m256 dw, f[MAX_ROWS];
    if (count == 8) {
        dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + b0)));
    } else { /* the row's last blocks; the others' scales 0 */
        uint16_t last[8] = {0};
        memcpy(last, scale + b0, (size_t)count * 2);
        dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)last));
    }
    __m256i present = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _Pragma("GCC unroll 16") for (int i = 0; i < N; i++)
        f[i] = _mm256_mul_ps(dw, _mm256_maskload_ps(a->d + i * blocks + b0, present));
    _Pragma("GCC unroll 4") for (int j = 0; 2 * j < count; j++) {
        int64_t b = b0 + 2 * j, u = b / 4, half = (b / 2) % 2;
        if (b % 4 == 0) _mm_prefetch((const char *)(codes + 16 * b) + DECODE_AHEAD, _MM_HINT_T0);
        __m256i v = count - 2 * j >= 2 ? _mm256_loadu_si256((const __m256i *)(codes + 16 * b))
                                       : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(codes + 16 * b)));
        __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        __m256i lanes = _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1);
        _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) {
            const int8_t *x = a->pq + (u * n + i) * 128 + 32 * half;
            const int32_t *k = a->pk + (u * n + i) * 16 + 8 * half;
            __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)x)),
                                             _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(x + 64))));
            __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), _mm256_load_si256((const __m256i *)k));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_permutevar8x32_ps(f[i], lanes), acc[i]);
        }
    }
}

/* int4 on AVX2: two blocks a step (one load of 32 bytes of codes, its low and its high nibbles against the
   activations' copies that the VNNI decoding path reads: a unit of 4 blocks is two steps), the codes unsigned as
   stored, each block's sum starting at -8 * sum(xq); the scales' products 8 blocks at a time, as the VNNI path
   takes them 16 at a time. vpmaddubsw cannot saturate: 2 x 15 x 127 twice is under 2^15. */
AVX2 INLINE void row_avx2_int4(int format, const uint8_t *codes, const uint16_t *scale, const acts *a, int64_t i0,
                               const int N, float *y, int64_t ystride) {
    (void)format, (void)i0; /* QUANT_INT4; all of the call's rows (at most MAX_ROWS) */
    __m256 acc[MAX_ROWS];
    _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    int64_t blocks = a->blocks, b0 = 0;
    for (; b0 + 8 <= blocks; b0 += 8) group_avx2_int4(codes, scale, a, b0, 8, N, acc);
    if (b0 < blocks) group_avx2_int4(codes, scale, a, b0, (int)(blocks - b0), N, acc);
    _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) y[i * ystride] = hsum8(acc[i]);
}

#if MAX_ROWS != 8
#error "rows_avx2 and rows_vnni have a case for each row count up to 8; native/limits.py's MAX_ROWS differs"
#endif

/* Weight rows r0 <= r < r1 against every activation row, MAX_ROWS rows at a time. */
AVX2 static void rows_avx2(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int64_t r1,
                           const acts *a, float *y, int64_t ystride) {
    int64_t blocks = a->blocks, row_codes = codes_per_row(format, a->cols);
    for (int64_t i0 = 0; i0 < a->n; i0 += MAX_ROWS) {
        int64_t n = a->n - i0 < MAX_ROWS ? a->n - i0 : MAX_ROWS;
        for (int64_t r = r0; r < r1; r++) {
            if (format == QUANT_INT8) {
                ROW_SWITCH(row_avx2, QUANT_INT8)
            } else {
                ROW_SWITCH(row_avx2_int4, QUANT_INT4)
            }
        }
    }
}

/* Prefill on AVX2, as the VNNI path's (below) with 8-row panels: a vector holds one 4-code word of each of 8 rows,
   a panel's block is 8 such vectors and the 8 rows' float32 scales (PANEL_BLOCK_AVX2 bytes). int8 codes stay
   signed and take llama.cpp's sign trick (|w| times x with w's sign: vpmaddubsw cannot saturate), each word's
   pairs summed to 32 bits (vpmaddwd) at once; int4 codes (0..15) are unsigned as they are, so a block's 8 words
   add up in 16 bits without overflow (8 x 2 x 15 x 127 < 2^15) and are widened once. */
#define PANEL_AVX2 8
#define PANEL_BLOCK_AVX2 (8 * 32 + 8 * 4)
#define TILE_N_AVX2 4

/* The 8x8 transpose of 32-bit words: word c of row r into vector c, lane r. */
AVX2 INLINE void transpose_words_avx2(__m256i v[8]) {
    __m256i t[8], u[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_epi32(v[j], v[j + 1]);
        t[j + 1] = _mm256_unpackhi_epi32(v[j], v[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {
        u[j] = _mm256_unpacklo_epi64(t[j], t[j + 2]);
        u[j + 1] = _mm256_unpackhi_epi64(t[j], t[j + 2]);
        u[j + 2] = _mm256_unpacklo_epi64(t[j + 1], t[j + 3]);
        u[j + 3] = _mm256_unpackhi_epi64(t[j + 1], t[j + 3]);
    }
    for (int c = 0; c < 4; c++) {
        v[c] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x20);
        v[c + 4] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x31);
    }
}

/* Weight rows r0 .. r0 + count (count <= 8) packed into `panel` (blocks * PANEL_BLOCK_AVX2 bytes): int8 codes as
   stored, int4 codes unpacked to bytes 0..15; missing rows zero. */
AVX2 static void pack_panel_avx2(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int count,
                                 int64_t blocks, int64_t row_codes, uint8_t *panel) {
    for (int64_t b = 0; b < blocks; b++) {
        __m256i v[8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *codes = q + (r0 + r) * row_codes;
            if (r >= count) {
                v[r] = _mm256_setzero_si256();
            } else if (format == QUANT_INT8) {
                v[r] = _mm256_loadu_si256((const __m256i *)(codes + 32 * b));
            } else {
                __m128i x = _mm_loadu_si128((const __m128i *)(codes + 16 * b)), nibble = _mm_set1_epi8(15);
                v[r] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), nibble), _mm_and_si128(x, nibble));
            }
        }
        transpose_words_avx2(v);
        uint8_t *out = panel + b * PANEL_BLOCK_AVX2;
        for (int c = 0; c < 8; c++) _mm256_storeu_si256((__m256i *)(out + 32 * c), v[c]);
        for (int r = 0; r < 8; r++)
            ((float *)(out + 256))[r] = r < count ? _cvtsh_ss(scale[(r0 + r) * blocks + b]) : 0.0f;
    }
}

/* One packed panel against activation rows i0 .. i0 + N; out lanes past `count` rows are not stored. Per block:
   int8 sums start at 0 (the sign trick's products are the signed ones), int4 sums at -8 * sum(xq); then added
   with the two scales as every path does: acc += float(sum) * (dw * dx). */
AVX2 INLINE void tile_avx2(int format, const uint8_t *panel, const acts *a, int64_t i0, const int N, int count,
                           float *y, int64_t ystride) {
    int64_t blocks = a->blocks, cols = a->cols;
    const int8_t *xq = a->q + i0 * cols;
    const float *xd = a->d + i0 * blocks;
    const int32_t *xk = a->k + i0 * blocks;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[TILE_N_AVX2];
    _Pragma("GCC unroll 8") for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *w = panel + b * PANEL_BLOCK_AVX2;
        __m256i sum[TILE_N_AVX2];
        if (format == QUANT_INT8) {
            _Pragma("GCC unroll 8") for (int i = 0; i < N; i++) sum[i] = _mm256_setzero_si256();
            _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * c)), aw = _mm256_sign_epi8(wv, wv);
                _Pragma("GCC unroll 8") for (int i = 0; i < N; i++) {
                    int32_t word;
                    memcpy(&word, xq + i * cols + 32 * b + 4 * c, 4);
                    __m256i x = _mm256_sign_epi8(_mm256_set1_epi32(word), wv);
                    sum[i] = _mm256_add_epi32(sum[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, x), ones));
                }
            }
        } else {
            __m256i pairs[TILE_N_AVX2];
            _Pragma("GCC unroll 8") for (int i = 0; i < N; i++) pairs[i] = _mm256_setzero_si256();
            _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * c));
                _Pragma("GCC unroll 8") for (int i = 0; i < N; i++) {
                    int32_t word;
                    memcpy(&word, xq + i * cols + 32 * b + 4 * c, 4);
                    pairs[i] = _mm256_add_epi16(pairs[i], _mm256_maddubs_epi16(wv, _mm256_set1_epi32(word)));
                }
            }
            _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)
                sum[i] = _mm256_add_epi32(_mm256_madd_epi16(pairs[i], ones), _mm256_set1_epi32(xk[i * blocks + b]));
        }
        __m256 dw = _mm256_loadu_ps((const float *)(w + 256));
        _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i]), _mm256_mul_ps(_mm256_set1_ps(xd[i * blocks + b]), dw),
                                     acc[i]);
    }
    __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes);
    _Pragma("GCC unroll 8") for (int i = 0; i < N; i++) _mm256_maskstore_ps(y + (i0 + i) * ystride, mask, acc[i]);
}

/* Weight rows r0 <= r < r1 (at most PIECE_ROWS) against every activation row: each 8-row panel packed into this
   thread's buffer, then TILE_N_AVX2 activation rows at a time. */
AVX2 static void rows_avx2_prefill(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int64_t r1,
                                   const acts *a, float *y, int64_t ystride) {
    int64_t blocks = a->blocks, row_codes = codes_per_row(format, a->cols);
    uint8_t *panel = a->panels + (int64_t)omp_get_thread_num() * PIECE_BYTES(blocks);
    for (int64_t p0 = r0; p0 < r1; p0 += PANEL_AVX2) {
        int count = r1 - p0 < PANEL_AVX2 ? (int)(r1 - p0) : PANEL_AVX2;
        pack_panel_avx2(format, q, scale, p0, count, blocks, row_codes, panel);
        for (int64_t i0 = 0; i0 < a->n; i0 += TILE_N_AVX2) {
            int64_t n = a->n - i0 < TILE_N_AVX2 ? a->n - i0 : TILE_N_AVX2;
#define AVX2_CASE(FORMAT, N) case N: tile_avx2(FORMAT, panel, a, i0, N, count, y + p0, ystride); break;
            if (format == QUANT_INT8) {
                switch (n) { AVX2_CASE(QUANT_INT8, 1) AVX2_CASE(QUANT_INT8, 2) AVX2_CASE(QUANT_INT8, 3)
                             AVX2_CASE(QUANT_INT8, 4) }
            } else {
                switch (n) { AVX2_CASE(QUANT_INT4, 1) AVX2_CASE(QUANT_INT4, 2) AVX2_CASE(QUANT_INT4, 3)
                             AVX2_CASE(QUANT_INT4, 4) }
            }
#undef AVX2_CASE
        }
    }
}

#if PANEL_BLOCK_AVX2 * (PIECE_ROWS / PANEL_AVX2) > TILE_P * PANEL_BLOCK
#error "PIECE_BYTES holds the VNNI path's panels of a piece but not the AVX2 path's"
#endif

/* --- the AVX-512 VNNI path --- */

/* Decoding: each weight row streamed once, 64 bytes of codes a step (a unit: 2 blocks of int8, 4 of int4), each
   unit against every activation row's copy of the same blocks: one vpdpbusd (int8) or two (int4: the low
   nibbles, then the high ones) leave each block's integer sum spread over its lanes (8 a block for int8, 4 for
   int4), and one multiply-add scales and adds them. The scales' products dw * dx are taken 16 blocks at a time
   (one conversion of 16 float16 scales, one multiply per activation row) and moved to a unit's lanes by one
   permute. The weights and their scales are prefetched DECODE_AHEAD bytes ahead (above). */

/* The unsigned codes of blocks b .. b + count of a weight row (count up to a unit; a unit's missing blocks read
   as zeros): int8 q + 128 in w[0]; int4 the low nibbles of 4 blocks in w[0], the high ones in w[1]. */
VNNI INLINE void unit_codes(int format, const uint8_t *codes, int64_t b, int count, __m512i w[2]) {
    if (format == QUANT_INT8) {
        __m512i v = count == 2 ? _mm512_loadu_si512(codes + 32 * b)
                               : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, codes + 32 * b);
        w[0] = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
    } else {
        __m512i v = count == 4 ? _mm512_loadu_si512(codes + 16 * b)
                               : _mm512_maskz_loadu_epi8((1ull << (16 * count)) - 1, codes + 16 * b);
        w[0] = _mm512_and_si512(v, _mm512_set1_epi8(15));
        w[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15));
    }
}

/* Blocks b0 .. b0 + count (count <= 16) of one weight row against N activation rows, added to acc. */
VNNI INLINE void group_vnni(int format, const uint8_t *codes, const uint16_t *scale, const acts *a, int64_t b0,
                            const int count, const int N, __m512 *acc) {
    const int per = unit_blocks(format);
    const int64_t ub = unit_bytes(format), n = a->n, block_codes = format == QUANT_INT8 ? 32 : 16;
    __mmask16 m = count == 16 ? 0xFFFF : (__mmask16)((1u << count) - 1);
    _mm_prefetch((const char *)(scale + b0) + DECODE_AHEAD * 2 / block_codes, _MM_HINT_T0);
    __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scale + b0)), f[MAX_ROWS];
    _Pragma("GCC unroll 16") for (int i = 0; i < N; i++)
        f[i] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(m, a->d + i * a->blocks + b0));
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    _Pragma("GCC unroll 16") for (int j = 0; j * per < count; j++) {
        int64_t b = b0 + j * per, u = b / per;
        _mm_prefetch((const char *)codes + block_codes * b + DECODE_AHEAD, _MM_HINT_T0);
        __m512i w[2];
        unit_codes(format, codes, b, count - j * per < per ? count - j * per : per, w);
        __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(j * per), _mm512_srli_epi32(iota, per == 2 ? 3 : 2));
        _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) {
            const int8_t *x = a->pq + (u * n + i) * ub;
            __m512i s = _mm512_dpbusd_epi32(_mm512_load_si512(a->pk + (u * n + i) * 16), w[0], _mm512_load_si512(x));
            if (format == QUANT_INT4) s = _mm512_dpbusd_epi32(s, w[1], _mm512_load_si512(x + 64));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(lanes, f[i]), acc[i]);
        }
    }
}

/* One weight row against N activation rows. */
VNNI INLINE void row_vnni(int format, const uint8_t *codes, const uint16_t *scale, const acts *a, const int N,
                          float *y, int64_t ystride) {
    __m512 acc[MAX_ROWS];
    _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) acc[i] = _mm512_setzero_ps();
    int64_t blocks = a->blocks, b0 = 0;
    for (; b0 + 16 <= blocks; b0 += 16) group_vnni(format, codes, scale, a, b0, 16, N, acc);
    if (b0 < blocks) group_vnni(format, codes, scale, a, b0, (int)(blocks - b0), N, acc);
    _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) y[i * ystride] = _mm512_reduce_add_ps(acc[i]);
}

#define VNNI_CASE(FORMAT, N) \
    case N: row_vnni(FORMAT, q + r * row_codes, scale + r * blocks, a, N, y + r, ystride); break;
#define VNNI_SWITCH(FORMAT)                                                                                   \
    switch (n) {                                                                                              \
        VNNI_CASE(FORMAT, 1) VNNI_CASE(FORMAT, 2) VNNI_CASE(FORMAT, 3) VNNI_CASE(FORMAT, 4)                  \
        VNNI_CASE(FORMAT, 5) VNNI_CASE(FORMAT, 6) VNNI_CASE(FORMAT, 7) VNNI_CASE(FORMAT, 8)                  \
    }

/* Weight rows r0 <= r < r1, one at a time. */
VNNI static void rows_vnni_decode(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int64_t r1,
                                  const acts *a, float *y, int64_t ystride) {
    int64_t blocks = a->blocks, row_codes = codes_per_row(format, a->cols), n = a->n;
    for (int64_t r = r0; r < r1; r++) {
        if (format == QUANT_INT8) {
            VNNI_SWITCH(QUANT_INT8)
        } else {
            VNNI_SWITCH(QUANT_INT4)
        }
    }
}

/* Prefill: the weight rows of a thread's piece packed, PANEL rows at a time, so that a vector holds one 4-code
   word of each of 16 rows (unsigned: int8 q + 128, int4 q), and each activation row's word is broadcast to them:
   a tile of TILE_P panels x TILE_N activation rows keeps its TILE_P * TILE_N integer sums and as many float
   accumulators in registers across the blocks, reads each packed vector once for TILE_N rows and each activation
   word once for TILE_P panels, and writes 16 neighbouring outputs a vector. A panel's block: 8 vectors (codes
   4c .. 4c + 3 of row r in lane r), then the 16 rows' scales in float32. Packing reads the weights once and costs
   a few per cent of the products from 64 rows on; llama.cpp and KTransformers keep such interleaved layouts on
   disk, we pack per call so that one stored layout serves every path, the quantized cache and the move path,
   and a worker holds its shard once (docs/performance-log.md, "packed weight panels"). */

/* The 8x16 transpose of a block's words: register j starts with rows j and j + 8 (8 words each), and three
   swaps of a register bit with a lane bit (vpermt2d) leave word c of row r in register c, lane r. */
VNNI INLINE void transpose_words(__m512i v[8]) {
    _Pragma("GCC unroll 4")
    for (int bit = 4; bit >= 1; bit /= 2) {
        int32_t lo[16], hi[16];
        for (int l = 0; l < 16; l++) {
            lo[l] = l & bit ? 16 + (l & ~bit) : l;
            hi[l] = l & bit ? 16 + l : l | bit;
        }
        __m512i take_lo = _mm512_loadu_si512(lo), take_hi = _mm512_loadu_si512(hi);
        _Pragma("GCC unroll 8")
        for (int j = 0; j < 8; j++)
            if (!(j & bit)) {
                __m512i a = v[j], b = v[j | bit];
                v[j] = _mm512_permutex2var_epi32(a, take_lo, b);
                v[j | bit] = _mm512_permutex2var_epi32(a, take_hi, b);
            }
    }
}

/* One block's 32 unsigned codes of a weight row, in order. */
VNNI INLINE __m256i unsigned_block(int format, const uint8_t *codes, int64_t b) {
    if (format == QUANT_INT8)
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(codes + 32 * b)), _mm256_set1_epi8((char)0x80));
    __m128i v = _mm_loadu_si128((const __m128i *)(codes + 16 * b)), nibble = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nibble), _mm_and_si128(v, nibble));
}

/* Weight rows r0 .. r0 + count (count <= PANEL) packed into `panel` (blocks * PANEL_BLOCK bytes); the lanes of
   missing rows get codes 0 and scale 0, and are not stored. */
VNNI static void pack_panel(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int count,
                            int64_t blocks, int64_t row_codes, uint8_t *panel) {
    const uint8_t *rows[PANEL];
    for (int r = 0; r < PANEL; r++) rows[r] = q + (r0 + (r < count ? r : 0)) * row_codes;
    int64_t block_codes = format == QUANT_INT8 ? 32 : 16;
    for (int64_t b = 0; b < blocks; b++) {
        if (b % 2 == 0) /* each row's codes a few lines ahead, where the tiles have not prefetched them */
            for (int r = 0; r < PANEL; r++) _mm_prefetch((const char *)rows[r] + (b + 16) * block_codes, _MM_HINT_T0);
        __m512i v[8];
        _Pragma("GCC unroll 8")
        for (int j = 0; j < 8; j++)
            v[j] = _mm512_inserti64x4(_mm512_castsi256_si512(unsigned_block(format, rows[j], b)),
                                      unsigned_block(format, rows[j + 8], b), 1);
        if (count < PANEL) { /* a piece's last panel: rows past the weights read row r0 again, then zeroed */
            for (int j = 0; j < 8; j++) /* register j: row j in lanes 0-7, row j + 8 in lanes 8-15 */
                v[j] = _mm512_maskz_mov_epi32((__mmask16)((j < count ? 0x00FF : 0) | (j + 8 < count ? 0xFF00 : 0)),
                                              v[j]);
        }
        transpose_words(v);
        uint8_t *out = panel + b * PANEL_BLOCK;
        _Pragma("GCC unroll 8")
        for (int c = 0; c < 8; c++) _mm512_store_si512(out + 64 * c, v[c]);
    }
    for (int r = 0; r < PANEL; r++) /* the scales, a row at a time: stores of floats, no reloads */
        for (int64_t b = 0; b < blocks; b++)
            ((float *)(panel + b * PANEL_BLOCK + 512))[r] =
                r < count ? _cvtsh_ss(scale[(r0 + r) * blocks + b]) : 0.0f;
}

/* A prefill tile: P packed panels (panel_bytes apart) against activation rows i0 .. i0 + N; per block each sum
   starts at the row's -K * sum(xq), takes 8 vpdpbusd, and is added with the two scales as the decoding path
   does: acc += float(sum) * (dw * dx). masks[p]: the lanes of panel p that are weight rows. Each block also
   prefetches two cache lines from *ahead (the next piece's weights, while this one computes) until `end`. */
VNNI INLINE void tile_vnni(const uint8_t *panels, int64_t panel_bytes, const int P, const acts *a, int64_t i0,
                           const int N, const __mmask16 *masks, float *y, int64_t ystride, const uint8_t **ahead,
                           const uint8_t *end) {
    int64_t blocks = a->blocks, cols = a->cols;
    const int8_t *xq = a->q + i0 * cols;
    const float *xd = a->d + i0 * blocks;
    const int32_t *xk = a->k + i0 * blocks;
    __m512 acc[TILE_P][TILE_N];
    _Pragma("GCC unroll 16") for (int p = 0; p < P; p++)
    _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) acc[p][i] = _mm512_setzero_ps();
    const uint8_t *next = *ahead;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *w = panels + b * PANEL_BLOCK;
        if (next < end) {
            _mm_prefetch((const char *)next, _MM_HINT_T1);
            _mm_prefetch((const char *)next + 64, _MM_HINT_T1);
            next += 128;
        }
        __m512i sum[TILE_P][TILE_N];
        _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) {
            __m512i k = _mm512_set1_epi32(xk[i * blocks + b]);
            _Pragma("GCC unroll 16") for (int p = 0; p < P; p++) sum[p][i] = k;
        }
        _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) {
            __m512i wv[TILE_P];
            _Pragma("GCC unroll 16") for (int p = 0; p < P; p++)
                wv[p] = _mm512_load_si512(w + p * panel_bytes + 64 * c);
            _Pragma("GCC unroll 16") for (int i = 0; i < N; i++) {
                int32_t word;
                memcpy(&word, xq + i * cols + 32 * b + 4 * c, 4);
                __m512i x = _mm512_set1_epi32(word);
                _Pragma("GCC unroll 16") for (int p = 0; p < P; p++)
                    sum[p][i] = _mm512_dpbusd_epi32(sum[p][i], wv[p], x);
            }
        }
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++) {
            __m512 dw = _mm512_load_ps(w + p * panel_bytes + 512);
            _Pragma("GCC unroll 16") for (int i = 0; i < N; i++)
                acc[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[p][i]),
                                            _mm512_mul_ps(_mm512_set1_ps(xd[i * blocks + b]), dw), acc[p][i]);
        }
    }
    _Pragma("GCC unroll 16") for (int p = 0; p < P; p++)
    _Pragma("GCC unroll 16") for (int i = 0; i < N; i++)
        _mm512_mask_storeu_ps(y + (i0 + i) * ystride + PANEL * p, masks[p], acc[p][i]);
    *ahead = next;
}

#define TILE_CASE(P, N) \
    case N: tile_vnni(panels, panel_bytes, P, a, i0, N, masks, y + r0, ystride, &ahead, end); break;
#define TILE_SWITCH(P)                                                                                      \
    switch (n) {                                                                                            \
        TILE_CASE(P, 1) TILE_CASE(P, 2) TILE_CASE(P, 3) TILE_CASE(P, 4) TILE_CASE(P, 5) TILE_CASE(P, 6)     \
    }

#if TILE_N != 6 || TILE_P != 2
#error "rows_vnni_prefill has a case for each tile of up to 2 panels and 6 rows"
#endif

/* Weight rows r0 <= r < r1 (at most PIECE_ROWS, of `rows`) against every activation row: packed once into this
   thread's panels, then TILE_N activation rows at a time, while the tiles prefetch the codes of the next
   PIECE_ROWS rows (a thread's next piece: its pieces are consecutive). */
VNNI static void rows_vnni_prefill(int format, const uint8_t *q, const uint16_t *scale, int64_t r0, int64_t r1,
                                   int64_t rows, const acts *a, float *y, int64_t ystride) {
    int64_t blocks = a->blocks, row_codes = codes_per_row(format, a->cols), panel_bytes = blocks * PANEL_BLOCK;
    int64_t next_end = r1 + PIECE_ROWS < rows ? r1 + PIECE_ROWS : rows;
    const uint8_t *ahead = q + r1 * row_codes, *end = q + next_end * row_codes;
    uint8_t *panels = a->panels + (int64_t)omp_get_thread_num() * PIECE_BYTES(blocks);
    int count = (int)(r1 - r0), used = (count + PANEL - 1) / PANEL;
    __mmask16 masks[TILE_P];
    for (int p = 0; p < used; p++) {
        int panel_rows = count - PANEL * p < PANEL ? count - PANEL * p : PANEL;
        masks[p] = (__mmask16)((1u << panel_rows) - 1);
        pack_panel(format, q, scale, r0 + PANEL * p, panel_rows, blocks, row_codes, panels + p * panel_bytes);
    }
    for (int64_t i0 = 0; i0 < a->n; i0 += TILE_N) {
        int64_t n = a->n - i0 < TILE_N ? a->n - i0 : TILE_N;
        if (used == 2) {
            TILE_SWITCH(2)
        } else {
            TILE_SWITCH(1)
        }
    }
}

/* --- the activation between an expert's products --- */

/* ps [inter] = silu(gate) * up for one row of h = [gate | up], as PyTorch computes it: in bfloat16 (bf16) each of
   gate, up, silu(gate) and the product rounded to bfloat16, silu(g) = g / (1 + exp(-g)) in float32. */
static void silu_row_plain(const float *h, int64_t inter, int bf16, float *ps) {
    for (int64_t c = 0; c < inter; c++) {
        float g = h[c], u = h[inter + c];
        if (bf16) {
            g = bf16_to_float(float_to_bf16(g));
            u = bf16_to_float(float_to_bf16(u));
            float act = bf16_to_float(float_to_bf16(g / (1.0f + expf(-g))));
            ps[c] = bf16_to_float(float_to_bf16(act * u));
        } else {
            ps[c] = g / (1.0f + expf(-g)) * u;
        }
    }
}

/* float32 rounded to the nearest bfloat16 (ties to even, NaN to 0x7FC0, as float_to_bf16), kept in float32. */
AVX2 INLINE __m256 round_bf16_avx2(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))),
                         _mm256_set1_epi32((int)0xFFFF0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(u), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                            _mm256_cmp_ps(f, f, _CMP_UNORD_Q));
}

/* 2^k for integer k in the normal range, as the bits of a float. */
AVX2 INLINE __m256 power_of_two_avx2(__m256i k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

/* exp(x) as PyTorch's vectorized float exp computes it on x86 (SLEEF's expf_u10, with FMA), so that the
   activation here has PyTorch's bits (tests/test_quant.py checks every bfloat16 input): x = k ln 2 + s with ln 2
   in two parts, e^s by a degree-7 polynomial, times 2^k in two halves (no overflow of the power), 0 below -104,
   infinity above 100. */
AVX2 INLINE __m256 exp_avx2(__m256 x) {
    __m256i k = _mm256_cvtps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(1.442695040888963407359924681001892137f)));
    __m256 kf = _mm256_cvtepi32_ps(k);
    __m256 s = _mm256_fmadd_ps(kf, _mm256_set1_ps(-0.693145751953125f), x);
    s = _mm256_fmadd_ps(kf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
    static const float poly[6] = {0.000198527617612853646278381f, 0.00139304355252534151077271f,
                                  0.00833336077630519866943359f, 0.0416664853692054748535156f,
                                  0.166666671633720397949219f, 0.5f};
    __m256 p = _mm256_set1_ps(poly[0]);
    for (int j = 1; j < 6; j++) p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(poly[j]));
    p = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), p, s));
    __m256i half = _mm256_srai_epi32(k, 1);
    p = _mm256_mul_ps(_mm256_mul_ps(p, power_of_two_avx2(half)), power_of_two_avx2(_mm256_sub_epi32(k, half)));
    p = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), p);
    return _mm256_blendv_ps(p, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(100.0f), _CMP_GT_OQ));
}

/* silu_row_plain, 8 columns at a time (inter is a multiple of 32). */
AVX2 static void silu_row_avx2(const float *h, int64_t inter, int bf16, float *ps) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t c = 0; c < inter; c += 8) {
        __m256 g = _mm256_loadu_ps(h + c), u = _mm256_loadu_ps(h + inter + c);
        if (bf16) g = round_bf16_avx2(g), u = round_bf16_avx2(u);
        __m256 act = _mm256_div_ps(g, _mm256_add_ps(one, exp_avx2(_mm256_xor_ps(g, sign))));
        if (bf16) act = round_bf16_avx2(act);
        __m256 p = _mm256_mul_ps(act, u);
        _mm256_storeu_ps(ps + c, bf16 ? round_bf16_avx2(p) : p);
    }
}

/* The same, 16 columns at a time (AVX-512: the activation is a tenth of a prefill's time at 8). */
VNNI INLINE __m512 round_bf16_avx512(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))),
                         _mm512_set1_epi32((int)0xFFFF0000u));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_castsi512_ps(u),
                                _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
}

VNNI INLINE __m512 power_of_two_avx512(__m512i k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(127)), 23));
}

VNNI INLINE __m512 exp_avx512(__m512 x) {
    __m512i k = _mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(1.442695040888963407359924681001892137f)));
    __m512 kf = _mm512_cvtepi32_ps(k);
    __m512 s = _mm512_fmadd_ps(kf, _mm512_set1_ps(-0.693145751953125f), x);
    s = _mm512_fmadd_ps(kf, _mm512_set1_ps(-1.428606765330187045e-06f), s);
    __m512 p = _mm512_set1_ps(0.000198527617612853646278381f);
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(0.00139304355252534151077271f));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(0.00833336077630519866943359f));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(0.0416664853692054748535156f));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(0.166666671633720397949219f));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), p, s));
    __m512i half = _mm512_srai_epi32(k, 1);
    p = _mm512_mul_ps(_mm512_mul_ps(p, power_of_two_avx512(half)), power_of_two_avx512(_mm512_sub_epi32(k, half)));
    p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_NLT_UQ), p);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(100.0f), _CMP_GT_OQ), p,
                                _mm512_set1_ps(INFINITY));
}

VNNI static void silu_row_avx512(const float *h, int64_t inter, int bf16, float *ps) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t c = 0; c < inter; c += 16) {
        __m512 g = _mm512_loadu_ps(h + c), u = _mm512_loadu_ps(h + inter + c);
        if (bf16) g = round_bf16_avx512(g), u = round_bf16_avx512(u);
        __m512 minus = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g),
                                                             _mm512_set1_epi32((int)0x80000000u)));
        __m512 act = _mm512_div_ps(g, _mm512_add_ps(one, exp_avx512(minus)));
        if (bf16) act = round_bf16_avx512(act);
        __m512 p = _mm512_mul_ps(act, u);
        _mm512_storeu_ps(ps + c, bf16 ? round_bf16_avx512(p) : p);
    }
}

/* The activation of one row on the path `isa` (inter a multiple of 32). */
static void silu_row(int isa, const float *h, int64_t inter, int bf16, float *ps) {
    if (isa == QUANT_ISA_AVX512)
        silu_row_avx512(h, inter, bf16, ps);
    else if (isa == QUANT_ISA_AVX2)
        silu_row_avx2(h, inter, bf16, ps);
    else
        silu_row_plain(h, inter, bf16, ps);
}

/* --- choosing a path, and the calls --- */

/* The one place that reads the CPU's features. */
static int best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return QUANT_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return QUANT_ISA_AVX2;
    return QUANT_ISA_PLAIN;
}

int fiddler_quant_isa(void) { return best_isa(); }

/* The path to take for `isa`, or 0 when the arguments are not ones these kernels take. */
static int checked(int format, int64_t cols, int64_t n, int isa) {
    if ((format != QUANT_INT8 && format != QUANT_INT4) || cols <= 0 || cols % 32 != 0 || n < 0) return 0;
    int best = best_isa();
    if (isa == 0) return best;
    return (isa == QUANT_ISA_PLAIN || isa == QUANT_ISA_AVX2 || isa == QUANT_ISA_AVX512) && isa <= best ? isa : 0;
}

/* y [n, rows] float32 for the weight rows of q against the prepared activations; call inside a parallel region
   (ends with a barrier). */
static void quant_rows(int format, int isa, const uint8_t *q, const uint16_t *scale, int64_t rows, const acts *a,
                       float *y) {
    int64_t pieces = (rows + PIECE_ROWS - 1) / PIECE_ROWS;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pieces; p++) {
        int64_t r0 = p * PIECE_ROWS, r1 = r0 + PIECE_ROWS < rows ? r0 + PIECE_ROWS : rows;
        if (isa == QUANT_ISA_AVX512 && a->pq)
            rows_vnni_decode(format, q, scale, r0, r1, a, y, rows);
        else if (isa == QUANT_ISA_AVX512)
            rows_vnni_prefill(format, q, scale, r0, r1, rows, a, y, rows);
        else if (isa == QUANT_ISA_AVX2 && a->panels)
            rows_avx2_prefill(format, q, scale, r0, r1, a, y, rows);
        else if (isa == QUANT_ISA_AVX2)
            rows_avx2(format, q, scale, r0, r1, a, y, rows);
        else
            rows_plain(format, q, scale, r0, r1, a, y, rows);
    }
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

/* ps [n, inter] = silu(gate) * up for h [n, 2 * inter] float32 as the fused expert computes it between its
   products (bf16: rounded where PyTorch rounds in bfloat16); for the tests that hold it to PyTorch's bits. Returns
   0, or -2 for a shape or path it does not take. */
int fiddler_silu_product(const float *h, int64_t n, int64_t inter, int bf16, float *ps, int isa) {
    isa = checked(QUANT_INT8, inter, n, isa);
    if (isa == 0) return -2;
    for (int64_t i = 0; i < n; i++) {
        silu_row(isa, h + i * 2 * inter, inter, bf16, ps + i * inter);
    }
    return 0;
}

/* q [n, cols] int8 and d [n, cols / 32] float32: the activations x (bfloat16 when x_bf16, else float32) quantized
   per block as the products quantize them (experts/quant.py holds its own quantizer to these bits). Returns 0, -1
   without memory, -2 for a shape it does not take. */
int fiddler_quant_activations(const void *x, int x_bf16, int64_t n, int64_t cols, int8_t *q, float *d, int isa) {
    isa = checked(QUANT_INT8, cols, n, isa);
    if (isa == 0) return -2;
    float *xs = scratch((size_t)(n * cols) * sizeof(float));
    if (xs == NULL) return -1;
    for (int64_t i = 0; i < n; i++) {
        float_row(x, x_bf16, cols, i, xs);
        if (isa >= QUANT_ISA_AVX2)
            quantize_row_avx2(xs + i * cols, cols, q + i * cols, d + i * (cols / 32));
        else
            quantize_row_plain(xs + i * cols, cols, q + i * cols, d + i * (cols / 32));
    }
    free(xs);
    return 0;
}

/* out [n, rows] = x [n, cols] @ w.T for a quantized w [rows, cols] (codes q, float16 scales) and x quantized per
   block (above), x and out bfloat16 (x_bf16) or float32; cols a multiple of 32. Returns 0, -1 when scratch memory
   cannot be had, -2 for arguments it does not take (format, shape, or an isa this CPU lacks). */
int fiddler_quant_linear(int format, const uint8_t *q, const uint16_t *scale, int64_t rows, int64_t cols,
                         const void *x, int x_bf16, int64_t n, void *out, int isa) {
    isa = checked(format, cols, n, isa);
    if (isa == 0) return -2;
    if (n == 0) return 0;
    acts a;
    float *xs = scratch((size_t)(n * cols) * sizeof(float));
    float *y = x_bf16 ? scratch((size_t)(n * rows) * sizeof(float)) : out;
    int ok = xs != NULL && y != NULL && alloc_acts(&a, format, isa, n, cols) == 0, shared = shared_preparing(n);
    if (ok) {
        if (!shared) prepare_acts(&a, format, isa, x, x_bf16, xs);
#pragma omp parallel
        {
            if (shared) prepare_acts(&a, format, isa, x, x_bf16, xs);
            quant_rows(format, isa, q, scale, rows, &a, y);
            if (x_bf16) store(y, n * rows, 1, out);
        }
        free_acts(&a);
    }
    free(xs);
    if (x_bf16) free(y);
    return ok ? 0 : -1;
}

/* One gated SiLU expert with quantized weights, as transformers computes it with the dequantized ones and the
   activations quantized before each product (experts/quant.py's reference_expert):
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
    if (n == 0) return 0;
    acts ax, ap;
    int have_x = 0, have_p = 0;
    float *xs = scratch((size_t)(n * hidden) * sizeof(float)), *h = scratch((size_t)(n * 2 * inter) * sizeof(float));
    float *ps = scratch((size_t)(n * inter) * sizeof(float));
    float *y = x_bf16 ? scratch((size_t)(n * hidden) * sizeof(float)) : out;
    int ok = xs && h && ps && y && (have_x = alloc_acts(&ax, format, isa, n, hidden) == 0)
             && (have_p = alloc_acts(&ap, format, isa, n, inter) == 0);
    int shared = shared_preparing(n);
    if (ok) {
        if (!shared) prepare_acts(&ax, format, isa, x, x_bf16, xs);
#pragma omp parallel
        {
            if (shared) prepare_acts(&ax, format, isa, x, x_bf16, xs);
            quant_rows(format, isa, gate_up, gate_up_scale, 2 * inter, &ax, h);
            /* the activation, a row at a time, each row quantized for the down product as soon as it is done */
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; i++) {
                silu_row(isa, h + i * 2 * inter, inter, x_bf16, ps + i * inter);
                prepare_row(&ap, format, isa, ps, i);
            }
            quant_rows(format, isa, down, down_scale, hidden, &ap, y);
            if (x_bf16) store(y, n * hidden, 1, out);
        }
    }
    if (have_x) free_acts(&ax);
    if (have_p) free_acts(&ap);
    free(xs);
    free(h);
    free(ps);
    if (x_bf16) free(y);
    return ok ? 0 : -1;
}
