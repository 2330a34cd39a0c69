"""glibc allocator setting for training: freed multi-MB tensors are reused instead of re-faulted from the OS."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, sys
from matkit.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)           # 64 MiB, every page written, freed
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, max(faults[1:]), min(faults[1:]))
"""


def _faults(mode: str):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, most, least = out.stdout.split()
    return applied, int(most), int(least)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_refaulting_large_tensors():
    pages = (64 << 20) // 4096
    applied, kept, _ = _faults("keep")
    if applied != "True":
        pytest.skip("the C library is not glibc")
    _, _, default = _faults("default")
    assert default > 0.9 * pages          # glibc default: a 64 MiB block is mmapped and faulted afresh each time
    assert kept < 0.05 * pages            # kept: after the first, every block reuses the freed, mapped memory


def test_keep_freed_memory_rejects_out_of_range_thresholds():
    from matkit.allocator import keep_freed_memory

    assert keep_freed_memory(0) is False and keep_freed_memory(2 ** 31) is False
