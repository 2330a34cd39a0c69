"""Bessel radial basis (DimeNet / MACE / NequIP): ``sqrt(2/rc) sin(n pi r / rc) / r``, n = 1..num_basis."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BesselBasis"]


class BesselBasis(nn.Module):
    """Zeroth-order spherical Bessel functions that vanish at the cutoff.

    Parameters
    ----------
    cutoff : radial cutoff rc in Å.
    num_basis : number of functions n = 1..num_basis.
    trainable : learn the frequencies ``n pi / rc`` (initialised at those values).

    ``forward(r)``: distances (E,) in Å (must be > 0) -> (E, num_basis), units Å^-1/2 / Å.
    """

    def __init__(self, cutoff: float, num_basis: int = 8, trainable: bool = False):
        super().__init__()
        if cutoff <= 0 or num_basis < 1:
            raise ValueError(f"BesselBasis needs cutoff > 0 and num_basis >= 1, got {cutoff}, {num_basis}")
        self.cutoff, self.num_basis = float(cutoff), int(num_basis)
        self.trainable = bool(trainable)
        if trainable:
            frequencies = math.pi * torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) / cutoff
            self.frequencies = nn.Parameter(frequencies)
        self.prefactor = math.sqrt(2.0 / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if self.trainable:
            frequencies = self.frequencies
        else:  # built in the input's dtype so that float64 runs use exact frequencies
            frequencies = torch.arange(1, self.num_basis + 1, dtype=r.dtype, device=r.device) * (math.pi / self.cutoff)
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(frequencies * r) / r

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"
