"""Numba CPU kernels for pointwise functions on the S^2 grid (inference): a SiLU, ``from_grid(silu(to_grid(h)))``
(:class:`GridSiLU`), and a bias-free 3-layer SiLU MLP, ``from_grid(mlp(to_grid(x)))`` (:class:`GridMLP`).

eSCN applies the SiLU to every edge's message (``h`` (E, K, C) edge-frame coefficients, a grid of P points). As torch
ops the grid values (E, P, C) are materialised three times (values, SiLU, and again in the backward pass), which
on Si512 is ~60 MB per tensor for a few FLOPs per byte: the ops are bound by memory traffic. The kernel goes through
the edges in tiles of ``TILE`` with the tile's (P, TILE * C) values in cache: forward ``g = T h``,
``out = F silu(g)``; backward recomputes ``g`` and returns ``grad_h = T^T (silu'(g) * F^T grad_out)``, with
``T`` (P, K) and ``F`` (K_out, P) the matrices of :class:`matkit.nn.sphere_grid.SphereGrid`; the products are
BLAS calls (``np.dot``) on the tile. First-order only and serial, like :mod:`matkit.nn.tensornet_kernels`.

Numba here has no vector math library, so ``np.exp`` is a scalar call per value, which would cost more than the
rest of the kernel. In float32 the sigmoid uses an exponential that vectorises: ``exp(v) = 2^k exp(r)`` with
``k = round(v / ln 2)``, ``|r| <= ln2 / 2``, ``exp(r)`` by its degree-6 Taylor polynomial (truncation error
< 1.2e-7 relative, one float32 ulp) and ``2^k`` built from the exponent bits; the sigmoid is within 2e-7 relative
of the exact one (tested). float64 uses ``np.exp``.

:class:`GridMLP` is eSCN's node update and readout: per tile of atoms the grid values of each input, the MLP's
activations and the projection back are BLAS products on cache-sized blocks; the backward pass recomputes the
tile's activations instead of storing (N, P, H) tensors. Its weights must be frozen (no weight gradients).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

__all__ = ["GridSiLU", "GridMLP", "cpu_inference"]

_OPTIONS = dict(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)


def cpu_inference(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether the first-order Numba kernels of the S^2-grid and eSCN blocks apply: ``module`` in eval mode and
    ``x`` a float32 / float64 CPU tensor (training and other devices use torch ops)."""
    return not module.training and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)

_F = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _F(1.4426950408889634), _F(0.693359375), _F(-2.12194440e-4)  # ln2 = HI + LO
_ONE, _HALF, _CLAMP = _F(1.0), _F(0.5), _F(87.0)                  # exp(+-87) stays within float32's range
_C2, _C3, _C4, _C5, _C6 = _F(1 / 2), _F(1 / 6), _F(1 / 24), _F(1 / 120), _F(1 / 720)


@njit(**_OPTIONS)
def _sigmoid_float32(g, s, bits):
    """s = 1 / (1 + exp(-g)) elementwise for float32 (P, C) arrays; ``bits`` (P, C) int32 scratch."""
    P, C = g.shape
    for p in range(P):
        for c in range(C):
            v = min(max(-g[p, c], -_CLAMP), _CLAMP)
            k = np.floor(v * _LOG2E + _HALF)
            r = v - k * _LN2_HI - k * _LN2_LO
            s[p, c] = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6)))))
            bits[p, c] = (np.int32(k) + np.int32(127)) << np.int32(23)
    two_to_k = bits.view(np.float32)
    for p in range(P):
        for c in range(C):
            s[p, c] = _ONE / (_ONE + s[p, c] * two_to_k[p, c])


@njit(**_OPTIONS)
def _sigmoid_exact(g, s):
    P, C = g.shape
    for p in range(P):
        for c in range(C):
            s[p, c] = 1.0 / (1.0 + np.exp(-g[p, c]))


@njit(**_OPTIONS)
def _sigmoid(g, s, bits, fast):
    if fast:
        _sigmoid_float32(g, s, bits)
    else:
        _sigmoid_exact(g, s)


@njit(**_OPTIONS)
def _times_silu_prime(d, a, s):
    """d *= silu'(a) elementwise, with s = sigmoid(a); all (R, H). (Written without a float64 literal, which would
    promote float32 arithmetic.)"""
    R, H = d.shape
    for r in range(R):
        for k in range(H):
            d[r, k] *= s[r, k] + a[r, k] * (s[r, k] - s[r, k] * s[r, k])


#: edges per tile: the tile's grid values (P, TILE * C) stay in cache, and each product is one BLAS call
TILE = 8


@njit(**_OPTIONS)
def _load_tile(a, e0, nb, tile):
    """tile (K, width) <- a[e0:e0 + nb] (nb, K, C) transposed (column b * C + c); columns past nb * C are zero."""
    K, C = a.shape[1], a.shape[2]
    if nb * C < tile.shape[1]:
        tile[:] = 0.0
    for b in range(nb):
        for k in range(K):
            for c in range(C):
                tile[k, b * C + c] = a[e0 + b, k, c]


