/* transformers' RMS norm of a few bfloat16 rows in one call.

   The norm of Llama and of the MoE models that copy it (Mixtral, Qwen2/3-MoE, DeepSeek, OLMoE, ...), step by step
   as its PyTorch code computes it:

       h = x.to(float32); variance = h.pow(2).mean(-1); h = h * rsqrt(variance + eps); out = weight * h.to(bfloat16)

   Each step rounds where PyTorch's rounds (-ffp-contract=off keeps the square and the sum apart); only the order of
   the float32 sum of squares is this loop's own, so a result may differ from PyTorch's by one bfloat16 step where
   the sums differ in their last bit. A decoding step runs these norms twice a layer on one row each, where the seven
   PyTorch operations cost far more than the arithmetic (coordinator/cpu_norm.py). */

#include <math.h>
#include <stdint.h>

#include "convert.h"
#include "fiddler_native.h"

#define LANES 8 /* partial sums, which the compiler keeps in one vector register */

void fiddler_rms_norm(const uint16_t *x, const uint16_t *weight, int64_t rows, int64_t cols, double eps,
                      uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * cols;
        uint16_t *yr = out + r * cols;
        float lanes[LANES] = {0};
        int64_t c = 0;
        for (; c + LANES <= cols; c += LANES)
            for (int j = 0; j < LANES; j++) {
                float v = bf16_to_float(xr[c + j]);
                lanes[j] += v * v;
            }
        float sum = 0.0f;
        for (int j = 0; j < LANES; j++) sum += lanes[j];
        for (; c < cols; c++) {
            float v = bf16_to_float(xr[c]);
            sum += v * v;
        }
        float variance = sum / (float)cols; /* mean: the sum divided by the count, as PyTorch's CPU mean */
        float scale = 1.0f / sqrtf(variance + (float)eps);
        for (c = 0; c < cols; c++) {
            float normed = bf16_to_float(float_to_bf16(bf16_to_float(xr[c]) * scale));
            yr[c] = float_to_bf16(bf16_to_float(weight[c]) * normed);
        }
    }
}
