"""eSCN building blocks: edge embedding (radial basis from :mod:`matkit.nn.radial`) and the pointwise sphere MLP
on the S^2 grid of :class:`matkit.nn.sphere_grid.SphereGrid`.

Spherical-harmonic coefficients use e3nn real harmonics with ``normalization="component"`` (each ``Y_lm`` has
mean square 1 over the sphere, ``Y_00 = 1``), l-major, polar axis +y.
"""
from __future__ import annotations

import torch
from torch import nn

from .radial import GaussianBasis
from .sphere_grid import SphereGrid
from .sphere_grid_kernels import GridMLP, cpu_inference

__all__ = ["EdgeEmbedding", "sphere_mlp", "grid_mlp"]


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


def grid_mlp(mlp: nn.Sequential, grid: SphereGrid, x: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """``from_grid(mlp(to_grid(x)))``, or with ``mean=True`` the sphere average ``mean(mlp(to_grid(x)))``, for a
    3-layer :func:`sphere_mlp` applied pointwise on ``grid``: coefficients (N, K, C_in) -> (N, K_out, C_out), or
    (N, C_out) with ``mean``.

    The first and last linear maps act on channels and the grid transforms on coefficients, so they commute:
    the first map runs on the K coefficients before ``to_grid`` and the last on the K_out coefficients (or the
    sphere mean) after ``from_grid``, instead of on every one of the P >> K grid points; only the middle layer and
    the two SiLUs run on the grid. At frozen-weight inference on CPU the grid part is one Numba pass
    (:class:`matkit.nn.sphere_grid_kernels.GridMLP`)."""
    first, middle, last = mlp[0], mlp[2], mlp[4]
    z = first(x)                                                           # (N, K, H)
    if cpu_inference(mlp, x) and not middle.weight.requires_grad:
        projection = grid.weights64.view(1, -1) if mean else grid.from_grid64
        u = GridMLP.apply(z, grid.to_grid_matrix(x.dtype), projection.to(x.dtype), middle.weight)
        u = u.squeeze(1) if mean else u
    else:
        h = mlp[3](middle(mlp[1](grid.to_grid(z))))                        # (N, P, H)
        u = grid.mean(h) if mean else grid.from_grid(h)
    return last(u)
