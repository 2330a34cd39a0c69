"""Per-thread scratch buffers for the fused inference ops.

Large fresh tensors are returned to the operating system when freed and page-faulted in again on the next call,
which on virtual machines can cost more than the arithmetic done in them (a few µs per 4 kB page). Fused
inference ops (FAENet's filtered messages) therefore keep a few flat buffers per thread and work in views of
them. Only temporaries live there: nothing returned to autograd or saved for a backward
pass may be a scratch view, because the next call overwrites it.
"""
from __future__ import annotations

import threading
from typing import List

import torch

__all__ = ["scratch_buffers"]

_WORKSPACE = threading.local()  # per thread: two threads evaluating a model must not share scratch buffers


def scratch_buffers(count: int, numel: int, dtype: torch.dtype, device) -> List[torch.Tensor]:
    """``count`` distinct flat scratch tensors of at least ``numel`` elements each, kept between calls.

    The buffers are shared by all callers on this thread with the same dtype and device: use them only for
    values consumed before the caller returns.
    """
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    key = (dtype, torch.device(device))
    bufs = cache.get(key)
    if bufs is None or len(bufs) < count or bufs[0].numel() < numel:
        numel = max(numel, bufs[0].numel() if bufs else 0)
        bufs = [torch.empty(numel, dtype=dtype, device=device) for _ in range(max(count, len(bufs or ())))]
        cache[key] = bufs
    return bufs[:count]