@njit(**_OPTIONS)
def _store_tile(tile, e0, nb, a):
    """a[e0:e0 + nb] (nb, K, C) <- tile (K, width), the layout of :func:`_load_tile`."""
    K, C = a.shape[1], a.shape[2]
    for b in range(nb):
        for k in range(K):
            for c in range(C):
                a[e0 + b, k, c] = tile[k, b * C + c]


@njit(**_OPTIONS)
def _forward(T, F, h, fast, out):
    E, K, C = h.shape
    P, width = T.shape[0], TILE * C
    hin, g, s = np.empty((K, width), h.dtype), np.empty((P, width), h.dtype), np.empty((P, width), h.dtype)
    o, bits = np.empty((F.shape[0], width), h.dtype), np.empty((P, width), np.int32)
    for e0 in range(0, E, TILE):
        nb = min(TILE, E - e0)
        _load_tile(h, e0, nb, hin)
        np.dot(T, hin, g)
        _sigmoid(g, s, bits, fast)
        np.multiply(s, g, s)
        np.dot(F, s, o)
        _store_tile(o, e0, nb, out)


@njit(**_OPTIONS)
def _backward(T, F, h, grad_out, fast, grad_h):
    E, K, C = h.shape
    P, width = T.shape[0], TILE * C
    Tt, Ft = np.ascontiguousarray(T.T), np.ascontiguousarray(F.T)
    hin, gin = np.empty((K, width), h.dtype), np.empty((F.shape[0], width), h.dtype)
    g, s, d = np.empty((P, width), h.dtype), np.empty((P, width), h.dtype), np.empty((P, width), h.dtype)
    gh, bits = np.empty((K, width), h.dtype), np.empty((P, width), np.int32)
    for e0 in range(0, E, TILE):
        nb = min(TILE, E - e0)
        _load_tile(h, e0, nb, hin)
        _load_tile(grad_out, e0, nb, gin)
        np.dot(T, hin, g)
        _sigmoid(g, s, bits, fast)
        np.dot(Ft, gin, d)
        _times_silu_prime(d, g, s)
        np.dot(Tt, d, gh)
        _store_tile(gh, e0, nb, grad_h)


class GridSiLU(torch.autograd.Function):
    """``from_grid(silu(to_grid(h)))`` for ``h`` (B, K, C) and the grid matrices ``T`` (P, K) (coefficients ->
    values) and ``F`` (K_out, P) (values -> coefficients); CPU tensors of one float dtype -> (B, K_out, C).
    Gradient for ``h`` only (the grid matrices are constants)."""

    @staticmethod
    def forward(ctx, h, T, F):
        hn = h.detach().contiguous().numpy()
        out = np.empty((hn.shape[0], F.shape[0], hn.shape[2]), dtype=hn.dtype)
        _forward(T.contiguous().numpy(), F.contiguous().numpy(), hn, hn.dtype == np.float32, out)
        ctx.save_for_backward(h, T, F)
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, T, F = ctx.saved_tensors
        hn = h.detach().contiguous().numpy()
        grad_h = np.empty_like(hn)
        _backward(T.contiguous().numpy(), F.contiguous().numpy(), hn, grad_out.contiguous().numpy(),
                  hn.dtype == np.float32, grad_h)
        return torch.from_numpy(grad_h), None, None


# ---- a pointwise 3-layer MLP on the S^2 grid -------------------------------------------------------------------
#: atoms per tile of the grid MLP: few, so that the tile's (TILE_MLP * P, H) activations stay in L2
TILE_MLP = 2


@njit(**_OPTIONS)
def _mlp_tile_forward(T, xs, e0, nb, W1t, W2t, W3t, xin, v, t, a1, s1, h1, a2, s2, h2, y, bits, fast):
    """For the atoms e0..e0+nb: v = grid values of input i as (P, TILE * C) (one product for the tile), read as
    rows of (point, atom) pairs: a1 = sum_i v_i W1_i^T, s1 = sigmoid(a1), h1 = a1 s1, a2 = h1 W2^T,
    s2 = sigmoid(a2), h2 = a2 s2, y = h2 W3^T. Every array is preallocated (temporaries of this size would be
    fresh pages from the OS on every tile)."""
    n_in, C = xs.shape[0], xs.shape[3]
    rows = v.shape[0] * v.shape[1] // C
    for i in range(n_in):
        _load_tile(xs[i], e0, nb, xin)
        np.dot(T, xin, v)
        if i == 0:
            np.dot(v.reshape(rows, C), W1t[i], a1)
        else:
            np.dot(v.reshape(rows, C), W1t[i], t)
            a1 += t
    _sigmoid(a1, s1, bits, fast)
    np.multiply(a1, s1, h1)
    np.dot(h1, W2t, a2)
    _sigmoid(a2, s2, bits, fast)
    np.multiply(a2, s2, h2)
    np.dot(h2, W3t, y)


