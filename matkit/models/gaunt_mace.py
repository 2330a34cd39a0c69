"""Gaunt-MACE: MACE (Batatia et al. 2022) with Gaunt tensor products (Luo, Chen & Krishnapriyan, ICLR 2024).

Forward pass (per layer t = 1..num_interactions; ``h`` node features, layout (N, (L+1)^2, C)):

1. edges: Bessel basis (``num_bessel``) times the polynomial envelope (p = ``envelope_p``) of the distance,
   e3nn SH of the direction up to ``max_ell`` (component normalisation);
2. embedding ``h^0_i = W[z_i]`` (C scalars);
3. interaction (:class:`~matkit.nn.mace_blocks.GauntInteraction`): self-connection ``sc = W_sc[z_i] h_i``
   (element-dependent, per degree), ``A_i = Linear( sum_j (R1_ij ∘ Linear_up(h)_j) ⊗_G (R2_ij ∘ Y_ij) )
   / avg_num_neighbors`` with A up to degree ``max_ell``;
4. product basis (:class:`~matkit.nn.mace_blocks.GauntManyBodyProduct`), correlation order nu:
   ``B = sum_nu w[z, nu, l, c] (A^nu)_lm``, the powers taken pointwise on an exact S^2 grid (A is put on the
   grid once); ``h^t = Linear(B) + sc``;
5. readout: linear on the scalars for inner layers, Linear -> 16 -> SiLU -> Linear for the last;
   per-atom raw energy = sum of the readouts (scale, shift and E0 by :class:`~matkit.models.base.Potential`).

Hidden features carry degrees <= ``hidden_lmax`` (the last layer keeps only scalars, as in MACE).

Symmetry: all features are natural-parity functions on the sphere (0e, 1o, 2e, 3o ...), and a Gaunt
product of such functions is again one, so the model is exactly O(3)-equivariant (E(3)-invariant energy,
reflections included). It is *less expressive* than CG-MACE: Gaunt products contain no path with odd
``l1 + l2 + l3`` (no cross product 1o x 1o -> 1e, no 1 x 2 -> 2, no pseudo-tensors), the product basis only
takes powers of one function per channel (no mixing of channels or of paths inside the product), and the
message path weights are factorised as ``R1[l1, c] R2[l2, c]`` (or ``R1[l1, c] R2[l2]`` with
``channelwise_y_weights=False``) instead of one weight per (l1, l2, l3) path and channel.

Cost: messages into scalar features (the first layer, and every layer when ``hidden_lmax=0``) are MACE's
``h_j R[l, c] Y_lm`` evaluated as batched matrix products over padded neighbour slots. Messages into l > 0
features run on an exact S^2 grid of ``G`` points (degree ``hidden_lmax + 2 max_ell``; G = 32 for
hidden_lmax 1, 45 for 2); with per-channel Y weights this materialises (E, G, C) tensors (memory ~ E G C),
with channel-shared Y weights it is again one batched matrix product per atom. The many-body product puts A
on a grid of degree ``correlation * max_ell + hidden_lmax`` once per layer (50 points for l <= 3, nu = 3, scalar
output) and projects the three powers back with one matrix product.

Defaults follow MACE (r_max 5 Å, 8 Bessel functions, p = 5, radial MLP [64, 64, 64], max_ell 3,
correlation 3, 2 interactions, 128 channels) with hidden features up to l = 2 (the GTP paper's
0e + 1o + 2e setting); ``hidden_lmax=0`` is the MACE-MP "small" shape (128x0e), ``hidden_lmax=1`` "medium".
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from ..graph import MIN_PAIR_DISTANCE
from ..nn.mace_blocks import (GauntInteraction, GauntManyBodyProduct, IrrepsLinear, NeighbourSlots, ScaledSiLU,
                              SpeciesIrrepsLinear)
from ..nn.radial import BesselBasis, PolynomialEnvelope
from ..nn.radial_table import cached_tables
from ..nn.sphere_grid import spherical_harmonics
from .base import Potential, register

__all__ = ["GauntMACE"]


class GauntMACELayer(nn.Module):
    """One interaction + product-basis layer: h (N, K_in, C) -> h' (N, K_out, C)."""

    def __init__(self, num_channels, lmax_in, lmax_out, max_ell, correlation, num_species, num_bessel,
                 radial_mlp, avg_num_neighbors, channelwise_y_weights=True):
        super().__init__()
        self.lmax_in, self.lmax_out = lmax_in, lmax_out
        self.self_connection = SpeciesIrrepsLinear(num_channels, num_channels, min(lmax_in, lmax_out), num_species)
        self.interaction = GauntInteraction(num_channels, lmax_in, max_ell, max_ell, num_bessel, radial_mlp,
                                            avg_num_neighbors, channelwise_y_weights)
        self.product = GauntManyBodyProduct(num_channels, max_ell, lmax_out, correlation, num_species)
        self.linear = IrrepsLinear(num_channels, num_channels, lmax_out)

    def forward(self, h, species, edge_radial, edge_sh, slots, edge_weights=None):
        sc = self.self_connection(h, species)
        a = self.interaction(h, edge_radial, edge_sh, slots, edge_weights)
        out = self.linear(self.product(a, species))
        if sc.shape[1] < out.shape[1]:
            return torch.cat([out[:, : sc.shape[1]] + sc, out[:, sc.shape[1]:]], dim=1)
        return out + sc


