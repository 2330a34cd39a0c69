"""eSCN building blocks: S^2 quadrature grids, edge embedding (radial basis from :mod:`matkit.nn.radial`).

Spherical-harmonic coefficients use e3nn real harmonics with ``normalization="component"`` (each ``Y_lm`` has
mean square 1 over the sphere, ``Y_00 = 1``), l-major, polar axis +y.
"""
from __future__ import annotations

import numpy as np
import torch
from e3nn import o3
from torch import nn

from .radial import GaussianBasis

__all__ = ["SphereGrid", "EdgeEmbedding", "sphere_mlp"]


class SphereGrid(nn.Module):
    """Gauss-Legendre (in cos beta about +y) x uniform (in alpha) quadrature grid on S^2.

    Points ``(sin b sin a, cos b, sin b cos a)`` (e3nn's grid convention), ``res_beta`` Gauss-Legendre nodes in
    ``cos b`` and ``res_alpha`` equispaced ``a``. The rule integrates exactly every band-limited function of
    degree ``< 2 res_beta`` in ``cos b`` and ``< res_alpha`` in ``a``, so ``from_grid(to_grid(x)) == x`` for
    coefficients up to ``lmax`` when ``res_beta >= lmax + 1`` and ``res_alpha >= 2 mmax + 1``.

    A pointwise nonlinearity on the grid followed by :meth:`from_grid` is equivariant only up to aliasing: the
    product of the grid and the nonlinearity is not band-limited. The error falls quickly with the resolution.

    Parameters
    ----------
    lmax : degree of the coefficients.
    res_beta, res_alpha : grid resolution.
    kept : optional (K_t,) indices of a truncated coefficient set (e.g. ``|m| <= mmax``) to use instead of all
        ``(lmax+1)^2``.
    """

    def __init__(self, lmax: int, res_beta: int, res_alpha: int, kept: torch.Tensor | None = None):
        super().__init__()
        nodes, weights = np.polynomial.legendre.leggauss(res_beta)  # nodes = cos(beta)
        alpha = 2 * np.pi * np.arange(res_alpha) / res_alpha
        cos_b = np.repeat(nodes, res_alpha)
        sin_b = np.sqrt(1 - cos_b ** 2)
        a = np.tile(alpha, res_beta)
        points = np.stack([sin_b * np.sin(a), cos_b, sin_b * np.cos(a)], -1)
        quad = np.repeat(weights, res_alpha) * (2 * np.pi / res_alpha) / (4 * np.pi)  # sums to 1 (mean on S^2)
        sh = o3.spherical_harmonics(list(range(lmax + 1)), torch.tensor(points, dtype=torch.float64),
                                    normalize=True, normalization="component")  # (P, K)
        if kept is not None:
            sh = sh[:, kept]
        self.lmax, self.res_beta, self.res_alpha = lmax, res_beta, res_alpha
        self.register_buffer("to_grid_matrix", sh.contiguous(), persistent=False)                       # (P, K)
        quad_t = torch.tensor(quad, dtype=torch.float64)
        self.register_buffer("from_grid_matrix", (sh * quad_t[:, None]).T.contiguous(), persistent=False)  # (K, P)
        self.register_buffer("weights", quad_t, persistent=False)                                       # (P,)

    @property
    def num_points(self) -> int:
        return self.to_grid_matrix.shape[0]

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients (B, K, C) -> values (B, P, C)."""
        return torch.matmul(self.to_grid_matrix.to(x.dtype), x)

    def from_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Values (B, P, C) -> coefficients (B, K, C) by quadrature (projection onto the harmonics)."""
        return torch.matmul(self.from_grid_matrix.to(values.dtype), values)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average over the sphere of values (B, P, C) -> (B, C)."""
        return torch.einsum("p,bpc->bc", self.weights.to(values.dtype), values)


class EdgeEmbedding(nn.Module):
    """Invariant edge features ``SiLU(W_e SiLU(W_d G(d) + Emb_src(z_j) + Emb_dst(z_i)))`` (E, edge_channels)."""

    def __init__(self, num_species: int, cutoff: float, num_radial: int, edge_channels: int,
                 basis_width: float = 1.0):
        super().__init__()
        self.basis = GaussianBasis(cutoff, num_radial, basis_width)
        self.distance = nn.Linear(num_radial, edge_channels)
        self.source = nn.Embedding(num_species, edge_channels)
        self.target = nn.Embedding(num_species, edge_channels)
        self.mix = nn.Linear(edge_channels, edge_channels)
        for emb in (self.source, self.target):
            nn.init.uniform_(emb.weight, -0.001, 0.001)  # as in eSCN

    def forward(self, distance: torch.Tensor, species_source: torch.Tensor, species_target: torch.Tensor):
        h = self.distance(self.basis(distance)) + self.source(species_source) + self.target(species_target)
        return torch.nn.functional.silu(self.mix(torch.nn.functional.silu(h)))


def sphere_mlp(in_channels: int, hidden: int, out_channels: int, layers: int = 3) -> nn.Sequential:
    """Bias-free pointwise MLP with SiLU between layers (``layers`` linear maps)."""
    mods = []
    sizes = [in_channels] + [hidden] * (layers - 1) + [out_channels]
    for k in range(layers):
        mods.append(nn.Linear(sizes[k], sizes[k + 1], bias=False))
        if k < layers - 1:
            mods.append(nn.SiLU())
    return nn.Sequential(*mods)

