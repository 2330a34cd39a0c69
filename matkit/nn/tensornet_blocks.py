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

from typing import Optional

import torch

from . import tensornet_kernels as kernels

__all__ = ["I_PART", "A_PART", "S_PART", "compose_matrix", "decompose_matrix", "squared_norms",
           "total_squared_norm", "matmul_per_channel", "traceless_outer_components", "mix_parts",
           "reverse_pair_groups", "neighbour_messages", "geometric_messages"]

I_PART, A_PART, S_PART = slice(0, 1), slice(1, 4), slice(4, 9)


def _compose_components(X: torch.Tensor) -> torch.Tensor:
    """Compact (9, ...) -> full (3, 3, ...), written out component by component (defines the layout)."""
    i, ax, ay, az, sxx, syy, sxy, sxz, syz = X.unbind(0)
    szz = -(sxx + syy)
    rows = (i + sxx, sxy - az, sxz + ay,
            sxy + az, i + syy, syz - ax,
            sxz - ay, syz + ax, i + szz)
    return torch.stack(rows, 0).view(3, 3, *X.shape[1:])


def _decompose_components(M: torch.Tensor) -> torch.Tensor:
    """Full (3, 3, ...) -> compact (9, ...): trace / 3, skew and symmetric-traceless parts, component by component."""
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = M.reshape(9, *M.shape[2:]).unbind(0)
    i = (m00 + m11 + m22) / 3.0
    comps = (i,
             0.5 * (m21 - m12), 0.5 * (m02 - m20), 0.5 * (m10 - m01),
             m00 - i, m11 - i,
             0.5 * (m01 + m10), 0.5 * (m02 + m20), 0.5 * (m12 + m21))
    return torch.stack(comps, 0)


def _layout_matrices():
    """The layout as linear maps (float64): compose C (9 matrix entries x 9 components), decompose D (9 x 9),
    Frobenius Gram matrix Q = C^T C (|M|^2 = x^T Q x) and the part indicator R (3 x 9)."""
    eye = torch.eye(9, dtype=torch.float64)
    compose = _compose_components(eye).reshape(9, 9)
    decompose = _decompose_components(eye.view(3, 3, 9))
    part = torch.zeros(3, 9, dtype=torch.float64)
    part[0, I_PART], part[1, A_PART], part[2, S_PART] = 1.0, 1.0, 1.0
    return {"compose": compose, "decompose": decompose, "gram": compose.t() @ compose, "parts": part}


_LAYOUT = _layout_matrices()
_LAYOUT_CACHE = {}


def _layout(name: str, like: torch.Tensor) -> torch.Tensor:
    """Constant layout matrix ``name`` in the dtype and on the device of ``like`` (cached)."""
    key = (name, like.dtype, like.device)
    value = _LAYOUT_CACHE.get(key)
    if value is None:
        value = _LAYOUT_CACHE[key] = _LAYOUT[name].to(dtype=like.dtype, device=like.device)
    return value


# The maps below are small constant matrix products over the component axis: one kernel each instead of a dozen
# elementwise ops on (N, F) slices, which at MD sizes (tens of atoms) cost more in dispatch than in arithmetic.

def compose_matrix(X: torch.Tensor) -> torch.Tensor:
    """Compact (9, ...) -> full matrices (3, 3, ...)."""
    return (_layout("compose", X) @ X.reshape(9, -1)).view(3, 3, *X.shape[1:])


def decompose_matrix(M: torch.Tensor) -> torch.Tensor:
    """Full matrices (3, 3, ...) -> compact (9, ...) [I, a, s] (exact irreducible decomposition)."""
    return (_layout("decompose", M) @ M.reshape(9, -1)).view(9, *M.shape[2:])


def _norm_terms(X: torch.Tensor) -> torch.Tensor:
    """(9, K) per-component terms ``x * (Q x)`` of the squared Frobenius norm."""
    flat = X.reshape(9, -1)
    return flat * (_layout("gram", X) @ flat)


