"""Smooth cutoff envelopes u(r): 1 at r = 0, 0 (with vanishing derivatives) at and beyond the cutoff."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PolynomialEnvelope", "CosineEnvelope"]


class PolynomialEnvelope(nn.Module):
    """DimeNet/MACE polynomial envelope with ``x = r / rc``::

        u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)   for x < 1, else 0.

    u(1) = u'(1) = u''(1) = 0, so energies and forces are continuous at the cutoff.
    ``forward(r)``: (E,) distances in Å -> (E,) dimensionless.
    """

    def __init__(self, cutoff: float, p: int = 5):
        super().__init__()
        if cutoff <= 0 or p < 2:
            raise ValueError(f"PolynomialEnvelope needs cutoff > 0 and p >= 2, got {cutoff}, {p}")
        self.cutoff, self.p = float(cutoff), int(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = r / self.cutoff
        xp = x ** p
        u = (1.0 - 0.5 * (p + 1) * (p + 2) * xp + p * (p + 2) * xp * x - 0.5 * p * (p + 1) * xp * x * x)
        return torch.where(x < 1.0, u, torch.zeros_like(u))

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, p={self.p}"


class CosineEnvelope(nn.Module):
    """``u(r) = (cos(pi r / rc) + 1) / 2`` for r < rc, else 0 (C^1 at the cutoff)."""

    def __init__(self, cutoff: float):
        super().__init__()
        if cutoff <= 0:
            raise ValueError(f"CosineEnvelope needs cutoff > 0, got {cutoff}")
        self.cutoff = float(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        u = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0)
        return torch.where(r < self.cutoff, u, torch.zeros_like(u))
