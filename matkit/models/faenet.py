"""FAENet (Duval et al., ICML 2023): a fast non-equivariant message-passing network made E(3)-invariant by
frame averaging (:mod:`matkit.nn.frame_averaging`).

Network (per frame; edge vectors ``r_ij`` are expressed in the frame)::

    node:   h_i = SiLU(W [Emb(Z_i) | Emb_period(Z_i) | Emb_group(Z_i)])
    edge:   e_ij = SiLU(W2 SiLU([W_r r_ij | W_d RBF(|r_ij|)]))
    layer:  h'_j = SiLU(W_down h_j);  m_i = sum_j h'_j * SiLU(W_e e_ij) * envelope(|r_ij|) / avg_num_neighbors
            h_i <- h_i + SiLU(W_up SiLU(m_i))
    energy: E_i = W_out [MLP_0(h_i^(1)) | ... | MLP_L(h_i^(L))]   (per-layer heads, "skip_co concat")

Differences from the reference, on purpose: a smooth polynomial envelope on every edge (energy and forces are
continuous at the cutoff); no GraphNorm / BatchNorm, so a structure's result never depends on what else is in the
batch (messages are normalised by a fixed ``avg_num_neighbors`` instead); element embeddings for all 118 elements
with period and group computed from Z (no mendeleev dependency); conservative forces and stress by autograd of the
frame-averaged energy (including the derivative of the frames, see frame_averaging). The paper's direct force head
is available with ``direct_forces=True`` through :meth:`FAENet.direct_forces`; it is NOT conservative, only
reported, never used by the calculator.

All frames of a batch are evaluated in one pass: tensors carry a leading frame dimension K.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..graph import graph_batch_vector, num_graphs
from ..nn.frame_averaging import FrameSet, compute_frames
from .base import Potential, register

_NOBLE = [2, 10, 18, 36, 54, 86, 118]


def period_and_group(z: int) -> tuple[int, int]:
    """Period (1-7) and IUPAC group (1-18; lanthanides and actinides get 19) of element ``z``."""
    period = next(p for p, last in enumerate(_NOBLE, start=1) if z <= last)
    start = ([0] + _NOBLE)[period - 1]
    k = z - start  # position in the period, 1-based
    if period == 1:
        return 1, 1 if z == 1 else 18
    if period in (2, 3):
        return period, k if k <= 2 else k + 10
    if period in (4, 5):
        return period, k
    # periods 6 and 7: 2 s-block, 15 f-block (La..Yb style, group 19), then groups 4..18
    if k <= 2:
        return period, k
    if k <= 16:
        return period, 19 if k > 3 else 3
    return period, k - 14


def gaussian_rbf(distance: torch.Tensor, cutoff: float, num: int) -> torch.Tensor:
    centres = torch.linspace(0.0, cutoff, num, dtype=distance.dtype, device=distance.device)
    width = cutoff / (num - 1)
    return torch.exp(-0.5 * ((distance[..., None] - centres) / width) ** 2)


def polynomial_envelope(distance: torch.Tensor, cutoff: float, p: int = 5) -> torch.Tensor:
    """MACE/DimeNet polynomial envelope: 1 at 0, zero value and first two derivatives at the cutoff."""
    x = (distance / cutoff).clamp(max=1.0)
    env = (1.0 - (p + 1) * (p + 2) / 2 * x ** p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2))
    return env * (distance < cutoff)


class Interaction(nn.Module):
    """FAENet "updownscale" interaction with residual update."""

    def __init__(self, hidden: int, filters: int):
        super().__init__()
        self.down = nn.Linear(hidden, filters)
        self.edge = nn.Linear(filters, filters)
        self.up = nn.Linear(filters, hidden)

    def forward(self, h, edge_feat, envelope, src, dst, inv_avg_neighbors):
        """h (K, N, F); edge_feat (K, E, filters); envelope (E,) smooth cutoff weight of each edge."""
        hj = torch.nn.functional.silu(self.down(h))[:, src]
        messages = hj * torch.nn.functional.silu(self.edge(edge_feat)) * envelope[None, :, None]
        m = torch.zeros(h.shape[0], h.shape[1], messages.shape[-1], dtype=h.dtype, device=h.device)
        m = m.index_add(1, dst, messages) * inv_avg_neighbors
        return h + torch.nn.functional.silu(self.up(torch.nn.functional.silu(m)))


@register("faenet")
class FAENet(Potential):
    """Frame-averaged FAENet potential.

    Parameters: ``hidden`` node features, ``filters`` edge filters, ``num_interactions``, ``num_gaussians``,
    ``avg_num_neighbors`` (fixed message normalisation), ``frame_mode`` "3D" or "2D" (slabs),
    ``proper_frames`` (True: only det = +1 frames, SE(3)-invariant; False: all 8 sign frames, E(3)),
    ``stochastic_training`` (one random frame per structure while ``model.training``), ``degeneracy_tol``,
    ``frame_chunk`` (frames evaluated per pass; 1 is fastest on CPU because tensors stay cache-sized).
    Defaults follow the reference package (hidden 128, 4 interactions, 50 Gaussians, cutoff 6 Å) except 64 edge
    filters instead of 128, which halves the cost of the per-frame edge tensors.
    """

    def __init__(self, species: Sequence[int] = (1, 6, 7, 8, 14), cutoff: float = 6.0, hidden: int = 128,
                 filters: int = 64, num_interactions: int = 4, num_gaussians: int = 50, pg_dim: int = 32,
                 avg_num_neighbors: float = 20.0, frame_mode: str = "3D", proper_frames: bool = False,
                 stochastic_training: bool = True, degeneracy_tol: float = 1e-4, direct_forces: bool = False,
                 frame_chunk: int = 1):
        super().__init__(species=species, cutoff=cutoff)
        self.num_gaussians, self.frame_mode, self.proper_frames = num_gaussians, frame_mode, proper_frames
        self.stochastic_training, self.degeneracy_tol = stochastic_training, degeneracy_tol
        self.inv_avg_neighbors = 1.0 / float(avg_num_neighbors)
        self.frame_chunk = max(1, int(frame_chunk))
        pg = torch.tensor([period_and_group(z) for z in self.species])
        self.register_buffer("period", pg[:, 0], persistent=False)
        self.register_buffer("group", pg[:, 1], persistent=False)
        self.element_embedding = nn.Embedding(len(self.species), hidden)
        self.period_embedding = nn.Embedding(8, pg_dim)
        self.group_embedding = nn.Embedding(20, pg_dim)
        self.node_mlp = nn.Linear(hidden + 2 * pg_dim, hidden)
        self.edge_vec = nn.Linear(3, filters // 2)
        self.edge_rbf = nn.Linear(num_gaussians, filters - filters // 2)
        self.edge_mlp = nn.Linear(filters, filters)
        self.interactions = nn.ModuleList(Interaction(hidden, filters) for _ in range(num_interactions))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden // 2), nn.SiLU(), nn.Linear(hidden // 2, 1))
                                   for _ in range(num_interactions))
        self.skip = nn.Linear(num_interactions, 1)
        self.force_head = (nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3))
                           if direct_forces else None)

    # ---- frames ------------------------------------------------------------------------------------------------
    def frames(self, graph, edge_vec):
        batch = graph_batch_vector(graph)
        stochastic = self.training and self.stochastic_training
        return compute_frames(graph.pos, edge_vec, graph.edge_index, batch, num_graphs(graph), graph.pbc,
                              self.cutoff, mode=self.frame_mode, proper_only=self.proper_frames,
                              stochastic=stochastic, degeneracy_tol=self.degeneracy_tol)

    # ---- network -----------------------------------------------------------------------------------------------
    def embed_nodes(self, species):
        h = torch.cat([self.element_embedding(species), self.period_embedding(self.period[species]),
                       self.group_embedding(self.group[species])], dim=-1)
        return torch.nn.functional.silu(self.node_mlp(h))

    def embed_edges(self, local_vec, distance):
        """local_vec (K, E, 3) in frame coordinates; distance (E,)."""
        rbf = gaussian_rbf(distance, self.cutoff, self.num_gaussians).expand(local_vec.shape[0], -1, -1)
        e = torch.nn.functional.silu(torch.cat([self.edge_vec(local_vec), self.edge_rbf(rbf)], dim=-1))
        return torch.nn.functional.silu(self.edge_mlp(e))

    def node_features(self, graph, species, edge_vec, frames):
        """Per-frame, per-layer node features: list of (K, N, hidden)."""
        batch = graph_batch_vector(graph)
        src, dst = graph.edge_index[0], graph.edge_index[1]
        rot = frames.rotations[:, batch[dst]] if src.numel() else frames.rotations[:, :0]  # (K, E, 3, 3)
        local = torch.einsum("ei,keij->kej", edge_vec, rot)
        distance = edge_vec.norm(dim=-1) if src.numel() else edge_vec.new_zeros(0)
        edge_feat = self.embed_edges(local, distance)
        envelope = polynomial_envelope(distance, self.cutoff)
        h = self.embed_nodes(species).expand(frames.num_frames, -1, -1)
        layers = []
        for interaction in self.interactions:
            h = interaction(h, edge_feat, envelope, src, dst, self.inv_avg_neighbors)
            layers.append(h)
        return layers

    def raw_atomic_energies(self, graph, species, edge_vec):
        frames = self.frames(graph, edge_vec)
        total = 0.0
        # frames are evaluated in chunks: smaller (chunk, E, F) tensors stay in cache and in the malloc heap
        for start in range(0, frames.num_frames, self.frame_chunk):
            chunk = FrameSet(frames.rotations[start:start + self.frame_chunk], frames.degenerate)
            layers = self.node_features(graph, species, edge_vec, chunk)
            per_layer = torch.cat([head(h) for head, h in zip(self.heads, layers)], dim=-1)  # (k, N, L)
            total = total + self.skip(per_layer).squeeze(-1).sum(dim=0)
        return total / frames.num_frames

    def direct_forces(self, graph) -> torch.Tensor:
        """Non-conservative forces (N, 3) eV/Å from the direct head, frame-averaged and rotated back.

        NOT the gradient of the energy: use only where the paper's fast mode is wanted; the calculator and the
        trainer use conservative autograd forces.
        """
        if self.force_head is None:
            raise RuntimeError("this FAENet was built with direct_forces=False")
        from ..graph import edge_vectors

        batch = graph_batch_vector(graph)
        edge_vec = edge_vectors(graph.pos, graph.cell, graph.edge_index, graph.shifts, batch)
        frames = self.frames(graph, edge_vec)
        h = self.node_features(graph, self.species_index(graph.atomic_numbers), edge_vec, frames)[-1]
        local_forces = self.force_head(h)  # (K, N, 3) in frame coordinates
        world = torch.einsum("knj,knij->kni", local_forces, frames.rotations[:, batch])
        return world.mean(dim=0) * self.scale.to(world.dtype)
