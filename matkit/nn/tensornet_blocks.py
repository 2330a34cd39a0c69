"""Cartesian rank-2 tensor algebra for TensorNet, in a compact component-first layout.

A per-channel 3x3 matrix ``X = I * Id + A + S`` (isotropic, skew, symmetric-traceless parts, i.e. the irreps
0 + 1 + 2) is stored as 9 components, component axis first, channel axis last::

    X[0]      = I                          (trace / 3)
    X[1:4]    = a = (a_x, a_y, a_z)        A = [[0, -a_z, a_y], [a_z, 0, -a_x], [-a_y, a_x, 0]]
    X[4:9]    = s = (s_xx, s_yy, s_xy, s_xz, s_yz)   S symmetric, s_zz = -(s_xx + s_yy)

so a node tensor has shape (9, N, F). The layout makes the three parts contiguous blocks: channel mixing is one
matmul per part, message passing gathers / scatters along dim 1, and per-part scalar factors broadcast without
copies. Full matrices (needed only for the per-channel matrix products) are (3, 3, N, F), row-major.
"""
from __future__ import annotations

import torch

__all__ = ["I_PART", "A_PART", "S_PART", "compose_matrix", "decompose_matrix", "squared_norms",
           "total_squared_norm", "matmul_per_channel", "traceless_outer_components", "mix_parts",
           "reverse_pair_groups"]

I_PART, A_PART, S_PART = slice(0, 1), slice(1, 4), slice(4, 9)


def compose_matrix(X: torch.Tensor) -> torch.Tensor:
    """Compact (9, ...) -> full matrices (3, 3, ...)."""
    i, ax, ay, az, sxx, syy, sxy, sxz, syz = X.unbind(0)
    szz = -(sxx + syy)
    rows = (i + sxx, sxy - az, sxz + ay,
            sxy + az, i + syy, syz - ax,
            sxz - ay, syz + ax, i + szz)
    return torch.stack(rows, 0).view(3, 3, *X.shape[1:])


def decompose_matrix(M: torch.Tensor) -> torch.Tensor:
    """Full matrices (3, 3, ...) -> compact (9, ...) [I, a, s] (exact irreducible decomposition)."""
    m = M.reshape(9, *M.shape[2:])
    i = (m[0] + m[4] + m[8]) / 3.0
    comps = (i,
             0.5 * (m[7] - m[5]), 0.5 * (m[2] - m[6]), 0.5 * (m[3] - m[1]),
             m[0] - i, m[4] - i,
             0.5 * (m[1] + m[3]), 0.5 * (m[2] + m[6]), 0.5 * (m[5] + m[7]))
    return torch.stack(comps, 0)


def squared_norms(X: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norms of the I*Id, A and S parts: (9, N, F) -> (3, N, F) = [3 I^2, |A|^2, |S|^2]."""
    i = X[0]
    a = X[A_PART]
    sxx, syy, sxy, sxz, syz = X[S_PART].unbind(0)
    norm_i = 3.0 * i * i
    norm_a = 2.0 * (a * a).sum(0)
    norm_s = sxx * sxx + syy * syy + (sxx + syy) ** 2 + 2.0 * (sxy * sxy + sxz * sxz + syz * syz)
    return torch.stack((norm_i, norm_a, norm_s), 0)


def total_squared_norm(X: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of the full matrix per node and channel: (9, N, F) -> (N, F)."""
    return squared_norms(X).sum(0)


def matmul_per_channel(Y: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Per-channel matrix product of full matrices (3, 3, N, F) x (3, 3, N, F) -> (3, 3, N, F)."""
    return Y[:, 0, None] * M[None, 0] + Y[:, 1, None] * M[None, 1] + Y[:, 2, None] * M[None, 2]


def traceless_outer_components(unit: torch.Tensor) -> torch.Tensor:
    """Compact S components of ``u u^T - |u|^2 Id / 3`` for vectors ``unit`` (E, 3) -> (5, E)."""
    x, y, z = unit.unbind(-1)
    third = (x * x + y * y + z * z) / 3.0
    return torch.stack((x * x - third, y * y - third, x * y, x * z, y * z), 0)


def mix_parts(X: torch.Tensor, w_i: torch.Tensor, w_a: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """Bias-free channel mixing of each part: (9, N, F) with weights (F_out, F) -> (9, N, F_out).

    The same matrix acts on all components of a part, so the result stays equivariant.
    """
    return torch.cat((X[I_PART] @ w_i.t(), X[A_PART] @ w_a.t(), X[S_PART] @ w_s.t()), 0)


def reverse_pair_groups(edge_index: torch.Tensor, shifts: torch.Tensor, num_nodes: int):
    """Group each directed edge with its reverse, so distance-only features are computed once per pair.

    Edge ``(j -> i, S)`` and ``(i -> j, -S)`` have the same length. Returns ``(representative, group)``:
    ``representative`` (G,) one edge index per group and ``group`` (E,) the group of every edge, so that
    ``f(d[representative])[group] == f(d)`` for any function of the distance. Works for any edge list (a missing
    reverse edge just makes a group of one).
    """
    num_edges = edge_index.shape[1]
    device = edge_index.device
    if num_edges == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    src, dst = edge_index[0], edge_index[1]
    s = torch.round(shifts).long()
    swap = src > dst
    lo, hi = torch.where(swap, dst, src), torch.where(swap, src, dst)
    s = torch.where(swap[:, None], -s, s)
    # an atom bonded to its own periodic image: orient the shift so its first nonzero component is positive
    sign = torch.sign(s[:, 0])
    sign = torch.where(sign == 0, torch.sign(s[:, 1]), sign)
    sign = torch.where(sign == 0, torch.sign(s[:, 2]), sign)
    s = torch.where(((src == dst) & (sign < 0))[:, None], -s, s)
    m = int(s.abs().max()) + 1
    base = 2 * m + 1
    if float(num_nodes) ** 2 * base ** 3 > 2.0 ** 62:  # key would overflow int64: no grouping
        identity = torch.arange(num_edges, device=device)
        return identity, identity
    s = s + m
    key = (((lo * num_nodes + hi) * base + s[:, 0]) * base + s[:, 1]) * base + s[:, 2]
    unique, group = torch.unique(key, return_inverse=True)
    representative = torch.empty(unique.shape[0], dtype=torch.long, device=device)
    representative.scatter_(0, group, torch.arange(num_edges, device=device))
    return representative, group