@register("gaunt_mace")
class GauntMACE(Potential):
    """MACE with Gaunt tensor products in the messages and in the many-body product basis.

    Parameters (all keyword)
    ----------
    species : supported atomic numbers.  cutoff : r_max in Å (5.0).
    num_channels : channels C of every feature (128).
    max_ell : degree of the edge spherical harmonics and of the messages A (3).
    hidden_lmax : degree of the node features between layers (2; the last layer is scalar).
    correlation : body order of the product basis nu (3).  num_interactions : layers (2).
    num_bessel : radial Bessel functions (8).  envelope_p : polynomial envelope exponent (5).
    radial_mlp : hidden sizes of the radial MLP ([64, 64, 64]).
    readout_hidden : width of the last layer's MLP readout (16).
    avg_num_neighbors : message normalisation (20.0; set it to the training set's mean neighbour count).
    channelwise_y_weights : in layers whose input features have l > 0, weight the degree-l2 blocks of the edge
        SH per (l2, channel) (True, more expressive) or per l2 only, shared by the channels (False: the
        message becomes one batched matrix product per atom, ~3-5x less memory and faster on large systems).
        The first layer (scalar input) always uses per-(l2, channel) weights, exactly as MACE.
    """

    def __init__(self, species: Sequence[int] = (1, 6, 8), cutoff: float = 5.0, num_channels: int = 128,
                 max_ell: int = 3, hidden_lmax: int = 2, correlation: int = 3, num_interactions: int = 2,
                 num_bessel: int = 8, envelope_p: int = 5, radial_mlp: Sequence[int] = (64, 64, 64),
                 readout_hidden: int = 16, avg_num_neighbors: float = 20.0, channelwise_y_weights: bool = True):
        super().__init__(species=species, cutoff=cutoff)
        if num_interactions < 1 or num_channels < 1 or max_ell < 0 or hidden_lmax < 0 or correlation < 1:
            raise ValueError("gaunt_mace needs num_interactions >= 1, num_channels >= 1, max_ell >= 0, "
                             f"hidden_lmax >= 0, correlation >= 1; got {num_interactions}, {num_channels}, "
                             f"{max_ell}, {hidden_lmax}, {correlation}")
        if avg_num_neighbors <= 0:
            raise ValueError(f"avg_num_neighbors must be positive, got {avg_num_neighbors}")
        self.num_channels, self.max_ell = int(num_channels), int(max_ell)
        self.radial_basis = BesselBasis(cutoff, num_bessel)
        self.envelope = PolynomialEnvelope(cutoff, envelope_p)
        self.embedding = nn.Parameter(torch.randn(self.num_species, num_channels))
        layers, readouts = [], []
        lmax_in = 0
        for t in range(num_interactions):
            last = t == num_interactions - 1
            lmax_out = 0 if last else int(hidden_lmax)
            layers.append(GauntMACELayer(num_channels, lmax_in, lmax_out, max_ell, correlation, self.num_species,
                                         num_bessel, list(radial_mlp), avg_num_neighbors, channelwise_y_weights))
            if last:
                readouts.append(nn.Sequential(nn.Linear(num_channels, readout_hidden, bias=False), ScaledSiLU(),
                                              nn.Linear(readout_hidden, 1, bias=False)))
            else:
                readouts.append(nn.Linear(num_channels, 1, bias=False))
            lmax_in = lmax_out
        self.layers = nn.ModuleList(layers)
        self.readouts = nn.ModuleList(readouts)
        for module in self.readouts.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))

    def edge_features(self, edge_vec: torch.Tensor):
        """Radial features (E, num_bessel) with the envelope applied, and SH (E, (max_ell+1)^2)."""
        r = torch.linalg.norm(edge_vec, dim=-1)
        radial = self.radial_basis(r) * self.envelope(r).unsqueeze(-1)
        return radial, spherical_harmonics(self.max_ell, edge_vec)

    def raw_atomic_energies(self, graph, species, edge_vec):
        edge_radial, edge_sh = self.edge_features(edge_vec)
        tables = self._radial_tables(edge_vec)
        if tables is not None:  # inference: the radial MLPs as splines of the distance (matkit.nn.radial_table)
            r = torch.linalg.vector_norm(edge_vec, dim=-1)
            edge_weights = [table(r) for table in tables]
        else:
            edge_weights = [None] * len(self.layers)
        h = self.embedding[species].unsqueeze(1).to(edge_vec.dtype)  # (N, 1, C)
        slots = NeighbourSlots(graph.edge_index, species.shape[0], edge_sh, edge_radial)
        energy = edge_vec.new_zeros(species.shape[0])
        for layer, readout, weights in zip(self.layers, self.readouts, edge_weights):
            h = layer(h, species, edge_radial, edge_sh, slots, weights)
            energy = energy + readout(h[:, 0]).squeeze(-1)
        return energy

    def _radial_functions(self):
        """float64 copies of each layer's ``RadialMLP(basis(d) * envelope(d))``: d (E,) Å -> (E, num_radial_out)."""
        basis = copy.deepcopy(self.radial_basis).double()
        envelope = copy.deepcopy(self.envelope).double()
        mlps = [copy.deepcopy(layer.interaction.radial).double() for layer in self.layers]
        return [lambda d, mlp=mlp: mlp(basis(d) * envelope(d).unsqueeze(-1)) for mlp in mlps]

    def _radial_tables(self, like: torch.Tensor):
        """The radial tables (one per layer) at inference, else None (see ``cached_tables``); from
        :data:`~matkit.graph.MIN_PAIR_DISTANCE` on, since the Bessel basis is 0/0 at d = 0."""
        params = [p for layer in self.layers for p in layer.interaction.radial.parameters()]
        return cached_tables(self, params, like, self._radial_functions, start=MIN_PAIR_DISTANCE)
