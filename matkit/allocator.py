"""CPU memory-allocator settings for long runs (training).

PyTorch on the CPU allocates each large intermediate tensor with ``malloc`` and frees it a moment later. glibc
serves allocations above its mmap threshold (at most 32 MiB by default) with fresh ``mmap`` pages and gives freed
heap tops back to the OS, so every step re-faults its multi-MB activations page by page (for large training
steps this costs more than the arithmetic). :func:`keep_freed_memory` makes glibc keep freed memory for reuse
instead, as PyTorch's CUDA caching allocator does on GPUs; the process then holds on to its peak memory. PyTorch's
64-byte-aligned allocations (``posix_memalign``) are not always reused by glibc < 2.38, so part of the re-faulting
remains. Measurements: ``benchmarks/README.md``.
"""
from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

# mallopt parameters (glibc <malloc.h>)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations below ``threshold_bytes`` from its heap and to keep up to that much freed
    memory instead of returning it to the OS (``mallopt`` mmap / trim thresholds; ``threshold_bytes`` < 2 GiB).

    Affects the whole process from now on. Returns False, changing nothing, where the C library is not glibc
    (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux") or not 0 < threshold_bytes < 2 ** 31:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_THRESHOLD, threshold_bytes),
                                                             (_M_TRIM_THRESHOLD, threshold_bytes),
                                                             (_M_TOP_PAD, 64 << 20)))
    if ok:
        log.debug("glibc malloc keeps up to %d MiB of freed memory for reuse", threshold_bytes >> 20)
    return ok
