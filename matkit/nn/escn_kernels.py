"""Numba CPU kernels for eSCN's edge rotations (inference).

Every eSCN layer takes the coefficients of both ends of every edge into the edge's frame and the message back:

    gather:   y[e] = [D_e x[src_e] | D_e x[dst_e]]            (E, K_t, 2C)
    scatter:  out[dst_e] += w_e D_e^T m[e]                    (N, K, C)

with ``D_e`` (K_t, K) the Wigner matrix of edge ``e`` restricted to the kept orders. As torch ops these are
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

__all__ = ["RotateGather", "RotateScatter"]

_OPTIONS = dict(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)


@njit(**_OPTIONS)
def _gather_forward(x, D, src, dst, degree, out):
    C = x.shape[2]
    for e in range(D.shape[0]):
        s, t = src[e], dst[e]    # hoisted: the compiler cannot prove the writes below leave them unchanged
        for k in range(D.shape[1]):
            l = degree[k]
            for c in range(2 * C):
                out[e, k, c] = 0.0
            for j in range(l * l, (l + 1) * (l + 1)):
                d = D[e, k, j]
                for c in range(C):
                    out[e, k, c] += d * x[s, j, c]
                for c in range(C):
                    out[e, k, C + c] += d * x[t, j, c]


@njit(**_OPTIONS)
def _gather_backward(x, D, src, dst, degree, grad_out, grad_x, grad_D):
    C = x.shape[2]
    for e in range(D.shape[0]):
        s, t = src[e], dst[e]
        for k in range(D.shape[1]):
            l = degree[k]
            for j in range(l * l, (l + 1) * (l + 1)):
                d = D[e, k, j]
                acc = 0.0
                for c in range(C):
                    g_s, g_t = grad_out[e, k, c], grad_out[e, k, C + c]
                    acc += g_s * x[s, j, c] + g_t * x[t, j, c]
                    grad_x[s, j, c] += d * g_s
                    grad_x[t, j, c] += d * g_t
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


class RotateGather(torch.autograd.Function):
    """``[D x[src] | D x[dst]]`` (E, K_t, 2C) from ``x`` (N, K, C), ``D`` (E, K_t, K) block-diagonal by degree,
    ``src``, ``dst`` (E,) int64 and ``degree`` (K_t,) int64, the degree of each kept row; CPU, one float dtype.
    Gradients for ``x`` and ``D``."""

    @staticmethod
    def forward(ctx, x, D, src, dst, degree):
        xn, Dn, sn, tn, ln = _arrays(x, D, src, dst, degree)
        out = np.empty((Dn.shape[0], Dn.shape[1], 2 * xn.shape[2]), dtype=xn.dtype)
        _gather_forward(xn, Dn, sn, tn, ln, out)
        ctx.save_for_backward(x, D, src, dst, degree)
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xn, Dn, sn, tn, ln, gn = _arrays(*ctx.saved_tensors, grad_out)
        grad_x, grad_D = np.zeros_like(xn), np.zeros_like(Dn)
        _gather_backward(xn, Dn, sn, tn, ln, gn, grad_x, grad_D)
        return torch.from_numpy(grad_x), torch.from_numpy(grad_D), None, None, None


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
