"""Frame averaging (Duval et al., ICML 2023): exact E(3) invariance for any non-equivariant model.

A frame is an orthogonal matrix ``U`` (3, 3) built from the structure that rotates with it: if the structure is
rotated by ``R`` (row vectors ``x -> x R^T``), the frames become ``R U``, so coordinates expressed in the frame,
``x U``, do not change. Averaging a model over all frames of the set gives an exactly invariant energy.

Frames come from the eigenvectors of a covariance matrix ``C``, sorted by decreasing eigenvalue, with every sign
choice (eigenvectors are defined up to sign):

* molecules (no periodicity): ``C = sum_i (x_i - mean x)(x_i - mean x)^T`` (PCA of the centred positions, as the
  paper);
* periodic structures: ``C = sum_edges w(|r_ij|) r_ij r_ij^T`` over all edges ``r_ij`` within the cutoff, with a
  smooth weight ``w`` that vanishes at the cutoff. Edge vectors do not depend on how atoms are wrapped into the
  cell, on the cell origin or on the supercell, so neither do the frames (PCA of wrapped positions would), and the
  frame changes smoothly when an atom crosses the cutoff. Being extensive, it also makes supercells exact.
* ``mode="2D"`` (slabs, z is the surface normal): PCA of the (x, y) components only; z is kept.

Frame sets: ``"all"`` (8 sign choices in 3D, 4 in 2D), ``"se3"`` (only det = +1: 4 in 3D, 2 in 2D), and
``stochastic=True``: one random frame of the set per structure (training; invariant only in expectation).

Degeneracy. When two eigenvalues are (nearly) equal the eigenvectors are not defined and the frame would jump
with infinitesimal changes. A relative eigen-gap ``(l_k - l_k+1) / l_1`` below ``degeneracy_tol`` is detected
per structure and reported (``FrameSet.degenerate``, a warning once per process); for such structures the frame
is held fixed in the gradient (``eigh``'s derivative diverges there), so forces stay finite but invariance is only
approximate. Structures with no edges (isolated atoms) do not depend on the frame and use the identity.
Cubic crystals are exactly this degenerate case; see the FAENet model card for measured invariance errors.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch

__all__ = ["FrameSet", "compute_frames", "sign_patterns", "frame_average"]

_warned = False


def sign_patterns(dim: int, proper_only: bool) -> torch.Tensor:
    """All (2^dim, dim) sign vectors; with ``proper_only`` those whose product is +1 (det = +1 given det U = +1)."""
    signs = torch.tensor(list(itertools.product([1.0, -1.0], repeat=dim)))
    if proper_only:
        signs = signs[signs.prod(dim=1) > 0]
    return signs


@dataclass
class FrameSet:
    """Frames for a batch of structures.

    rotations : (K, B, 3, 3) frame matrices ``U_k`` per structure (columns are the frame axes);
        coordinates in frame k are ``x @ U_k``.
    degenerate : (B,) bool, structures whose covariance had (nearly) equal eigenvalues.
    """

    rotations: torch.Tensor
    degenerate: torch.Tensor

    @property
    def num_frames(self) -> int:
        return self.rotations.shape[0]


def _smooth_weight(distance: torch.Tensor, cutoff: float) -> torch.Tensor:
    x = (distance / cutoff).clamp(max=1.0)
    return (1.0 - x * x) ** 3  # C^2 at the cutoff, 1 at zero distance


def covariance(pos, edge_vec, edge_index, batch, num_graphs, periodic, cutoff):
    """(B, 3, 3) covariance per structure: edge-weighted for periodic structures, positional otherwise."""
    dtype, device = pos.dtype, pos.device
    cov = torch.zeros(num_graphs, 3, 3, dtype=dtype, device=device)
    if edge_vec.shape[0]:
        w = _smooth_weight(edge_vec.norm(dim=-1), cutoff)
        outer = w[:, None, None] * edge_vec[:, :, None] * edge_vec[:, None, :]
        edge_cov = torch.zeros_like(cov).index_add_(0, batch[edge_index[1]], outer)
        cov = torch.where(periodic[:, None, None], edge_cov, cov)
    counts = torch.zeros(num_graphs, dtype=dtype, device=device).index_add_(0, batch, torch.ones_like(pos[:, 0]))
    mean = (torch.zeros(num_graphs, 3, dtype=dtype, device=device).index_add_(0, batch, pos)
            / counts.clamp(min=1)[:, None])
    centred = pos - mean[batch]
    pos_cov = torch.zeros_like(cov).index_add_(0, batch, centred[:, :, None] * centred[:, None, :])
    return torch.where(periodic[:, None, None], cov, pos_cov)


def compute_frames(pos, edge_vec, edge_index, batch, num_graphs, pbc, cutoff, mode: str = "3D",
                   proper_only: bool = False, stochastic: bool = False, degeneracy_tol: float = 1e-4,
                   generator: torch.Generator | None = None) -> FrameSet:
    """Frames of every structure in a batch (see module docstring). ``pbc`` (B, 3) bool."""
    global _warned
    periodic = pbc.any(dim=1)
    cov = covariance(pos, edge_vec, edge_index, batch, num_graphs, periodic, cutoff)
    dim = 3 if mode == "3D" else 2
    if mode not in ("3D", "2D"):
        raise ValueError(f"frame mode must be '3D' or '2D', got {mode!r}")
    sub = cov[:, :dim, :dim]
    evals, evecs = torch.linalg.eigh(sub.detach())
    scale = evals.abs().max(dim=1).values
    gaps = (evals[:, 1:] - evals[:, :-1]) / scale.clamp(min=torch.finfo(cov.dtype).tiny)[:, None]
    empty = scale <= 0
    degenerate = (gaps < degeneracy_tol).any(dim=1) & ~empty
    if degenerate.any() and not _warned:
        _warned = True
        warnings.warn("frame averaging: (nearly) degenerate covariance eigenvalues for some structures; their "
                      "frames are not unique, so their invariance is approximate (see matkit.nn.frame_averaging)",
                      stacklevel=2)
    if sub.requires_grad and not degenerate.all():
        # differentiable eigenvectors where they are well defined (forces/stress include dU/dx)
        safe = torch.where((degenerate | empty)[:, None, None], torch.eye(dim, dtype=cov.dtype, device=cov.device)
                           * torch.arange(1, dim + 1, dtype=cov.dtype, device=cov.device), sub)
        _, diff_vecs = torch.linalg.eigh(safe)
        evecs = torch.where((degenerate | empty)[:, None, None], evecs, diff_vecs)
    evecs = torch.flip(evecs, dims=[2])  # descending eigenvalues
    evecs = torch.where(empty[:, None, None], torch.eye(dim, dtype=cov.dtype, device=cov.device), evecs)
    # make det(U) = +1 so that "proper" sign patterns are exactly the rotations
    det = torch.linalg.det(evecs.detach())
    evecs = torch.cat([evecs[:, :, :-1], evecs[:, :, -1:] * torch.sign(det)[:, None, None]], dim=2)
    if dim == 2:
        top = torch.cat([evecs, torch.zeros(num_graphs, 2, 1, dtype=cov.dtype, device=cov.device)], dim=2)
        bottom = torch.tensor([0.0, 0.0, 1.0], dtype=cov.dtype, device=cov.device).expand(num_graphs, 1, 3)
        evecs = torch.cat([top, bottom], dim=1)
    signs = sign_patterns(dim, proper_only).to(dtype=cov.dtype, device=cov.device)
    if dim == 2:
        signs = torch.cat([signs, torch.ones(len(signs), 1, dtype=signs.dtype, device=signs.device)], dim=1)
    rotations = evecs.unsqueeze(0) * signs[:, None, None, :]  # (K, B, 3, 3): column k scaled by s_k
    if stochastic:
        pick = torch.randint(len(signs), (num_graphs,), generator=generator, device="cpu").to(cov.device)
        rotations = rotations[pick, torch.arange(num_graphs, device=cov.device)].unsqueeze(0)
    return FrameSet(rotations=rotations, degenerate=degenerate)


def frame_average(fn, edge_vec: torch.Tensor, edge_graph: torch.Tensor, frames: FrameSet) -> torch.Tensor:
    """Average ``fn(edge_vec_in_frame) -> (N,)`` over frames, for any non-equivariant per-atom model.

    edge_vec : (E, 3) world-frame edge vectors; edge_graph : (E,) structure index of each edge.
    """
    total = None
    for k in range(frames.num_frames):
        local = torch.einsum("ei,eij->ej", edge_vec, frames.rotations[k][edge_graph])
        out = fn(local)
        total = out if total is None else total + out
    return total / frames.num_frames
