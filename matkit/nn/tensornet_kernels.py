"""Numba CPU kernels for TensorNet's message passing (inference).

The two edge sums of TensorNet (:func:`matkit.nn.tensornet_blocks.neighbour_messages` and
:func:`~matkit.nn.tensornet_blocks.geometric_messages`) are gathers and scatters of (9, F) blocks per edge. As
torch ops each edge block passes through memory several times (gather, scale, scatter, and again in the backward
pass); a compiled loop over edges does the multiply-add in registers and is ~7x faster at MD sizes.

The kernels are serial (one thread): Numba's parallel loops start an OpenMP pool of their own next to PyTorch's,
and on a busy machine its spinning threads slowed everything else down by orders of magnitude. The kernels are
first-order only: the autograd functions in :mod:`matkit.nn.tensornet_blocks` use them outside
training.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

__all__ = ["neighbour_forward", "neighbour_backward", "geometric_forward", "geometric_backward", "as_array"]

# reassociation and fused multiply-add let LLVM vectorise the channel loops; no "no-NaN / no-inf" assumptions,
# so a NaN anywhere still propagates to the energy instead of being optimised away
_FASTMATH = {"reassoc", "contract"}

PART = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2], dtype=np.int64)  # part (I, A, S) of each compact component


def as_array(t: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (made contiguous first)."""
    return t.detach().contiguous().numpy()


@njit(fastmath=_FASTMATH, cache=True)
def _neighbour_forward(Y, factors, group, src, dst, part, out):
    F = Y.shape[2]
    for e in range(src.shape[0]):
        s, d, g = src[e], dst[e], group[e]
        for c in range(9):
            p = part[c]
            for f in range(F):
                out[c, d, f] += factors[g, p, f] * Y[c, s, f]


@njit(fastmath=_FASTMATH, cache=True)
def _neighbour_backward(Y, factors, group, src, dst, part, grad_out, grad_y, grad_f, need_y, need_f):
    F = Y.shape[2]
    for e in range(src.shape[0]):
        s, d, g = src[e], dst[e], group[e]
        for c in range(9):
            p = part[c]
            if need_y:
                for f in range(F):
                    grad_y[c, s, f] += factors[g, p, f] * grad_out[c, d, f]
            if need_f:
                for f in range(F):
                    grad_f[g, p, f] += grad_out[c, d, f] * Y[c, s, f]


@njit(fastmath=_FASTMATH, cache=True)
def _geometric_forward(geometry, radial, pair, group, pair_index, dst, part, out):
    F = radial.shape[2]
    for e in range(dst.shape[0]):
        d, g, t = dst[e], group[e], pair_index[e]
        for c in range(9):
            p = part[c]
            x = geometry[c, e]
            for f in range(F):
                out[c, d, f] += x * radial[g, p, f] * pair[t, f]


@njit(fastmath=_FASTMATH, cache=True)
def _geometric_backward_factors(geometry, radial, pair, group, pair_index, dst, part, grad_out, grad_r, grad_p,
                                need_r, need_p):
    F = radial.shape[2]
    for e in range(dst.shape[0]):
        d, g, t = dst[e], group[e], pair_index[e]
        for c in range(9):
            p = part[c]
            x = geometry[c, e]
            for f in range(F):
                gx = grad_out[c, d, f] * x
                if need_r:
                    grad_r[g, p, f] += gx * pair[t, f]
                if need_p:
                    grad_p[t, f] += gx * radial[g, p, f]


@njit(fastmath=_FASTMATH, cache=True)
def _geometric_backward_geometry(radial, pair, group, pair_index, dst, part, grad_out, grad_g):
    F = radial.shape[2]
    for e in range(dst.shape[0]):
        d, g, t = dst[e], group[e], pair_index[e]
        for c in range(9):
            p = part[c]
            acc = 0.0
            for f in range(F):
                acc += grad_out[c, d, f] * radial[g, p, f] * pair[t, f]
            grad_g[c, e] = acc


def neighbour_forward(Y, factors, group, src, dst, num_nodes):
    """``out[c, i] = sum_{e: dst_e = i} factors[group_e, part(c)] * Y[c, src_e]``: Y (9, N, F), factors (G, 3, F),
    group / src / dst (E,) int64 -> (9, num_nodes, F)."""
    out = Y.new_zeros(9, num_nodes, Y.shape[2])
    if src.shape[0]:
        _neighbour_forward(as_array(Y), as_array(factors), as_array(group), as_array(src), as_array(dst), PART,
                           out.numpy())
    return out


def neighbour_backward(grad_out, Y, factors, group, src, dst, need_y: bool, need_f: bool):
    """Gradients of :func:`neighbour_forward` w.r.t. Y and factors (None where not needed)."""
    grad_y = torch.zeros_like(Y) if need_y else None
    grad_f = torch.zeros_like(factors) if need_f else None
    if src.shape[0] and (need_y or need_f):
        dummy = np.zeros((1, 1, 1), dtype=as_array(Y).dtype)
        _neighbour_backward(as_array(Y), as_array(factors), as_array(group), as_array(src), as_array(dst), PART,
                            as_array(grad_out), grad_y.numpy() if need_y else dummy,
                            grad_f.numpy() if need_f else dummy, need_y, need_f)
    return grad_y, grad_f


def geometric_forward(geometry, radial, pair, group, pair_index, dst, num_nodes):
    """``out[c, i] = sum_{e: dst_e = i} geometry[c, e] * radial[group_e, part(c)] * pair[pair_index_e]``:
    geometry (9, E), radial (G, 3, F), pair (T, F) -> (9, num_nodes, F)."""
    out = radial.new_zeros(9, num_nodes, radial.shape[2])
    if dst.shape[0]:
        _geometric_forward(as_array(geometry), as_array(radial), as_array(pair), as_array(group),
                           as_array(pair_index), as_array(dst), PART, out.numpy())
    return out


def geometric_backward(grad_out, geometry, radial, pair, group, pair_index, dst, need_g, need_r, need_p):
    """Gradients of :func:`geometric_forward` w.r.t. geometry, radial and pair (None where not needed)."""
    grad_g = torch.zeros_like(geometry) if need_g else None
    grad_r = torch.zeros_like(radial) if need_r else None
    grad_p = torch.zeros_like(pair) if need_p else None
    if not dst.shape[0]:
        return grad_g, grad_r, grad_p
    arrays = [as_array(t) for t in (radial, pair, group, pair_index, dst)]
    grad_out = as_array(grad_out)
    if need_g:
        _geometric_backward_geometry(*arrays, PART, grad_out, grad_g.numpy())
    if need_r or need_p:
        dummy = np.zeros((1, 1, 1), dtype=grad_out.dtype)
        _geometric_backward_factors(as_array(geometry), *arrays, PART, grad_out,
                                    grad_r.numpy() if need_r else dummy,
                                    grad_p.numpy() if need_p else dummy[0], need_r, need_p)
    return grad_g, grad_r, grad_p
