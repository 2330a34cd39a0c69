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

Tensors carry a leading frame dimension K; frames are evaluated ``frame_chunk`` at a time (1 by default). At
inference (``model.eval()``) each interaction's filter-and-message step runs as one fused, edge-chunked op
(:class:`_FilteredMessages`) that never stores per-edge filter or message tensors; training uses plain autograd ops
(force losses need a second backward pass), and a test checks that both give the same energies, forces and stress.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..graph import graph_batch_vector, num_graphs
from ..nn.frame_averaging import FrameSet, compute_frames
from ..nn.radial import GaussianBasis, PolynomialEnvelope
from ..nn.workspace import scratch_buffers
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


def _edge_chunk(channels: int) -> int:
    """Edges per chunk of the fused message op (a (chunk, channels) block of 128k numbers)."""
    return max(32, (1 << 17) // max(channels, 1))


def _edge_blocks(x: torch.Tensor, src: torch.Tensor, count: int):
    """Frame-by-frame, chunk-by-chunk iteration for :class:`_FilteredMessages`.

    Yields ``(k, start, stop, views)``: frame k, edges start:stop and ``count`` (stop - start, F) views into the
    calling thread's scratch buffers.
    """
    num_edges, f = src.shape[0], x.shape[2]
    step = min(_edge_chunk(f), num_edges)
    bufs = scratch_buffers(count, step * f, x.dtype, x.device)
    for k in range(x.shape[0]):
        for start in range(0, num_edges, step):
            stop = min(start + step, num_edges)
            n = stop - start
            yield k, start, stop, [b[:n * f].view(n, f) for b in bufs]


class _FilteredMessages(torch.autograd.Function):
    """``m[:, i] = sum_{e: dst_e = i} x[:, src_e] * SiLU(edge_feat[:, e] W^T + b) * env_e`` for all frames.

    x (K, N, F) neighbour features, edge_feat (K, E, Fe), weight (F, Fe), bias (F,), env (E,) -> (K, N, F).
    Forward and backward run frame by frame over chunks of edges in reused scratch buffers, so no (K, E, F)
    filter or message tensor is ever stored (the filter is recomputed in the backward pass). First-order
    differentiable only: models use it outside training, where force losses need a second backward pass.
    """

    @staticmethod
    def forward(ctx, x, edge_feat, weight, bias, env, src, dst):
        out = torch.zeros_like(x)
        weight_t = weight.t()
        for k, start, stop, (p, xs, fl) in _edge_blocks(x, src, 3):
            torch.addmm(bias, edge_feat[k, start:stop], weight_t, out=p)
            torch.ops.aten.silu.out(p, out=fl)
            fl.mul_(env[start:stop, None])
            torch.index_select(x[k], 0, src[start:stop], out=xs)
            fl.mul_(xs)
            out[k].index_add_(0, dst[start:stop], fl)
        ctx.save_for_backward(x, edge_feat, weight, bias, env, src, dst)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, edge_feat, weight, bias, env, src, dst = ctx.saved_tensors
        need_x, need_e, need_w, need_b, need_env = ctx.needs_input_grad[:5]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_e = torch.empty_like(edge_feat) if need_e else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        grad_env = torch.zeros_like(env) if need_env else None
        grad_out = grad_out.contiguous()
        weight_t = weight.t()
        for k, start, stop, (p, fl, g, t) in _edge_blocks(x, src, 4):
            envc = env[start:stop, None]
            torch.addmm(bias, edge_feat[k, start:stop], weight_t, out=p)
            torch.ops.aten.silu.out(p, out=fl)                             # the filter, recomputed
            torch.index_select(grad_out[k], 0, dst[start:stop], out=g)     # dL/dm at the centres
            if need_x:
                torch.mul(g, fl, out=t)
                t.mul_(envc)
                grad_x[k].index_add_(0, src[start:stop], t)
            torch.index_select(x[k], 0, src[start:stop], out=t)
            g.mul_(t)                                                      # g <- dL/d(filter * env)
            if need_env:
                torch.mul(g, fl, out=t)
                grad_env[start:stop] += t.sum(dim=1)
            if need_e or need_w or need_b:
                g.mul_(envc)                                               # g <- dL/d filter
                torch.ops.aten.silu_backward.grad_input(g, p, grad_input=t)
                g = t                                                      # dL/d pre
                if need_e:
                    torch.mm(g, weight, out=grad_e[k, start:stop])
                if need_w:
                    grad_w.addmm_(g.t(), edge_feat[k, start:stop])
                if need_b:
                    grad_b += g.sum(dim=0)
        return grad_x, grad_e, grad_w, grad_b, grad_env, None, None


class Interaction(nn.Module):
    """FAENet "updownscale" interaction with residual update."""

    def __init__(self, hidden: int, filters: int):
        super().__init__()
        self.down = nn.Linear(hidden, filters)
        self.edge = nn.Linear(filters, filters)
        self.up = nn.Linear(filters, hidden)

    def messages(self, x, edge_feat, envelope, src, dst):
        """Sum over edges of ``x[:, src] * SiLU(W_e edge_feat) * envelope`` at ``dst``: (K, N, filters)."""
        if not self.training and x.shape[1] and src.numel():
            return _FilteredMessages.apply(x, edge_feat, self.edge.weight, self.edge.bias, envelope, src, dst)
        filt = torch.nn.functional.silu(self.edge(edge_feat)) * envelope[None, :, None]
        return torch.zeros_like(x).index_add(1, dst, x.index_select(1, src) * filt)

    def forward(self, h, edge_feat, envelope, src, dst, inv_avg_neighbors):
        """h (K, N, F); edge_feat (K, E, filters); envelope (E,) smooth cutoff weight of each edge."""
        x = torch.nn.functional.silu(self.down(h))
        m = self.messages(x, edge_feat, envelope, src, dst) * inv_avg_neighbors
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
        self.rbf, self.envelope = GaussianBasis(cutoff, num_gaussians), PolynomialEnvelope(cutoff, 5)
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

    def radial_edge_term(self, distance):
        """Frame-independent part of the edge MLP's pre-activation: (E,) Å -> (E, filters).

        The edge MLP acts on ``SiLU([W_r r | W_d RBF(d)])``; its linear layer splits into a direction term that
        changes with the frame and this distance term (plus bias) that does not, so it is computed once for all
        frames.
        """
        radial = torch.nn.functional.silu(self.edge_rbf(self.rbf(distance)))
        half = self.edge_vec.out_features
        return torch.nn.functional.linear(radial, self.edge_mlp.weight[:, half:], self.edge_mlp.bias)

    def embed_edges(self, local_vec, radial_term):
        """local_vec (K, E, 3) in frame coordinates; radial_term (E, filters) from :meth:`radial_edge_term`."""
        direction = torch.nn.functional.silu(self.edge_vec(local_vec))
        half = self.edge_vec.out_features
        pre = torch.matmul(direction, self.edge_mlp.weight[:, :half].t()) + radial_term
        return torch.nn.functional.silu(pre)

    def edge_invariants(self, edge_vec):
        """Frame-independent edge quantities, computed once per call: (radial term (E, filters), envelope (E,))."""
        distance = edge_vec.norm(dim=-1) if edge_vec.shape[0] else edge_vec.new_zeros(0)
        return self.radial_edge_term(distance), self.envelope(distance)

    def node_features(self, graph, species, edge_vec, frames, invariants=None):
        """Per-frame, per-layer node features: list of (K, N, hidden)."""
        batch = graph_batch_vector(graph)
        src, dst = graph.edge_index[0], graph.edge_index[1]
        if frames.rotations.shape[1] == 1:  # one structure: one (3, 3) matrix per frame
            local = torch.matmul(edge_vec, frames.rotations[:, 0])
        else:
            rot = frames.rotations[:, batch[dst]] if src.numel() else frames.rotations[:, :0]  # (K, E, 3, 3)
            local = torch.einsum("ei,keij->kej", edge_vec, rot)
        radial, envelope = invariants if invariants is not None else self.edge_invariants(edge_vec)
        edge_feat = self.embed_edges(local, radial)
        h = self.embed_nodes(species).expand(frames.num_frames, -1, -1)
        layers = []
        for interaction in self.interactions:
            h = interaction(h, edge_feat, envelope, src, dst, self.inv_avg_neighbors)
            layers.append(h)
        return layers

    def raw_atomic_energies(self, graph, species, edge_vec):
        frames = self.frames(graph, edge_vec)
        invariants = self.edge_invariants(edge_vec)
        total = 0.0
        # frames are evaluated in chunks: smaller (chunk, E, F) tensors stay in cache and in the malloc heap
        for start in range(0, frames.num_frames, self.frame_chunk):
            chunk = FrameSet(frames.rotations[start:start + self.frame_chunk], frames.degenerate)
            layers = self.node_features(graph, species, edge_vec, chunk, invariants)
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
