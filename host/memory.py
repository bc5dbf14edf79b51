"""Handing memory a process has freed back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's malloc_trim); False where the C library has no
    such call (musl, macOS). Loading a shard allocates and frees many temporaries of a few MiB (one expert read,
    converted or quantized). glibc serves the first from their own mappings, but each one freed raises its mapping
    threshold to that size, so the later ones come from the heap, and the heap keeps their pages resident after
    they are freed: measured 70-90 MiB per worker on `mini` after quantizing its shard (docs/performance-log.md)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim(0)
    return True
