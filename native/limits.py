"""The limits the C code and its Python bindings share, defined here only.

native/build.py hands each to the compiler as -D<NAME>=<value> (part of the build's cache key, so a changed value
rebuilds the library); fiddler_native.h stops a build without them, and the library reports the values it was
built with (`fiddler_constant`), which tests/test_native.py holds equal to these.
"""

from __future__ import annotations

MAX_ROWS = 8  # activation rows per expert the C kernels' decoding paths take; more take the float32 path
MAX_PAIRS = 64  # (token, k) pairs of one layer call through shm_call.c; a larger call takes the Python path
MAX_EXPERTS = 256  # experts of one request the worker's C loop reads; a request with more is left to Python

# The quantized weight formats (experts/quant.py describes their layout): weights along a row's input dimension
# in blocks of QUANT_BLOCK, each block with one float16 scale. The ids name a format to the C kernels.
QUANT_BLOCK = 32
QUANT_INT8 = 1  # llama.cpp's Q8_0: w = d * q, q int8 in [-127, 127]
QUANT_INT4 = 2  # llama.cpp's Q4_0: w = d * (q - 8), q 4 bits in [0, 15]
# The paths of the quantized kernels (native/quant_gemv.c), for asking for one; 0 asks for the best this CPU has.
QUANT_ISA_PLAIN = 1
QUANT_ISA_AVX2 = 2
QUANT_ISA_AVX512 = 3
# The paths of the bfloat16 kernels (native/bf16_gemv.c): AVX2 with FMA, AVX512-BF16, AMX tiles; 0 asks for the best.
BF16_ISA_AVX2 = 1
BF16_ISA_AVX512 = 2
BF16_ISA_AMX = 3


def values() -> dict[str, int]:
    """Every limit under the name the C code uses, read when the library is built."""
    return {"MAX_ROWS": MAX_ROWS, "MAX_PAIRS": MAX_PAIRS, "MAX_EXPERTS": MAX_EXPERTS, "QUANT_BLOCK": QUANT_BLOCK,
            "QUANT_INT8": QUANT_INT8, "QUANT_INT4": QUANT_INT4, "QUANT_ISA_PLAIN": QUANT_ISA_PLAIN,
            "QUANT_ISA_AVX2": QUANT_ISA_AVX2, "QUANT_ISA_AVX512": QUANT_ISA_AVX512,
            "BF16_ISA_AVX2": BF16_ISA_AVX2, "BF16_ISA_AVX512": BF16_ISA_AVX512, "BF16_ISA_AMX": BF16_ISA_AMX}
