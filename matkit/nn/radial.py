"""Radial functions of the interatomic distance, all in one place: bases, envelopes and cutoffs.

Bases (distances (E,) in Å -> (E, K)):

* :class:`BesselBasis`: DimeNet / MACE / NequIP ``sqrt(2/rc) sin(n pi r / rc) / r``;
* :class:`SmoothBesselBasis`: the smooth orthonormalised spherical Bessel basis of M3GNet / matgl;
* :class:`ExpNormalBasis`: PhysNet / torchmd-net "expnorm" (includes a cosine cutoff);
* :class:`GaussianBasis`: Gaussians with evenly spaced centres on [0, rc] (eSCN, FAENet / SchNet).

Envelopes and cutoffs (distances -> same shape, dimensionless, 1 at 0 and 0 from the cutoff on):

* :class:`PolynomialEnvelope`: DimeNet / MACE polynomial, value and first two derivatives vanish at rc;
* :func:`cosine_cutoff`: ``(cos(pi d / rc) + 1) / 2`` (torchmd-net's, optionally with a lower cutoff).

Constants are float64 and are cast to the input's dtype where they are used, so a module moved to float32 and
back keeps exact float64 values.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["BesselBasis", "SmoothBesselBasis", "ExpNormalBasis", "GaussianBasis", "PolynomialEnvelope",
           "cosine_cutoff"]


def _cast_cache(module: nn.Module, name: str, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (a float64 constant kept as a plain attribute) in the dtype / device of ``like``, cached."""
    cache = module.__dict__.setdefault("_cast", {})
    key = (name, like.dtype, like.device)
    if key not in cache:
        cache[key] = values.to(dtype=like.dtype, device=like.device)
    return cache[key]


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
    on [0, rc] with weight r^2. Every ``g_n`` is a fixed combination of ``sinc(x_k)``, k = 1..num_basis+1, so
    the basis is one (E, num_basis+1) sinc evaluation times a constant float64 matrix (cast to the input's dtype
    where used). Finite at r = 0 (``sinc(0) = 1``).

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

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        k = torch.arange(1, self.num_basis + 2, dtype=r.dtype, device=r.device)
        sinc = torch.sinc(r.unsqueeze(-1) * k / self.cutoff)        # torch.sinc(x) = sin(pi x) / (pi x)
        return sinc @ _cast_cache(self, "coefficients", self._coefficients, r)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"


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


class GaussianBasis(nn.Module):
    """``num`` Gaussians ``exp(-(d - mu_k)^2 / (2 s^2))``, centres evenly spaced on [0, cutoff].

    Standard deviation ``s = width * spacing``. ``norm_factor`` is ``1 / sqrt(sum_k G_k(d)^2)`` for d inside the
    range (the sum of squares is ~sqrt(pi) width), for initialising the layer that reads the basis.
    ``forward(d)``: (E,) Å -> (E, num).
    """

    def __init__(self, cutoff: float, num: int, width: float = 1.0):
        super().__init__()
        if cutoff <= 0 or num < 2 or width <= 0:
            raise ValueError(f"GaussianBasis needs cutoff > 0, num >= 2, width > 0; got {cutoff}, {num}, {width}")
        self.cutoff, self.num, self.width = float(cutoff), int(num), float(width)
        self._centres = torch.linspace(0.0, self.cutoff, self.num, dtype=torch.float64)
        self.coeff = -0.5 / (self.width * self.cutoff / (self.num - 1)) ** 2
        self.norm_factor = float((np.sqrt(np.pi) * self.width) ** -0.5)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coeff * (d[:, None] - _cast_cache(self, "centres", self._centres, d)) ** 2)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num={self.num}, width={self.width}"
