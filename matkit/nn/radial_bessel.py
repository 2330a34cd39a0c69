"""Bessel radial bases: DimeNet / MACE / NequIP ``sqrt(2/rc) sin(n pi r / rc) / r`` (:class:`BesselBasis`) and the
smooth orthonormalised spherical Bessel basis of M3GNet / matgl (:class:`SmoothBesselBasis`)."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BesselBasis", "SmoothBesselBasis"]


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


class SmoothBesselBasis(nn.Module):
    """Smooth, orthonormalised zeroth-order spherical Bessel basis (Kocer, Mason & Erturk, J. Chem. Phys. 150,
    154102 (2019); matgl's ``SphericalBesselFunction(smooth=True)``, used by M3GNet and matgl's TensorNet).

    With ``x_k(r) = k pi r / rc`` and ``sinc(x) = sin(x) / x``::

        f_n(r) = (-1)^n sqrt(2) pi / rc^(3/2) (n+1)(n+2) / sqrt((n+1)^2 + (n+2)^2) [sinc(x_{n+1}) + sinc(x_{n+2})]
        e_n = n^2 (n+2)^2 / (4 (n+1)^4 + 1),  d_0 = 1,  d_n = 1 - e_n / d_{n-1}
        g_0 = f_0,  g_n = (f_n + sqrt(e_n / d_{n-1}) g_{n-1}) / sqrt(d_n)          n = 0 .. num_basis - 1

    Each ``f_n`` and its first derivative vanish at ``rc``; the ``g_n`` span the same space and are orthonormal
    on [0, rc] with weight r^2. Every ``g_n`` is a fixed combination of ``sinc(x_k)``, k = 1..num_basis+1, so the basis is one
    (E, num_basis+1) sinc evaluation times a constant float64 matrix (cast to the input's dtype where used).
    Finite at r = 0 (``sinc(0) = 1``).

    ``forward(r)``: distances (E,) in Å -> (E, num_basis), units Å^-3/2.
    """

    def __init__(self, cutoff: float, num_basis: int = 3):
        super().__init__()
        if cutoff <= 0 or num_basis < 1:
            raise ValueError(f"SmoothBesselBasis needs cutoff > 0 and num_basis >= 1, got {cutoff}, {num_basis}")
        self.cutoff, self.num_basis = float(cutoff), int(num_basis)
        # f = sinc(x_1..x_{N+1}) @ F, then g = f @ G^T with G lower triangular (the recurrence above)
        n_max = self.num_basis
        F = torch.zeros(n_max + 1, n_max, dtype=torch.float64)
        for n in range(n_max):
            c = (-1) ** n * math.sqrt(2.0) * math.pi / self.cutoff ** 1.5 * (n + 1) * (n + 2) \
                / math.sqrt((n + 1) ** 2 + (n + 2) ** 2)
            F[n, n] = F[n + 1, n] = c
        G = torch.zeros(n_max, n_max, dtype=torch.float64)
        d_prev = 1.0
        G[0, 0] = 1.0
        for n in range(1, n_max):
            e = n ** 2 * (n + 2) ** 2 / (4 * (n + 1) ** 4 + 1)
            d = 1.0 - e / d_prev
            G[n] = math.sqrt(e / d_prev) * G[n - 1] / math.sqrt(d)
            G[n, n] = 1.0 / math.sqrt(d)
            d_prev = d
        # (N+1, N) float64 constants: a plain attribute, not a buffer, so that ``.to(float32)`` cannot round them
        self._coefficients = F @ G.t()
        self._cast = {}

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        key = (r.dtype, r.device)
        if key not in self._cast:
            self._cast[key] = self._coefficients.to(dtype=r.dtype, device=r.device)
        k = torch.arange(1, self.num_basis + 2, dtype=r.dtype, device=r.device)
        sinc = torch.sinc(r.unsqueeze(-1) * k / self.cutoff)        # torch.sinc(x) = sin(pi x) / (pi x)
        return sinc @ self._cast[key]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"
