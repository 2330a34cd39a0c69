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
           "reverse_pair_groups", "neighbour_messages", "geometric_messages"]

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


# ---- fused, edge-chunked message passing (inference) ----------------------------------------------------------
#
# Messages are memory bound: the (9, E, F) per-edge tensors are ~9x larger than the node tensors. The two
# autograd functions below never keep them: forward and backward run over chunks of edges small enough to stay
# in cache and save only node-sized inputs and (E, 3, F) factors. Their backward is not differentiable again,
# so models use them only outside training (force-loss training needs double backward).

PART_INDEX = (0, 1, 1, 1, 2, 2, 2, 2, 2)  # part of each of the 9 compact components


def _edge_chunk(num_channels: int) -> int:
    return max(64, (1 << 18) // (9 * max(num_channels, 1)))


def _scale_parts_(values: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """In place: values (9, C, F) *= factors (C, 3, F) per part."""
    values[I_PART] *= factors[:, 0]
    values[A_PART] *= factors[:, 1]
    values[S_PART] *= factors[:, 2]
    return values


def _sum_parts(values: torch.Tensor) -> torch.Tensor:
    """(9, C, ...) -> (C, 3, ...) sums over the components of each part."""
    return torch.stack((values[0], values[A_PART].sum(0), values[S_PART].sum(0)), 1)


class _NeighbourMessages(torch.autograd.Function):
    """``out[:, i] = sum_{e: dst_e = i} factors[e, part] * Y[:, src_e]`` for compact Y (9, N, F)."""

    @staticmethod
    def forward(ctx, Y, factors, src, dst, num_nodes):
        out = Y.new_zeros(9, num_nodes, Y.shape[2])
        step = _edge_chunk(Y.shape[2])
        for start in range(0, src.shape[0], step):
            s, d = src[start:start + step], dst[start:start + step]
            out.index_add_(1, d, _scale_parts_(Y.index_select(1, s), factors[start:start + step]))
        ctx.save_for_backward(Y, factors, src, dst)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        Y, factors, src, dst = ctx.saved_tensors
        need_y, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_y = torch.zeros_like(Y) if need_y else None
        grad_f = torch.empty_like(factors) if need_f else None
        step = _edge_chunk(Y.shape[2])
        grad_out = grad_out.contiguous()
        for start in range(0, src.shape[0], step):
            stop = start + step
            s, d = src[start:stop], dst[start:stop]
            g = grad_out.index_select(1, d)
            if need_f:
                grad_f[start:stop] = _sum_parts(g * Y.index_select(1, s))
            if need_y:
                grad_y.index_add_(1, s, _scale_parts_(g, factors[start:stop]))
        return grad_y, grad_f, None, None, None


class _GeometricMessages(torch.autograd.Function):
    """``out[c, i] = sum_{e: dst_e = i} geometry[c, e] * factors[e, part(c)]``: geometry (9, E), factors (E, 3, F)."""

    @staticmethod
    def forward(ctx, geometry, factors, dst, num_nodes):
        out = factors.new_zeros(9, num_nodes, factors.shape[2])
        index = torch.tensor(PART_INDEX, device=factors.device)
        step = _edge_chunk(factors.shape[2])
        for start in range(0, dst.shape[0], step):
            stop = start + step
            values = factors[start:stop].index_select(1, index).transpose(0, 1) * geometry[:, start:stop, None]
            out.index_add_(1, dst[start:stop], values)
        ctx.save_for_backward(geometry, factors, dst)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        geometry, factors, dst = ctx.saved_tensors
        need_g, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_g = torch.empty_like(geometry) if need_g else None
        grad_f = torch.empty_like(factors) if need_f else None
        index = torch.tensor(PART_INDEX, device=factors.device)
        step = _edge_chunk(factors.shape[2])
        grad_out = grad_out.contiguous()
        for start in range(0, dst.shape[0], step):
            stop = start + step
            g = grad_out.index_select(1, dst[start:stop])                      # (9, C, F)
            if need_g:
                f = factors[start:stop].index_select(1, index).transpose(0, 1)  # (9, C, F)
                grad_g[:, start:stop] = (g * f).sum(-1)
            if need_f:
                grad_f[start:stop] = _sum_parts(g * geometry[:, start:stop, None])
        return grad_g, grad_f, None, None


def neighbour_messages(Y: torch.Tensor, factors: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                       num_nodes: int, fused: bool = True) -> torch.Tensor:
    """Sum over edges of per-part factors times the neighbour's compact tensor, at the centre.

    Y (9, N, F) compact node tensors; factors (E, 3, F); src / dst (E,) neighbour / centre -> (9, N, F).
    ``fused=True``: chunked, memory-lean, first-order differentiable only; ``False``: plain autograd ops.
    """
    if fused:
        return _NeighbourMessages.apply(Y, factors, src, dst, num_nodes)
    out = []
    for part, values in zip(factors.unbind(1), Y.split([1, 3, 5], 0)):
        values = values.index_select(1, src) * part
        out.append(values.new_zeros(values.shape[0], num_nodes, values.shape[2]).index_add_(1, dst, values))
    return torch.cat(out, 0)


def geometric_messages(geometry: torch.Tensor, factors: torch.Tensor, dst: torch.Tensor, num_nodes: int,
                       fused: bool = True) -> torch.Tensor:
    """Sum over edges of per-edge geometric components times per-part factors, at the centre.

    geometry (9, E) compact components of each edge's tensor; factors (E, 3, F) -> (9, N, F).
    """
    if fused:
        return _GeometricMessages.apply(geometry, factors, dst, num_nodes)
    out = []
    for part, values in zip(factors.unbind(1), geometry.split([1, 3, 5], 0)):
        values = values[:, :, None] * part
        out.append(values.new_zeros(values.shape[0], num_nodes, values.shape[2]).index_add_(1, dst, values))
    return torch.cat(out, 0)
