"""Numba CPU kernels for eSCN's edge rotations (inference).

Every eSCN layer takes the coefficients of both ends of every edge into the edge's frame, where the SO(2)
convolution's first linear map ``W1`` (per order block, over degrees and channels) reads them, and the message back:

    gather:   h[e] = W1 [D_e x[src_e] | D_e x[dst_e]]          (E, 1 + 2 mmax, H)
    scatter:  out[dst_e] += w_e D_e^T m[e]                    (N, K, C)

with ``D_e`` (K_t, K) the Wigner matrix of edge ``e`` restricted to the kept orders. The rotation acts on
coefficients and ``W1`` on channels, so the gather applies ``W1``'s channel part at the nodes first
(:class:`ProjectGather`: N instead of E products) and rotates the H-channel projections. As torch ops these are
batched products of tiny matrices (7 x 9 per edge at lmax 2, mmax 1) whose backward passes run at a few GFLOP/s,
plus gathers and scatters of (E, K, C) copies. ``D_e`` is block-diagonal by degree (row ``k`` of degree ``l`` is
non-zero only in columns ``l^2 .. (l+1)^2 - 1``), so the kernels visit only those columns: 25 of the 63 entries
at lmax 2, mmax 1. The gradient of ``D`` outside the blocks is returned as zero, which is exact because
:class:`matkit.nn.wigner.WignerD` writes constant zeros there. First-order only and serial, like
:mod:`matkit.nn.tensornet_kernels`.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

__all__ = ["ProjectGather", "RotateScatter"]

_OPTIONS = dict(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)


@njit(**_OPTIONS)
def _gather_forward(y, D, src, dst, degree, group, block, out):
    H, B = out.shape[2], y.shape[2] // (2 * out.shape[2])
    out[:] = 0.0
    acc = np.empty(H, out.dtype)   # a local sum: accumulating into ``out`` directly does not vectorise
    for e in range(D.shape[0]):
        s, t = src[e], dst[e]
        for k in range(D.shape[1]):
            l, ys, yt = degree[k], block[k] * H, (B + block[k]) * H
            acc[:] = 0.0
            for j in range(l * l, (l + 1) * (l + 1)):
                d, a, b = D[e, k, j], y[s, j, ys:ys + H], y[t, j, yt:yt + H]
                for h in range(H):
                    acc[h] += d * (a[h] + b[h])
            o = out[e, group[k]]
            for h in range(H):
                o[h] += acc[h]


@njit(**_OPTIONS)
def _gather_backward(y, D, src, dst, degree, group, block, grad_out, grad_y, grad_D):
    H, B = grad_out.shape[2], y.shape[2] // (2 * grad_out.shape[2])
    for e in range(D.shape[0]):
        s, t = src[e], dst[e]
        for k in range(D.shape[1]):
            l, ys, yt = degree[k], block[k] * H, (B + block[k]) * H
            go = grad_out[e, group[k]]
            for j in range(l * l, (l + 1) * (l + 1)):
                d, a, b = D[e, k, j], y[s, j, ys:ys + H], y[t, j, yt:yt + H]
                ga, gb = grad_y[s, j, ys:ys + H], grad_y[t, j, yt:yt + H]
                acc = 0.0
                for h in range(H):
                    acc += go[h] * (a[h] + b[h])
                for h in range(H):
                    ga[h] += d * go[h]
                for h in range(H):
                    gb[h] += d * go[h]
                grad_D[e, k, j] = acc


@njit(**_OPTIONS)
def _scatter_forward(m, D, w, dst, degree, out):
    C = m.shape[2]
    for e in range(D.shape[0]):
        t, we = dst[e], w[e]
        for k in range(D.shape[1]):
            l = degree[k]
            for j in range(l * l, (l + 1) * (l + 1)):
                d = we * D[e, k, j]
                for c in range(C):
                    out[t, j, c] += d * m[e, k, c]


@njit(**_OPTIONS)
def _scatter_backward(m, D, w, dst, degree, grad_out, grad_m, grad_D, grad_w):
    C = m.shape[2]
    for e in range(D.shape[0]):
        t, we = dst[e], w[e]
        acc_w = 0.0
        for k in range(D.shape[1]):
            l = degree[k]
            for c in range(C):
                grad_m[e, k, c] = 0.0
            for j in range(l * l, (l + 1) * (l + 1)):
                d = D[e, k, j]
                acc = 0.0
                for c in range(C):
                    g = grad_out[t, j, c]
                    acc += m[e, k, c] * g
                    grad_m[e, k, c] += d * g
                grad_D[e, k, j] = we * acc
                acc_w += d * acc
            for c in range(C):
                grad_m[e, k, c] *= we
        grad_w[e] = acc_w


def _arrays(*tensors):
    return tuple(t.detach().contiguous().numpy() for t in tensors)


class ProjectGather(torch.autograd.Function):
    """The first linear map of the SO(2) convolution, applied at the nodes and rotated into every edge frame:
    ``out[e, group[k]] += sum_j D[e, k, j] (y[src_e, j, source block] + y[dst_e, j, target block])`` -> (E, G, H).

    ``y`` (N, K, 2 B H): per node and coefficient, the projections by the B order blocks' first linear maps
    (channel ``(end * B + b) * H + h``, end 0 = source half of the input channels, 1 = target half);
    ``D`` (E, K_t, K) block-diagonal by degree; ``src``, ``dst`` (E,) int64; for each kept row ``degree``,
    ``group`` (its slot among the G = 1 + 2 mmax rows of the convolution's hidden features: m = 0, +1, -1, +2, ...)
    and ``block`` (its order |m|), all (K_t,) int64; CPU, one float dtype. Gradients for ``y`` and ``D``."""

    @staticmethod
    def forward(ctx, y, D, src, dst, degree, group, block, num_groups):
        yn, Dn, sn, tn, ln, gn, bn = _arrays(y, D, src, dst, degree, group, block)
        out = np.empty((Dn.shape[0], num_groups, yn.shape[2] // (2 * (int(bn.max()) + 1))), dtype=yn.dtype)
        _gather_forward(yn, Dn, sn, tn, ln, gn, bn, out)
        ctx.save_for_backward(y, D, src, dst, degree, group, block)
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        yn, Dn, sn, tn, ln, gn, bn, go = _arrays(*ctx.saved_tensors, grad_out)
        grad_y, grad_D = np.zeros_like(yn), np.zeros_like(Dn)
        _gather_backward(yn, Dn, sn, tn, ln, gn, bn, go, grad_y, grad_D)
        return torch.from_numpy(grad_y), torch.from_numpy(grad_D), None, None, None, None, None, None


class RotateScatter(torch.autograd.Function):
    """``out[dst[e]] += w[e] D[e]^T m[e]`` -> (num_nodes, K, C) from ``m`` (E, K_t, C), ``D`` (E, K_t, K)
    block-diagonal by degree, ``w`` (E,), ``dst`` (E,) int64, ``degree`` (K_t,) int64; CPU, one float dtype.
    Gradients for ``m``, ``D`` and ``w``."""

    @staticmethod
    def forward(ctx, m, D, w, dst, degree, num_nodes):
        mn, Dn, wn, tn, ln = _arrays(m, D, w, dst, degree)
        out = np.zeros((num_nodes, Dn.shape[2], mn.shape[2]), dtype=mn.dtype)
        _scatter_forward(mn, Dn, wn, tn, ln, out)
        ctx.save_for_backward(m, D, w, dst, degree)
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        mn, Dn, wn, tn, ln, gn = _arrays(*ctx.saved_tensors, grad_out)
        grad_m, grad_D, grad_w = np.empty_like(mn), np.zeros_like(Dn), np.empty_like(wn)
        _scatter_backward(mn, Dn, wn, tn, ln, gn, grad_m, grad_D, grad_w)
        return torch.from_numpy(grad_m), torch.from_numpy(grad_D), torch.from_numpy(grad_w), None, None, None
