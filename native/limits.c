/* What this library was built with, for the Python side to hold equal to its own (tests/test_native.py): the
   limits native/build.py passed as -D flags (native/limits.py) and the sizes of the structs Python mirrors with
   ctypes. */

#include <string.h>

#include "fiddler_native.h"

int64_t fiddler_constant(const char *name) {
    static const struct {
        const char *name;
        int64_t value;
    } known[] = {
        {"MAX_ROWS", MAX_ROWS},
        {"MAX_PAIRS", MAX_PAIRS},
        {"MAX_EXPERTS", MAX_EXPERTS},
        {"QUANT_BLOCK", QUANT_BLOCK},
        {"QUANT_INT8", QUANT_INT8},
        {"QUANT_INT4", QUANT_INT4},
        {"QUANT_ISA_PLAIN", QUANT_ISA_PLAIN},
        {"QUANT_ISA_AVX2", QUANT_ISA_AVX2},
        {"QUANT_ISA_AVX512", QUANT_ISA_AVX512},
        {"BF16_ISA_AVX2", BF16_ISA_AVX2},
        {"BF16_ISA_AVX512", BF16_ISA_AVX512},
        {"BF16_ISA_AMX", BF16_ISA_AMX},
        {"sizeof lane_slots", sizeof(lane_slots)},
        {"sizeof lane_expert", sizeof(lane_expert)},
        {"sizeof layer_call", sizeof(layer_call)},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(name, known[i].name) == 0) return known[i].value;
    return -1;
}
