"""The limits the C code and its Python bindings share, defined here only.

native/build.py hands each to the compiler as -D<NAME>=<value> (part of the build's cache key, so a changed value
rebuilds the library); fiddler_native.h stops a build without them, and the library reports the values it was
built with (`fiddler_constant`), which tests/test_native.py holds equal to these.
"""

from __future__ import annotations

MAX_ROWS = 8  # activation rows per expert the C kernels' decoding paths take; more take the float32 path
MAX_PAIRS = 64  # (token, k) pairs of one layer call through shm_call.c; a larger call takes the Python path
MAX_EXPERTS = 256  # experts of one request the worker's C loop reads; a request with more is left to Python


def values() -> dict[str, int]:
    """Every limit under the name the C code uses, read when the library is built."""
    return {"MAX_ROWS": MAX_ROWS, "MAX_PAIRS": MAX_PAIRS, "MAX_EXPERTS": MAX_EXPERTS}
