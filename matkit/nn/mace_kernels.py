"""Numba CPU kernel for Gaunt-MACE's scalar-feature message (inference).

:meth:`matkit.nn.mace_blocks.GauntInteraction.scalar_message` computes, per centre atom ``i`` and neighbour slot
``s`` (neighbour ``j = src[i, s]``),

    A[i, k, c] = sum_s Y[i, k, s] * R[row[i, s], l(k), c] * H[j, c]

with the radial weights ``R`` stored per slot (``row = i * M + s``) or per edge (``row`` = the slot's edge), so
per-edge weights (radial tables) need not be padded.

As torch ops the product ``R * H[j]`` (N, M, L+1, C) is materialised, split by degree and contracted with one
batched matmul per degree, and the backward pass materialises the same blocks again; on Si512 with 128 channels
they are ~50 MB each. The kernel below streams over (i, s) once in the forward pass and once in the backward pass
(returning the gradients for Y, R and H), skipping empty slots. It is first-order only and serial, like
:mod:`matkit.nn.tensornet_kernels` (whose docstring says why).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

__all__ = ["SlotMessage"]

_FASTMATH = {"reassoc", "contract"}


@njit(fastmath=_FASTMATH, cache=True)
def _forward(Y, R, H, src, row, counts, lmax, out):
    C = H.shape[1]
    rh = np.empty(C, dtype=H.dtype)
    for i in range(Y.shape[0]):
        for s in range(counts[i]):
            j, r = src[i, s], row[i, s]
            for l in range(lmax + 1):
                for c in range(C):
                    rh[c] = R[r, l, c] * H[j, c]
                for k in range(l * l, (l + 1) * (l + 1)):
                    y = Y[i, k, s]
                    for c in range(C):
                        out[i, k, c] += y * rh[c]


@njit(fastmath=_FASTMATH, cache=True)
def _backward(Y, R, H, src, row, counts, lmax, grad_out, grad_y, grad_r, grad_h):
    C = H.shape[1]
    t = np.empty(C, dtype=H.dtype)
    for i in range(Y.shape[0]):
        for s in range(counts[i]):
            j, r = src[i, s], row[i, s]
            for l in range(lmax + 1):
                for c in range(C):
                    t[c] = 0.0
                for k in range(l * l, (l + 1) * (l + 1)):
                    y = Y[i, k, s]
                    acc = 0.0
                    for c in range(C):
                        acc += grad_out[i, k, c] * R[r, l, c] * H[j, c]
                        t[c] += grad_out[i, k, c] * y
                    grad_y[i, k, s] = acc
                for c in range(C):
                    grad_r[r, l, c] = t[c] * H[j, c]
                    grad_h[j, c] += t[c] * R[r, l, c]


class SlotMessage(torch.autograd.Function):
    """``A (N, (lmax+1)^2, C)`` from ``Y`` (N, >= (lmax+1)^2, M) slot SH, ``R`` (rows, >= lmax+1, C) radial
    weights, ``H`` (N, C) node features, ``src`` and ``row`` (N, M) int64: the neighbour of each slot and the row
    of ``R`` it uses, and ``counts`` (N,) the filled slots of each node (the first ``counts[i]``). CPU tensors of
    one float dtype; each filled slot must have its own row (rows are written, not accumulated, in backward)."""

    @staticmethod
    def forward(ctx, Y, R, H, src, row, counts, lmax):
        Yn, Rn, Hn = (x.detach().contiguous().numpy() for x in (Y, R, H))
        out = np.zeros((Yn.shape[0], (lmax + 1) ** 2, Hn.shape[1]), dtype=Hn.dtype)
        _forward(Yn, Rn, Hn, src.contiguous().numpy(), row.contiguous().numpy(), counts.contiguous().numpy(),
                 lmax, out)
        ctx.save_for_backward(Y, R, H, src, row, counts)
        ctx.lmax = lmax
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        Y, R, H, src, row, counts = ctx.saved_tensors
        Yn, Rn, Hn = (x.detach().contiguous().numpy() for x in (Y, R, H))
        grad_y, grad_r, grad_h = np.zeros_like(Yn), np.zeros_like(Rn), np.zeros_like(Hn)
        _backward(Yn, Rn, Hn, src.contiguous().numpy(), row.contiguous().numpy(), counts.contiguous().numpy(),
                  ctx.lmax, grad_out.contiguous().numpy(), grad_y, grad_r, grad_h)
        return (torch.from_numpy(grad_y), torch.from_numpy(grad_r), torch.from_numpy(grad_h), None, None, None,
                None)