@njit(**_OPTIONS)
def _mlp_buffers(P, K, C, H, Cout, dtype):
    rows = TILE_MLP * P
    return (np.zeros((K, TILE_MLP * C), dtype), np.empty((P, TILE_MLP * C), dtype), np.empty((rows, H), dtype),
            np.empty((rows, H), dtype), np.empty((rows, H), dtype), np.empty((rows, H), dtype),
            np.empty((rows, H), dtype), np.empty((rows, H), dtype), np.empty((rows, H), dtype),
            np.empty((rows, Cout), dtype), np.empty((rows, H), np.int32))


@njit(**_OPTIONS)
def _mlp_forward(T, F, xs, W1t, W2t, W3t, fast, out):
    n_in, N, K, C = xs.shape
    P, H, Cout = T.shape[0], W2t.shape[0], W3t.shape[1]
    xin, v, t, a1, s1, h1, a2, s2, h2, y, bits = _mlp_buffers(P, K, C, H, Cout, xs.dtype)
    o = np.empty((F.shape[0], TILE_MLP * Cout), xs.dtype)
    for e0 in range(0, N, TILE_MLP):
        nb = min(TILE_MLP, N - e0)
        _mlp_tile_forward(T, xs, e0, nb, W1t, W2t, W3t, xin, v, t, a1, s1, h1, a2, s2, h2, y, bits, fast)
        np.dot(F, y.reshape(P, TILE_MLP * Cout), o)
        _store_tile(o, e0, nb, out)


@njit(**_OPTIONS)
def _mlp_backward(T, F, xs, W1t, W2t, W3t, grad_out, fast, grad_xs):
    n_in, N, K, C = xs.shape
    P, H, Cout = T.shape[0], W2t.shape[0], W3t.shape[1]
    rows = TILE_MLP * P
    Tt, Ft = np.ascontiguousarray(T.T), np.ascontiguousarray(F.T)
    W1 = np.empty((n_in, H, C), xs.dtype)
    for i in range(n_in):
        W1[i] = W1t[i].T
    W2, W3 = np.ascontiguousarray(W2t.T), np.ascontiguousarray(W3t.T)
    xin, v, t, a1, s1, h1, a2, s2, h2, y, bits = _mlp_buffers(P, K, C, H, Cout, xs.dtype)
    gin, gy = np.zeros((F.shape[0], TILE_MLP * Cout), xs.dtype), np.empty((P, TILE_MLP * Cout), xs.dtype)
    gv, gx = np.empty((rows, C), xs.dtype), np.empty((K, TILE_MLP * C), xs.dtype)
    g1, g2 = np.empty((rows, H), xs.dtype), np.empty((rows, H), xs.dtype)
    for e0 in range(0, N, TILE_MLP):
        nb = min(TILE_MLP, N - e0)
        _mlp_tile_forward(T, xs, e0, nb, W1t, W2t, W3t, xin, v, t, a1, s1, h1, a2, s2, h2, y, bits, fast)
        _load_tile(grad_out, e0, nb, gin)
        np.dot(Ft, gin, gy)
        np.dot(gy.reshape(rows, Cout), W3, g2)                # d/d h2
        _times_silu_prime(g2, a2, s2)                         # d/d a2
        np.dot(g2, W2, g1)
        _times_silu_prime(g1, a1, s1)                         # d/d a1
        for i in range(n_in):
            np.dot(g1, W1[i], gv)
            np.dot(Tt, gv.reshape(P, TILE_MLP * C), gx)
            _store_tile(gx, e0, nb, grad_xs[i])


class GridMLP(torch.autograd.Function):
    """``F @ mlp(concat_i (T @ x_i))`` per atom: inputs ``xs`` (n_in, N, K, C) stacked coefficients, ``T`` (P, K),
    ``F`` (K_out, P) (or the quadrature weights (1, P) for a sphere mean), and the weights of a bias-free
    Linear-SiLU-Linear-SiLU-Linear MLP ``W1`` (H, n_in C), ``W2`` (H, H), ``W3`` (C_out, H) -> (N, K_out, C_out).
    Gradient for ``xs`` only: use it only when the MLP's weights are frozen."""

    @staticmethod
    def forward(ctx, xs, T, F, W1, W2, W3):
        xn = xs.detach().contiguous().numpy()
        n_in, C = xn.shape[0], xn.shape[3]
        W1t = np.ascontiguousarray(W1.detach().numpy().T.reshape(n_in, C, -1))   # (n_in, C, H): W1_i^T blocks
        W2t, W3t = (np.ascontiguousarray(w.detach().numpy().T) for w in (W2, W3))
        Tn, Fn = T.contiguous().numpy(), F.contiguous().numpy()
        out = np.empty((xn.shape[1], Fn.shape[0], W3t.shape[1]), dtype=xn.dtype)
        _mlp_forward(Tn, Fn, xn, W1t, W2t, W3t, xn.dtype == np.float32, out)
        ctx.arrays = (Tn, Fn, xn, W1t, W2t, W3t)
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        Tn, Fn, xn, W1t, W2t, W3t = ctx.arrays
        grad_xs = np.empty_like(xn)
        _mlp_backward(Tn, Fn, xn, W1t, W2t, W3t, grad_out.contiguous().numpy(), xn.dtype == np.float32, grad_xs)
        return torch.from_numpy(grad_xs), None, None, None, None, None
