"""Buffers that stay float64 when a module is cast to another dtype."""
from __future__ import annotations

from typing import Tuple

from torch import nn

__all__ = ["KeepsFloat64"]


class KeepsFloat64(nn.Module):
    """A module whose buffers named in ``_FLOAT64_BUFFERS`` stay float64 under ``.to(dtype)`` / ``.float()``
    (they only move between devices). For constants that must stay exact in float64 runs of a model that was
    once cast to float32 (reference energies, quadrature matrices); users cast them where they are used."""

    _FLOAT64_BUFFERS: Tuple[str, ...] = ()

    def _apply(self, fn, *args, **kwargs):
        keep = {name: self._buffers[name] for name in self._FLOAT64_BUFFERS if name in self._buffers}
        super()._apply(fn, *args, **kwargs)
        for name, buf in keep.items():
            self._buffers[name] = buf.to(device=fn(buf).device)
        return self
