"""Edge frames and Wigner-D matrices for e3nn real spherical harmonics (polar axis = +y).

e3nn's real spherical harmonics use **y as the polar axis**: the harmonics of the direction +y are non-zero
only for m = 0. eSCN rotates every edge onto +y so that the SO(3) convolution with the edge's harmonics becomes
an SO(2) convolution (see :mod:`matkit.nn.so2`).

Two pieces, both differentiable everywhere (forces and stress go through them):

* :func:`edge_frame_rotation` ``(E, 3) -> (E, 3, 3)``: a rotation ``R`` with ``R @ u = +y`` for each unit edge
  direction ``u``. It is the *minimal* rotation (Rodrigues, axis ``u x y``), smooth for every direction except
  ``u = -y``, where the roll about the edge is undefined. Exactly at ``u = -y`` the flipped frame
  ``R = Rod(F u) F`` (``F`` = rotation by pi about x) is used, which is smooth there, so gradients are finite and
  correct. Whatever the roll of the frame about the edge, a layer that commutes with rotations about +y gives the
  same result, so no random roll is needed (unlike the reference eSCN) and the model is deterministic.
* :class:`WignerD` ``(E, 3, 3) -> (E, K, K)``, ``K = (L+1)^2``: block-diagonal Wigner matrices with
  ``Y(R x) = D(R) Y(x)`` (e3nn's convention, equal to ``Irreps.D_from_matrix``). They are computed without Euler
  angles, as polynomials in the entries of ``R`` (no atan2 / acos), exact to rounding for any rotation: degrees 1
  and 2 in closed form (linear and quadratic in ``R``), higher degrees from fixed points ``P`` (n, 3):
  ``Y_l(P R^T) = Y_l(P) D_l(R)^T``, so ``D_l^T = pinv(Y_l(P)) Y_l(P R^T)``.
"""
from __future__ import annotations

import numpy as np
import torch
from e3nn import o3
from torch import nn

