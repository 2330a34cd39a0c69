"""Exponential-normal radial basis (PhysNet / torchmd-net "expnorm") and the cosine cutoff it uses.

``phi_k(d) = f_cut(d) * exp(-beta_k * (exp(alpha * (d_lo - d)) - mu_k)^2)`` with ``alpha = 5 / (d_hi - d_lo)``,
``mu_k`` evenly spaced on ``[exp(d_lo - d_hi), 1]`` and ``beta_k = (2 / K * (1 - exp(d_lo - d_hi)))^-2``
(PhysNet initialisation). ``f_cut`` is the cosine cutoff on ``[0, d_hi]`` (the lower cutoff does not enter
the basis' own envelope, as in torchmd-net).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["cosine_cutoff", "ExpNormalBasis"]


def cosine_cutoff(d: torch.Tensor, upper: float, lower: float = 0.0) -> torch.Tensor:
    """Cosine cutoff (same shape as ``d``, Å): ``(cos(pi d / upper) + 1) / 2`` for ``d < upper``, else 0.

    With ``lower > 0`` the switch runs over ``[lower, upper]``, ``(cos(pi (2 (d - lower)/(upper - lower) + 1)) + 1)/2``,
    and is zero outside ``(lower, upper)`` (torchmd-net's ``CosineCutoff``). Smooth (C^1) at ``upper``.
    """
    if lower > 0:
        x = 2.0 * (d - lower) / (upper - lower) + 1.0
        value = 0.5 * (torch.cos(math.pi * x) + 1.0)
        return value * ((d < upper) & (d > lower)).to(d.dtype)
    value = 0.5 * (torch.cos(d * (math.pi / upper)) + 1.0)
    return value * (d < upper).to(d.dtype)


class ExpNormalBasis(nn.Module):
    """``num_rbf`` exponential-normal functions of the distance (Å), each multiplied by a cosine cutoff.

    ``forward(d)``: ``d`` (E,) -> (E, num_rbf). ``means`` / ``betas`` are buffers (parameters when ``trainable``).
    """

    def __init__(self, cutoff_lower: float, cutoff_upper: float, num_rbf: int, trainable: bool = False):
        super().__init__()
        if not cutoff_upper > cutoff_lower >= 0:
            raise ValueError(f"need 0 <= cutoff_lower < cutoff_upper, got {cutoff_lower}, {cutoff_upper}")
        if num_rbf < 1:
            raise ValueError(f"num_rbf must be >= 1, got {num_rbf}")
        self.cutoff_lower, self.cutoff_upper, self.num_rbf = float(cutoff_lower), float(cutoff_upper), int(num_rbf)
        self.alpha = 5.0 / (self.cutoff_upper - self.cutoff_lower)
        start = math.exp(self.cutoff_lower - self.cutoff_upper)
        means = torch.linspace(start, 1.0, self.num_rbf, dtype=torch.float64)
        betas = torch.full((self.num_rbf,), (2.0 / self.num_rbf * (1.0 - start)) ** -2, dtype=torch.float64)
        if trainable:
            self.means, self.betas = nn.Parameter(means), nn.Parameter(betas)
        else:
            self.register_buffer("means", means)
            self.register_buffer("betas", betas)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        d = d.unsqueeze(-1)
        envelope = cosine_cutoff(d, self.cutoff_upper)
        betas, means = self.betas.to(d.dtype), self.means.to(d.dtype)  # float64 constants, cast where used
        return envelope * torch.exp(-betas * (torch.exp(self.alpha * (self.cutoff_lower - d)) - means) ** 2)
