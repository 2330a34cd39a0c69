"""eSCN: Equivariant Spherical Channel Network (Passaro & Zitnick, ICML 2023), conservative variant.

Each atom carries spherical-harmonic coefficients ``x_i`` (N, K, C), ``K = (lmax+1)^2`` (e3nn real harmonics,
component normalisation, l-major, polar axis +y). One layer:

1. **Message** for every edge j -> i (``edge_index = [j, i]``, ``edge_vec = r_j - r_i``):
   rotate ``x_j`` and ``x_i`` into the edge frame (edge on +y; :func:`matkit.nn.wigner.edge_frame_rotation`),
   keep orders ``|m| <= mmax``, concatenate channels, apply the SO(2) convolution whose weights are generated
   from invariant edge features (distance Gaussians + species embeddings), apply SiLU pointwise on an S^2 grid
   *in the edge frame*, rotate back (orders ``|m| > mmax`` come back as zeros), multiply by a smooth polynomial
   envelope of the distance, and sum at i (divided by ``avg_num_neighbors``).
2. **Node update**: sample ``x_i`` and its aggregated message on a global S^2 grid, apply a bias-free MLP
   (2C -> C -> C -> C, SiLU) pointwise and project back; layer 0 replaces ``x``, later layers add to it.

Readout: ``E_i`` = sphere average of a pointwise MLP (C -> C -> C -> 1) of ``x_i`` on the global grid.

Differences from the reference (fairchem ``escn.py``), all deliberate:

* Conservative forces and stress by autograd (base class); no direct force head. The edge rotation and the
  Wigner matrices are differentiated (not detached) and have finite gradients for edges exactly along +-y.
* Deterministic edge frame (minimal rotation onto +y) instead of a random roll: the SO(2) convolution commutes
  with rotations about the edge, so the roll does not matter except through grid aliasing (see below).
* Smooth polynomial envelope at the cutoff and no neighbour cap: energy and forces are continuous.
* Wigner matrices as polynomials in R, no Euler angles: closed forms for l <= 2, a least-squares fit of the
  harmonics at fixed points above (:class:`matkit.nn.wigner.WignerD`).
* The source and target SO(2) blocks are one SO(2) convolution on the concatenated channels.
* ``chiral=False`` (default) drops the imaginary SO(2) weights, which makes the model O(3)-invariant (mirror
  images have equal energy, as physics requires); ``chiral=True`` is the reference's SO(3)-only model.

**Approximate equivariance.** The SO(2)/SO(3) linear parts are exact. The two grid nonlinearities alias: the
edge-frame one is exact only for rotations about the edge by multiples of ``2 pi / res_alpha``, the node one only
up to the quadrature error for non-band-limited functions. Both errors fall exponentially with the resolution;
the defaults, edge ``(lmax+2, 4 mmax+4)`` and node ``(2 lmax+6, 4 lmax+12)``, keep them near 1e-11 relative for
random weights (trained weights with larger activations alias more; ``tests/test_escn.py`` measures the tested
configuration, ``benchmarks/README.md`` lists the error against the resolution).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..graph import graph_batch_vector  # noqa: F401  (kept for API symmetry with other models)
from ..nn.escn_blocks import EdgeEmbedding, grid_mlp, sphere_mlp
from ..nn.radial import PolynomialEnvelope
from ..nn.escn_kernels import ProjectGather, RotateScatter
from ..nn.sphere_grid import SphereGrid, degree_of_coefficient
from ..nn.sphere_grid_kernels import cpu_inference
from ..nn.so2 import SO2Convolution, TruncatedLayout
from ..nn.wigner import WignerD, edge_frame_rotation
from .base import Potential, register

__all__ = ["ESCN"]


def default_grids(lmax: int, mmax: int) -> tuple:
    """(edge grid (res_beta, res_alpha), node grid (res_beta, res_alpha)) used when none are given."""
    return (lmax + 2, 4 * mmax + 4), (2 * lmax + 6, 4 * lmax + 12)


class MessageBlock(nn.Module):
    """Edge-frame SO(2) convolution + edge-grid SiLU for one layer."""

    def __init__(self, num_species, cutoff, lmax, mmax, channels, hidden, edge_channels, num_radial,
                 basis_width, chiral, edge_grid, kept):
        super().__init__()
        self.edge_embedding = EdgeEmbedding(num_species, cutoff, num_radial, edge_channels, basis_width)
        self.so2 = SO2Convolution(lmax, mmax, 2 * channels, channels, hidden, edge_channels, chiral, order="m")
        self.grid = SphereGrid(lmax, resolution=edge_grid, kept=kept)

    def forward(self, x, rotation, source, target, distance, species_source, species_target, rows=None):
        """Node coefficients x (N, K, C), edge rotations (E, K_t, K), edge ends and distances -> message
        (E, K_t, C) in the edge frame. With ``rows`` (the kept rows' degree, hidden row and order block; see
        :class:`matkit.nn.escn_kernels.ProjectGather`) the Numba gather runs; otherwise torch ops."""
        edge = self.edge_embedding(distance, species_source, species_target)
        if rows is not None:
            hidden = ProjectGather.apply(self.project(x), rotation, source, target, *rows, 2 * self.so2.layout.mmax + 1)
            return self.grid.silu(self.so2.forward_hidden(hidden, edge))
        x_edge = torch.cat([rotation @ x.index_select(0, source), rotation @ x.index_select(0, target)], -1)
        return self.grid.silu(self.so2(x_edge, edge))                  # x_edge (E, K_t, 2C)

    def project(self, x):
        """(N, K, C) -> (N, K, 2 B H): the SO(2) convolution's first linear maps applied to each end's half of
        its input channels, per degree (channel ``(end * B + block) * H + h``)."""
        c, parts = x.shape[-1], []
        for l in range(self.so2.layout.lmax + 1):
            weight = self.so2.input_projection(l).to(x.dtype)              # (2C, B, H)
            parts.append(x[:, l * l:(l + 1) ** 2] @ torch.cat([weight[:c], weight[c:]], 1).flatten(1))
        return torch.cat(parts, 1)


class NodeUpdate(nn.Module):
    """Pointwise MLP on the global S^2 grid of [x_i, message_i] -> update of x_i."""

    def __init__(self, channels, grid: SphereGrid):
        super().__init__()
        self.mlp = sphere_mlp(2 * channels, channels, channels, layers=3)
        self.grid = grid

    def forward(self, x, message):
        return grid_mlp(self.mlp, self.grid, torch.cat([x, message], -1))


@register("escn")
class ESCN(Potential):
    """Equivariant Spherical Channel Network (conservative).

    Parameters
    ----------
    species, cutoff : supported atomic numbers; cutoff in Å.
    num_layers : message-passing layers.
    lmax, mmax : degree of the node coefficients and order truncation of the SO(2) convolution.
    sphere_channels : channels C per coefficient.
    hidden_channels : bottleneck H of the SO(2) convolution.
    edge_channels, num_radial, basis_width : edge features from ``num_radial`` Gaussians on [0, cutoff].
    envelope_exponent : p of the polynomial cutoff envelope.
    avg_num_neighbors : messages are summed and divided by this.
    chiral : keep the imaginary SO(2) weights (reference eSCN; SO(3)- but not reflection-invariant).
    edge_grid, node_grid : (res_beta, res_alpha) of the edge-frame and node S^2 grids (defaults: see
        :func:`default_grids`).

    The defaults are the shape of the bundled eSCN potentials (``escn-acac``; ``escn-si`` has 16 channels):
    lmax 2, mmax 1, 32 channels. Larger shapes cost much more: every edge rotates (lmax+1)^2 coefficients per
    channel into its frame and back and evaluates the grid nonlinearity on its own S^2 grid, so the cost per edge
    grows as ~lmax^2 to lmax^3 times channels^2 (timings in ``benchmarks/README.md``).
    """

    def __init__(self, species: Sequence[int], cutoff: float = 5.0, num_layers: int = 2, lmax: int = 2,
                 mmax: int = 1, sphere_channels: int = 32, hidden_channels: int = 32, edge_channels: int = 32,
                 num_radial: int = 32, basis_width: float = 1.0, envelope_exponent: int = 5,
                 avg_num_neighbors: float = 20.0, chiral: bool = False,
                 edge_grid: Optional[Sequence[int]] = None, node_grid: Optional[Sequence[int]] = None):
        super().__init__(species=species, cutoff=cutoff)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        default_edge, default_node = default_grids(lmax, mmax)
        edge_grid = tuple(edge_grid or default_edge)
        node_grid = tuple(node_grid or default_node)
        if edge_grid[0] < lmax + 1 or edge_grid[1] < 2 * mmax + 1:
            raise ValueError(f"edge_grid {edge_grid} too coarse: need res_beta >= lmax+1 = {lmax + 1} and "
                             f"res_alpha >= 2*mmax+1 = {2 * mmax + 1}")
        if node_grid[0] < lmax + 1 or node_grid[1] < 2 * lmax + 1:
            raise ValueError(f"node_grid {node_grid} too coarse: need res_beta >= lmax+1 = {lmax + 1} and "
                             f"res_alpha >= 2*lmax+1 = {2 * lmax + 1}")
        self.lmax, self.mmax, self.channels = lmax, mmax, sphere_channels
        self.avg_num_neighbors = float(avg_num_neighbors)
        layout = TruncatedLayout(lmax, mmax, order="m")   # edge-frame coefficients m-major (matkit.nn.so2)
        self.register_buffer("kept", layout.kept, persistent=False)
        degree = degree_of_coefficient(lmax)[layout.kept]
        order = layout.kept - degree * (degree + 1)                               # m of each kept row
        self.register_buffer("row_degree", degree, persistent=False)
        self.register_buffer("row_group", torch.where(order == 0, 0, 2 * order.abs() - (order > 0).long()),
                             persistent=False)                                  # hidden row: m = 0, +1, -1, ...
        self.register_buffer("row_block", order.abs(), persistent=False)
        self.wigner = WignerD(lmax)
        self.envelope = PolynomialEnvelope(cutoff, envelope_exponent)
        self.embedding = nn.Embedding(self.num_species, sphere_channels)
        self.node_grid = SphereGrid(lmax, resolution=node_grid)
        self.messages = nn.ModuleList([
            MessageBlock(self.num_species, cutoff, lmax, mmax, sphere_channels, hidden_channels, edge_channels,
                         num_radial, basis_width, chiral, edge_grid, layout.kept) for _ in range(num_layers)])
        self.updates = nn.ModuleList([NodeUpdate(sphere_channels, self.node_grid) for _ in range(num_layers)])
        self.energy_mlp = sphere_mlp(sphere_channels, sphere_channels, 1, layers=3)
        self.reset_linear_layers()

    def reset_linear_layers(self):
        """Variance-preserving init N(0, 1/fan_in) of every linear map (PyTorch's default shrinks the signal by
        ~sqrt(3) per bias-free layer, which makes a randomly initialised deep eSCN almost constant)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.messages:
            # only ~2 Gaussians overlap at any distance: unit-variance pre-activations need std ~ 1/sqrt(sum G^2)
            nn.init.normal_(block.edge_embedding.distance.weight, std=block.edge_embedding.basis.norm_factor)

    def edge_rotations(self, edge_vec: torch.Tensor) -> torch.Tensor:
        """Wigner matrices into the edge frame, rows truncated to |m| <= mmax, m-major: (E, K_t, K)."""
        return self.wigner(edge_frame_rotation(edge_vec), self.kept)

    def raw_atomic_energies(self, graph, species: torch.Tensor, edge_vec: torch.Tensor) -> torch.Tensor:
        source, target = graph.edge_index
        n = species.shape[0]
        dtype = edge_vec.dtype
        x = edge_vec.new_zeros((n, (self.lmax + 1) ** 2, self.channels))
        x[:, 0] = self.embedding(species).to(dtype)
        if edge_vec.shape[0] > 0:
            distance = edge_vec.norm(dim=-1)
            rotation = self.edge_rotations(edge_vec)                          # (E, K_t, K)
            weight = (self.envelope(distance) / self.avg_num_neighbors)[:, None, None]
            species_source, species_target = species[source], species[target]
        kernels = cpu_inference(self, edge_vec)   # matkit.nn.escn_kernels for the edge rotations (first order)
        rows = None   # the projected gather: achiral convolutions only (chiral ones have a second first map)
        if kernels and not self.messages[0].so2.chiral:
            rows = (self.row_degree, self.row_group, self.row_block)
        for layer, (message_block, update) in enumerate(zip(self.messages, self.updates)):
            aggregated = torch.zeros_like(x)
            if edge_vec.shape[0] > 0:
                message = message_block(x, rotation, source, target, distance, species_source, species_target,
                                        rows)                                        # (E, K_t, C)
                if kernels:
                    aggregated = RotateScatter.apply(message, rotation, weight.view(-1), target, self.row_degree, n)
                else:
                    message = rotation.transpose(1, 2) @ message * weight        # (E, K, C), global frame
                    aggregated = aggregated.index_add(0, target, message)
            delta = update(x, aggregated)
            x = delta if layer == 0 else x + delta
        return grid_mlp(self.energy_mlp, self.node_grid, x, mean=True).squeeze(-1)
