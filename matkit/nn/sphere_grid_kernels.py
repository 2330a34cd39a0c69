"""Numba CPU kernels for pointwise functions on the S^2 grid (inference): a SiLU, ``from_grid(silu(to_grid(h)))``
(:class:`GridSiLU`), and the grid part of a bias-free 3-layer SiLU MLP applied pointwise (:class:`GridMLP`).

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

:class:`GridMLP` is the grid part of eSCN's node update and readout: per tile of atoms the grid values, the MLP's
middle layer and activations and the projection back are BLAS products on cache-sized blocks; the backward pass
recomputes the tile's activations instead of storing (N, P, H) tensors. Its weight must be frozen (no weight
gradient).
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


# ---- the inner layers of a pointwise 3-layer MLP on the S^2 grid ---------------------------------------------
#: atoms per tile of the grid MLP: few, so that the tile's (TILE_MLP * P, H) activations stay in L2
TILE_MLP = 2


@njit(**_OPTIONS)
def _mlp_tile_forward(T, z, e0, nb, W2t, zin, a1, s1, h1, a2, s2, bits, fast):
    """For the atoms e0..e0+nb: a1 = T z as (P, TILE * H) (one product for the tile), read as rows of (point, atom)
    pairs (TILE * P, H); s1 = sigmoid(a1), h1 = a1 s1, a2 = h1 W2^T, s2 = sigmoid(a2); h2 = a2 s2 is left to the
    caller (written into s2). Every array is preallocated (temporaries of this size would be fresh pages from the
    OS on every tile)."""
    H = z.shape[2]
    _load_tile(z, e0, nb, zin)
    np.dot(T, zin, a1.reshape(T.shape[0], TILE_MLP * H))
    _sigmoid(a1, s1, bits, fast)
    np.multiply(a1, s1, h1)
    np.dot(h1, W2t, a2)
    _sigmoid(a2, s2, bits, fast)


@njit(**_OPTIONS)
def _mlp_buffers(P, K, H, dtype):
    rows = TILE_MLP * P
    return (np.zeros((K, TILE_MLP * H), dtype), np.empty((rows, H), dtype), np.empty((rows, H), dtype),
            np.empty((rows, H), dtype), np.empty((rows, H), dtype), np.empty((rows, H), dtype),
            np.empty((rows, H), np.int32))


@njit(**_OPTIONS)
def _mlp_forward(T, F, z, W2t, fast, out):
    N, K, H = z.shape
    P = T.shape[0]
    zin, a1, s1, h1, a2, s2, bits = _mlp_buffers(P, K, H, z.dtype)
    o = np.empty((F.shape[0], TILE_MLP * H), z.dtype)
    for e0 in range(0, N, TILE_MLP):
        nb = min(TILE_MLP, N - e0)
        _mlp_tile_forward(T, z, e0, nb, W2t, zin, a1, s1, h1, a2, s2, bits, fast)
        np.multiply(a2, s2, s2)                                   # h2
        np.dot(F, s2.reshape(P, TILE_MLP * H), o)
        _store_tile(o, e0, nb, out)


@njit(**_OPTIONS)
def _mlp_backward(T, F, z, W2t, grad_out, fast, grad_z):
    N, K, H = z.shape
    P = T.shape[0]
    Tt, Ft, W2 = np.ascontiguousarray(T.T), np.ascontiguousarray(F.T), np.ascontiguousarray(W2t.T)
    zin, a1, s1, h1, a2, s2, bits = _mlp_buffers(P, K, H, z.dtype)
    gin, gz = np.zeros((F.shape[0], TILE_MLP * H), z.dtype), np.empty((K, TILE_MLP * H), z.dtype)
    d2, d1 = np.empty((TILE_MLP * P, H), z.dtype), np.empty((TILE_MLP * P, H), z.dtype)
    for e0 in range(0, N, TILE_MLP):
        nb = min(TILE_MLP, N - e0)
        _mlp_tile_forward(T, z, e0, nb, W2t, zin, a1, s1, h1, a2, s2, bits, fast)
        _load_tile(grad_out, e0, nb, gin)
        np.dot(Ft, gin, d2.reshape(P, TILE_MLP * H))            # d/d h2
        _times_silu_prime(d2, a2, s2)                           # d/d a2
        np.dot(d2, W2, d1)                                      # d/d h1
        _times_silu_prime(d1, a1, s1)                           # d/d a1
        np.dot(Tt, d1.reshape(P, TILE_MLP * H), gz)
        _store_tile(gz, e0, nb, grad_z)


class GridMLP(torch.autograd.Function):
    """The grid part of a bias-free Linear-SiLU-Linear-SiLU-Linear MLP applied pointwise on the S^2 grid:
    ``F @ silu(silu(T @ z) @ W2^T)`` per atom, for ``z`` (N, K, H) coefficients that already went through the
    first linear map, ``T`` (P, K), ``F`` (K_out, P) (or the quadrature weights (1, P) for a sphere mean) and the
    middle weight ``W2`` (H, H) -> (N, K_out, H). (The first and last linear maps act on channels and the grid
    transforms on coefficients, so they commute and run outside, once per coefficient instead of once per grid
    point: see :func:`matkit.nn.escn_blocks.grid_mlp`.) Gradient for ``z`` only: use it only when ``W2`` is
    frozen."""

    @staticmethod
    def forward(ctx, z, T, F, W2):
        zn = z.detach().contiguous().numpy()
        W2t = np.ascontiguousarray(W2.detach().numpy().T)
        Tn, Fn = T.contiguous().numpy(), F.contiguous().numpy()
        out = np.empty((zn.shape[0], Fn.shape[0], zn.shape[2]), dtype=zn.dtype)
        _mlp_forward(Tn, Fn, zn, W2t, zn.dtype == np.float32, out)
        ctx.arrays = (Tn, Fn, zn, W2t)
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        Tn, Fn, zn, W2t = ctx.arrays
        grad_z = np.empty_like(zn)
        _mlp_backward(Tn, Fn, zn, W2t, grad_out.contiguous().numpy(), zn.dtype == np.float32, grad_z)
        return torch.from_numpy(grad_z), None, None, None
