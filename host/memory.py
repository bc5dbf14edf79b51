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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: allocations at least this large get a mapping of their own
LARGE_ALLOCATION = 1 << 19  # above a decoding step's temporaries: 8 rows of Mixtral's 14336 in float32 are 459 KiB
LARGEST_THRESHOLD = 32 << 20  # the largest glibc's own moving threshold reaches on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def large_allocation(shard_bytes: int) -> int:
    """The size from which a worker holding `shard_bytes` of experts maps its allocations apart: a 64th of its shard,
    between LARGE_ALLOCATION and LARGEST_THRESHOLD. Kept in the heap, a prefill's temporaries below it stay resident
    (a handful of them: a few per cent of the shard); mapped, each costs page faults and zeroed pages on every call:
    with 512 KiB a mini worker's part of a 256-token prefill in bfloat16 took 248 ms against 167 (medians of 15,
    alternating processes; oneDNN's scratch and each expert's intermediate are 0.6-1.2 MiB), 3-7 MiB less resident
    (docs/performance-log.md)."""
    return max(LARGE_ALLOCATION, min(LARGEST_THRESHOLD, shard_bytes // 64))


def map_large_allocations_apart(threshold: int = LARGE_ALLOCATION) -> bool:
    """Serve every allocation of `threshold` bytes or more from a mapping of its own, returned to the system when it
    is freed (glibc's mallopt(M_MMAP_THRESHOLD)); False where the C library has no such call. Without it glibc
    raises that threshold to the largest block freed so far, so a prefill's temporaries (a few MiB each: the rows,
    their quantized codes, the intermediate) come from the heap after the first call and stay resident: 24-29 MiB
    over the shard per worker after a 256-token prefill on `mini` in int4, 17 with a threshold of 512 KiB, against
    the goal's 19 (10% of the shard; docs/performance-log.md). A decoding step's temporaries stay below the
    threshold, on the heap, so its steps pay no mapping."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
