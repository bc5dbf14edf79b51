/* Number conversions the kernels share: bfloat16 and float16 to float32 and back, as PyTorch rounds them. */

#ifndef FIDDLER_CONVERT_H
#define FIDDLER_CONVERT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as c10::BFloat16 */
    if (isnan(f)) return 0x7FC0;
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* IEEE half precision to float32, exact; without F16C instructions (the plain paths). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, u;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        float f = ldexpf((float)mantissa, -24);
        return sign ? -f : f;
    }
    u = exponent == 31 ? sign | 0x7F800000 | (mantissa << 13) : sign | ((exponent + 112) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
