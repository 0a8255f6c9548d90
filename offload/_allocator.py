"""Keep freed large buffers in the process instead of handing them back to the kernel.

Every item brings buffers of hundreds of kB (the received message, its parsed copy, decoded
arrays, task outputs). With glibc's defaults each of these is ``mmap``-ed or trimmed from a
thread's heap when freed, so the next item faults every page in again: measured on the server,
~170 page faults and ~1 ms of CPU per 560 kB frame item. Raising the mmap and trim thresholds
makes the allocator reuse that memory; the process keeps its peak (streams x window x item
size) instead of returning it between items.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses more than this on 64-bit (HEAP_MAX / 2)
_TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Tune glibc's malloc for large per-item buffers; False where there is no glibc mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's is a stub that returns 0.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