__all__ = ["edge_frame_rotation", "WignerD"]


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(E, 3) -> (E, 3, 3) cross-product matrices ``[v]_x`` with ``[v]_x w = v x w``."""
    zero = torch.zeros_like(v[:, 0])
    x, y, z = v.unbind(-1)
    return torch.stack([torch.stack([zero, -z, y], -1),
                        torch.stack([z, zero, -x], -1),
                        torch.stack([-y, x, zero], -1)], -2)


def _rotation_onto_y(u: torch.Tensor, exclude_south_pole: torch.Tensor) -> torch.Tensor:
    """Minimal rotation taking unit vectors ``u`` (E, 3) onto +y: ``I + [v]x + [v]x^2 / (1 + c)``.

    ``v = u x y = (-u_z, 0, u_x)``, ``c = u_y``. ``1 + c`` is evaluated as ``rho^2 / (1 - c)`` for ``c < 0``
    (``rho^2 = u_x^2 + u_z^2``) to keep full precision near -y. Rows flagged in ``exclude_south_pole`` (exactly
    u = -y) get a dummy finite value so that no NaN enters the backward pass; the caller replaces them.
    """
    ux, uy, uz = u.unbind(-1)
    v = torch.stack([-uz, torch.zeros_like(uy), ux], -1)
    rho2 = ux * ux + uz * uz
    north = uy >= 0
    one_minus_c = torch.where(north, torch.ones_like(uy), 1.0 - uy)  # never 0 where it is used (no NaN grads)
    one_plus_c = torch.where(north, 1.0 + uy, rho2 / one_minus_c)
    one_plus_c = torch.where(exclude_south_pole, torch.ones_like(one_plus_c), one_plus_c)
    k = _skew(v)
    eye = torch.eye(3, dtype=u.dtype, device=u.device).expand_as(k)
    return eye + k + (k @ k) / one_plus_c.view(-1, 1, 1)


def edge_frame_rotation(edge_vec: torch.Tensor) -> torch.Tensor:
    """Rotations (E, 3, 3) mapping each edge direction onto +y (``R @ u = e_y``); ``edge_vec`` (E, 3), any length > 0.

    Differentiable with finite gradients for every direction, including exactly +y and exactly -y.
    """
    u = edge_vec / edge_vec.norm(dim=-1, keepdim=True)
    south = (u[:, 0] == 0) & (u[:, 2] == 0) & (u[:, 1] < 0)
    rot = _rotation_onto_y(u, south)
    if bool(south.any()):
        flip = torch.tensor([1.0, -1.0, -1.0], dtype=u.dtype, device=u.device)  # rotation by pi about x
        flipped = _rotation_onto_y(u * flip, ~south) * flip.view(1, 1, 3)  # Rod(F u) @ F
        rot = torch.where(south.view(-1, 1, 1), flipped, rot)
    return rot


def _degree_one_and_two_maps():
    """Closed forms of the degree-1 and degree-2 Wigner matrices as linear maps of ``R`` and of ``R (x) R``.

    On the unit sphere the e3nn harmonics are ``Y_1(x) = A x`` and ``Y_2(x)_m = x^T Q_m x`` (``Q_m`` symmetric and
    traceless). Both are read off e3nn's harmonics at the unit vectors ``e_i`` and ``(e_i + e_j) / sqrt 2``
    (no solver, so the maps are the same bits on every call). Then ``D_1 = A R A^-1`` and, since
    ``R^T Q_m R = sum_n D_2[m, n] Q_n``, ``D_2[m, n] = <R^T Q_m R, Q*_n>`` with ``Q*`` the dual basis of the ``Q_n``
    under the Frobenius product. Returns ``M1`` (9, 9) and ``M2`` (81, 25), float64:
    ``D_1.flatten() = R.flatten() @ M1`` and ``D_2.flatten() = (R (x) R).flatten() @ M2``."""
    eye = torch.eye(3, dtype=torch.float64)
    pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
    points = torch.cat([eye, torch.stack([(eye[i] + eye[j]) / np.sqrt(2) for i, j in pairs])])
    sh = o3.spherical_harmonics([1, 2], points, normalize=True, normalization="component")
    a = sh[:3, :3].T                                                          # A[:, i] = Y_1(e_i)
    q = torch.diag_embed(sh[:3, 3:].T)                                        # Q_ii = Y_2(e_i)
    for k, (i, j) in enumerate(pairs):                                        # Y_2 at (e_i + e_j) / sqrt 2
        q[:, i, j] = q[:, j, i] = sh[3 + k, 3:] - (q[:, i, i] + q[:, j, j]) / 2
    check = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    check /= check.norm(dim=1, keepdim=True)
    ref = o3.spherical_harmonics([1, 2], check, normalize=True, normalization="component")
    fit = torch.cat([check @ a.T, torch.einsum("pi,mij,pj->pm", check, q, check)], 1)
    if (fit - ref).abs().max() > 1e-12:
        raise RuntimeError("the e3nn harmonics of degree 1 or 2 are not the expected polynomials")
    dual = torch.einsum("nk,kij->nij", torch.linalg.inv(torch.einsum("mij,nij->mn", q, q)), q)
    m1 = torch.einsum("ai,jb->ijab", a, torch.linalg.inv(a)).reshape(9, 9)
    m2 = torch.einsum("mjk,nil->jiklmn", q, dual).reshape(81, 25)
    return m1, m2


class WignerD(nn.Module):
    """Block-diagonal Wigner-D matrices (E, K, K) of rotation matrices (E, 3, 3) for degrees 0..lmax.

    Real e3nn basis, coefficients l-major (index ``l^2 + l + m``); ``Y(R x) = D(R) Y(x)`` for the e3nn
    spherical harmonics (any per-degree normalisation). Degrees 1 and 2 are closed forms, linear and quadratic in
    the entries of ``R`` (:func:`_degree_one_and_two_maps`); higher degrees are fitted as described in the module
    docstring. ``forward(rot, rows)`` returns only the given rows, assembled in one gather.
    """

    def __init__(self, lmax: int, num_points: int | None = None, seed: int = 12345):
        super().__init__()
        if lmax < 0:
            raise ValueError(f"lmax must be >= 0, got {lmax}")
        self.lmax = int(lmax)
        n = num_points or 2 * (2 * self.lmax + 1) + 2
        if n < 2 * self.lmax + 1:
            raise ValueError(f"need at least 2*lmax+1 = {2 * self.lmax + 1} fitting points, got {n}")
        rng = np.random.default_rng(seed)
        points = rng.normal(size=(n, 3))
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        points_t = torch.tensor(points, dtype=torch.float64)
        sh = o3.spherical_harmonics(list(range(self.lmax + 1)), points_t, normalize=True, normalization="component")
        m1, m2 = _degree_one_and_two_maps()
        pinvs = []
        for l in range(3, self.lmax + 1):
            block = sh[:, l * l:(l + 1) ** 2]
            cond = torch.linalg.cond(block).item()
            if cond > 1e4:
                raise RuntimeError(f"ill-conditioned Wigner fitting points for l={l} (cond {cond:.1e})")
            pinvs.append(torch.linalg.pinv(block))
        self.register_buffer("map1", m1, persistent=False)
        self.register_buffer("map2", m2, persistent=False)
        self.register_buffer("points", points_t, persistent=False)
        # (K - 9, n) stacked pseudo-inverses of the fitted degrees l >= 3; block l occupies rows l^2 - 9..
        self.register_buffer("pinv", torch.cat(pinvs, 0) if pinvs else points_t.new_zeros(0, n), persistent=False)
        # position of every entry of the (K, K) block-diagonal matrix in [0, flattened blocks]: 0 = a zero entry
        index, offset = torch.zeros(self.dim, self.dim, dtype=torch.long), 1
        for l in range(self.lmax + 1):
            d = 2 * l + 1
            index[l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] = torch.arange(offset, offset + d * d).view(d, d)
            offset += d * d
        self.register_buffer("index", index, persistent=False)

    @property
    def dim(self) -> int:
        return (self.lmax + 1) ** 2

    def blocks(self, rot: torch.Tensor) -> list:
        """Per-degree Wigner matrices: list of (E, 2l+1, 2l+1) for l = 0..lmax."""
        e, dtype = rot.shape[0], rot.dtype
        flat = rot.reshape(e, 9)
        out = [rot.new_ones(e, 1, 1)]
        if self.lmax >= 1:
            out.append((flat @ self.map1.to(dtype)).view(e, 3, 3))
        if self.lmax >= 2:
            out.append(((flat[:, :, None] * flat[:, None, :]).view(e, 81) @ self.map2.to(dtype)).view(e, 5, 5))
        if self.lmax >= 3:
            rotated = torch.einsum("pj,eij->epi", self.points.to(dtype), rot)  # rows: R p
            sh = o3.spherical_harmonics(list(range(self.lmax + 1)), rotated, normalize=False,
                                        normalization="component")  # (E, n, K); R p is already unit
            pinv = self.pinv.to(dtype)
            for l in range(3, self.lmax + 1):
                s = slice(l * l, (l + 1) ** 2)
                d_transposed = torch.einsum("kp,epq->ekq", pinv[l * l - 9:(l + 1) ** 2 - 9], sh[:, :, s])
                out.append(d_transposed.transpose(1, 2))
        return out

    def forward(self, rot: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(E, 3, 3) -> (E, K, K), or (E, len(rows), K) with only the given rows (l-major indices)."""
        e = rot.shape[0]
        flat = torch.cat([rot.new_zeros(e, 1)] + [b.reshape(e, -1) for b in self.blocks(rot)], 1)
        index = self.index if rows is None else self.index[rows]
        return flat[:, index.flatten()].view(e, *index.shape)