def squared_norms(X: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norms of the I*Id, A and S parts: (9, N, F) -> (3, N, F) = [3 I^2, |A|^2, |S|^2]."""
    # the parts are orthogonal, so the Gram matrix is block diagonal and the terms sum part by part
    return (_layout("parts", X) @ _norm_terms(X)).view(3, *X.shape[1:])


def total_squared_norm(X: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of the full matrix per node and channel: (9, N, F) -> (N, F)."""
    return _norm_terms(X).sum(0).view(X.shape[1:])


def matmul_per_channel(Y: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Per-channel matrix product of full matrices (3, 3, N, F) x (3, 3, N, F) -> (3, 3, N, F)."""
    y0, y1, y2 = Y.unbind(1)        # columns of Y, each (3, N, F)
    m0, m1, m2 = M.unbind(0)        # rows of M
    return y0[:, None] * m0[None] + y1[:, None] * m1[None] + y2[:, None] * m2[None]


def traceless_outer_components(unit: torch.Tensor) -> torch.Tensor:
    """Compact S components of ``u u^T - |u|^2 Id / 3`` for vectors ``unit`` (E, 3) -> (5, E)."""
    x, y, z = unit.unbind(-1)
    third = (x * x + y * y + z * z) / 3.0
    return torch.stack((x * x - third, y * y - third, x * y, x * z, y * z), 0)


def mix_parts(X: torch.Tensor, w_i: torch.Tensor, w_a: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """Bias-free channel mixing of each part: (9, N, F) with weights (F_out, F) -> (9, N, F_out).

    The same matrix acts on all components of a part, so the result stays equivariant.
    """
    i, a, s = X.split((1, 3, 5), 0)
    return torch.cat((i @ w_i.t(), a @ w_a.t(), s @ w_s.t()), 0)


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
# so models use them only outside training (force-loss training needs double backward). On CPU the same sums run
# as compiled loops (the ``_Compiled*`` functions further down, kernels in :mod:`matkit.nn.tensornet_kernels`);
# the chunked torch versions serve other devices.

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


def _chunks(num_edges: int, num_channels: int):
    step = _edge_chunk(num_channels)
    return ((start, min(start + step, num_edges)) for start in range(0, num_edges, step))


def _take_factors(factors: torch.Tensor, group: Optional[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Per-edge factors (C, 3, F) of edges start:stop (from per-group factors when ``group`` is given)."""
    if group is None:
        return factors[start:stop]
    return factors.index_select(0, group[start:stop])


def _accumulate_factor_grad(grad_f, values, group, start, stop):
    if group is None:
        grad_f[start:stop] = values
    else:
        grad_f.index_add_(0, group[start:stop], values)


class _NeighbourMessages(torch.autograd.Function):
    """``out[:, i] = sum_{e: dst_e = i} factors[group_e, part] * Y[:, src_e]`` for compact Y (9, N, F)."""

    @staticmethod
    def forward(ctx, Y, factors, src, dst, group, num_nodes):
        out = Y.new_zeros(9, num_nodes, Y.shape[2])
        for start, stop in _chunks(src.shape[0], Y.shape[2]):
            values = _scale_parts_(Y.index_select(1, src[start:stop]), _take_factors(factors, group, start, stop))
            out.index_add_(1, dst[start:stop], values)
        ctx.save_for_backward(Y, factors, src, dst, group)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        Y, factors, src, dst, group = ctx.saved_tensors
        need_y, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_y = torch.zeros_like(Y) if need_y else None
        grad_f = torch.zeros_like(factors) if need_f else None
        grad_out = grad_out.contiguous()
        for start, stop in _chunks(src.shape[0], Y.shape[2]):
            s = src[start:stop]
            g = grad_out.index_select(1, dst[start:stop])
            if need_f:
                _accumulate_factor_grad(grad_f, _sum_parts(g * Y.index_select(1, s)), group, start, stop)
            if need_y:
                grad_y.index_add_(1, s, _scale_parts_(g, _take_factors(factors, group, start, stop)))
        return grad_y, grad_f, None, None, None, None


class _GeometricMessages(torch.autograd.Function):
    """``out[c, i] = sum_{e: dst_e = i} geometry[c, e] * radial[group_e, part(c)] * pair[pair_index_e]``.

    geometry (9, E); radial (G, 3, F) per group of reverse edges; pair (T, F) per (centre, neighbour) species.
    """

    @staticmethod
    def forward(ctx, geometry, radial, pair, group, pair_index, dst, num_nodes):
        out = radial.new_zeros(9, num_nodes, radial.shape[2])
        index = torch.tensor(PART_INDEX, device=radial.device)
        for start, stop in _chunks(dst.shape[0], radial.shape[2]):
            f = _take_factors(radial, group, start, stop) * pair.index_select(0, pair_index[start:stop])[:, None]
            values = f.index_select(1, index).transpose(0, 1) * geometry[:, start:stop, None]
            out.index_add_(1, dst[start:stop], values)
        ctx.save_for_backward(geometry, radial, pair, group, pair_index, dst)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        geometry, radial, pair, group, pair_index, dst = ctx.saved_tensors
        need_g, need_r, need_p = ctx.needs_input_grad[:3]
        grad_g = torch.empty_like(geometry) if need_g else None
        grad_r = torch.zeros_like(radial) if need_r else None
        grad_p = torch.zeros_like(pair) if need_p else None
        index = torch.tensor(PART_INDEX, device=radial.device)
        grad_out = grad_out.contiguous()
        for start, stop in _chunks(dst.shape[0], radial.shape[2]):
            g = grad_out.index_select(1, dst[start:stop])                      # (9, C, F)
            r = _take_factors(radial, group, start, stop)                      # (C, 3, F)
            p = pair.index_select(0, pair_index[start:stop])[:, None]          # (C, 1, F)
            if need_g:
                grad_g[:, start:stop] = (g * (r * p).index_select(1, index).transpose(0, 1)).sum(-1)
            if need_r or need_p:
                gf = _sum_parts(g * geometry[:, start:stop, None])             # d out / d factor, (C, 3, F)
                if need_r:
                    _accumulate_factor_grad(grad_r, gf * p, group, start, stop)
                if need_p:
                    grad_p.index_add_(0, pair_index[start:stop], (gf * r).sum(1))
        return grad_g, grad_r, grad_p, None, None, None, None


class _CompiledNeighbourMessages(torch.autograd.Function):
    """:class:`_NeighbourMessages` with the Numba kernels of :mod:`matkit.nn.tensornet_kernels` (CPU tensors)."""

    @staticmethod
    def forward(ctx, Y, factors, src, dst, group, num_nodes):
        ctx.save_for_backward(Y, factors, src, dst, group)
        return kernels.neighbour_forward(Y, factors, group, src, dst, num_nodes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        Y, factors, src, dst, group = ctx.saved_tensors
        grad_y, grad_f = kernels.neighbour_backward(grad_out, Y, factors, group, src, dst,
                                                    *ctx.needs_input_grad[:2])
        return grad_y, grad_f, None, None, None, None


class _CompiledGeometricMessages(torch.autograd.Function):
    """:class:`_GeometricMessages` with the Numba kernels of :mod:`matkit.nn.tensornet_kernels` (CPU tensors)."""

    @staticmethod
    def forward(ctx, geometry, radial, pair, group, pair_index, dst, num_nodes):
        ctx.save_for_backward(geometry, radial, pair, group, pair_index, dst)
        return kernels.geometric_forward(geometry, radial, pair, group, pair_index, dst, num_nodes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        geometry, radial, pair, group, pair_index, dst = ctx.saved_tensors
        grads = kernels.geometric_backward(grad_out, geometry, radial, pair, group, pair_index, dst,
                                           *ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)


def neighbour_messages(Y: torch.Tensor, factors: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                       num_nodes: int, group: Optional[torch.Tensor] = None, fused: bool = True) -> torch.Tensor:
    """Sum over edges of per-part factors times the neighbour's compact tensor, at the centre.

    Y (9, N, F) compact node tensors; src / dst (E,) neighbour / centre; factors (E, 3, F), or (G, 3, F) per
    group of edges with ``group`` (E,) the group of each edge (reverse edges share distance-only factors)
    -> (9, N, F). ``fused=True``: no per-edge tensor is stored, first-order differentiable only (Numba kernels
    for CPU tensors, edge-chunked torch ops on other devices); ``False``: plain autograd ops.
    """
    if fused:
        if Y.device.type == "cpu":
            if group is None:
                group = torch.arange(src.shape[0], device=src.device)
            return _CompiledNeighbourMessages.apply(Y, factors, src, dst, group, num_nodes)
        return _NeighbourMessages.apply(Y, factors, src, dst, group, num_nodes)
    if group is not None:
        factors = factors.index_select(0, group)
    out = []
    for part, values in zip(factors.unbind(1), Y.split([1, 3, 5], 0)):
        values = values.index_select(1, src) * part
        out.append(values.new_zeros(values.shape[0], num_nodes, values.shape[2]).index_add_(1, dst, values))
    return torch.cat(out, 0)


def geometric_messages(geometry: torch.Tensor, radial: torch.Tensor, pair: torch.Tensor, group: torch.Tensor,
                       pair_index: torch.Tensor, dst: torch.Tensor, num_nodes: int, fused: bool = True) -> torch.Tensor:
    """Sum over edges of geometric components times per-part factors ``radial[group] * pair[pair_index]``.

    geometry (9, E) compact components of each edge's tensor; radial (G, 3, F) distance-only factors per group of
    reverse edges, group (E,); pair (T, F) species-pair factors, pair_index (E,); dst (E,) centres -> (9, N, F).
    ``fused`` as in :func:`neighbour_messages`.
    """
    if fused:
        if radial.device.type == "cpu":
            return _CompiledGeometricMessages.apply(geometry, radial, pair, group, pair_index, dst, num_nodes)
        return _GeometricMessages.apply(geometry, radial, pair, group, pair_index, dst, num_nodes)
    factors = radial.index_select(0, group) * pair.index_select(0, pair_index)[:, None]
    out = []
    for part, values in zip(factors.unbind(1), geometry.split([1, 3, 5], 0)):
        values = values[:, :, None] * part
        out.append(values.new_zeros(values.shape[0], num_nodes, values.shape[2]).index_add_(1, dst, values))
    return torch.cat(out, 0)
