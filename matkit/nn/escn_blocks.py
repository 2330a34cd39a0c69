"""eSCN building blocks: edge embedding (radial basis from :mod:`matkit.nn.radial`) and the pointwise sphere MLP
(the S^2 grid is :class:`matkit.nn.sphere_grid.SphereGrid`).

Spherical-harmonic coefficients use e3nn real harmonics with ``normalization="component"`` (each ``Y_lm`` has
mean square 1 over the sphere, ``Y_00 = 1``), l-major, polar axis +y.
"""
from __future__ import annotations

import torch
from torch import nn

from .radial import GaussianBasis

__all__ = ["EdgeEmbedding", "sphere_mlp"]


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

