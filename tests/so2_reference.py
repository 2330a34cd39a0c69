"""The full SO(3) convolution equivalent to an :class:`~matkit.nn.so2.SO2Convolution`, built with e3nn.

Reference implementation for tests and benchmarks (``tests/test_escn.py``, ``benchmarks/so2_convolution.py``); the
models do not use it. The SO(3) convolution of node coefficients ``x`` with the edge's spherical harmonics is a
Clebsch-Gordan tensor product ``sum_paths w_(l_in, l_f, l_out) (x_(l_in) (x) Y_(l_f)(edge))_(l_out)`` with one
(C_out, C_in) weight matrix per path. Rotated into the edge frame (edge on +y, ``Y_lf = sqrt(2 lf + 1) delta_m0``),
path (l_in, l_f, l_out) acts as ``T[m_out, m_in] = sqrt(2 lf + 1) C[m_in, 0, m_out]`` (e3nn Wigner 3j, no
normalisation); the ``2 min(l_in, l_out) + 1`` paths of a degree pair span exactly the SO(2)-equivariant maps of
that pair, so every SO(2) convolution (truncated or not) is an SO(3) convolution with suitable path weights:

* :func:`cg_path_weights` solves for them by least squares from the effective SO(2) weights of one edge;
* :func:`edge_path_weights` does the same for every edge at once (a fixed linear map per degree pair);
* :func:`e3nn_so3_convolution` builds the e3nn ``TensorProduct`` ("uvw" paths, shared or per-edge weights);
* :func:`spherical_harmonics` evaluates the e3nn harmonics of any degree (e3nn itself stops at l = 12; the
  SO(3) convolution of degree-L features needs the filter degrees up to 2L).

Layouts: matkit keeps coefficients as (E, K, C) l-major (index ``l^2 + l + m``); e3nn as flat (E, sum_l C (2l+1))
with channel-major blocks (:func:`to_e3nn_layout`, :func:`from_e3nn_layout`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from e3nn import o3

from matkit.nn.so2 import TruncatedLayout

__all__ = ["so2_target_map", "cg_path_weights", "path_weight_map", "edge_path_weights", "so3_paths",
           "e3nn_so3_convolution", "spherical_harmonics", "to_e3nn_layout", "from_e3nn_layout"]

F64 = torch.float64
E3NN_MAX_SH_DEGREE = 12


def so2_target_map(weights, layout: TruncatedLayout, l_in: int, l_out: int, c_in: int, c_out: int) -> torch.Tensor:
    """(C_out, C_in, 2 l_out + 1, 2 l_in + 1) matrix of the SO(2) convolution from degree l_in to l_out (one edge:
    ``weights`` from :meth:`SO2Convolution.effective_weights` of a single edge)."""
    s = torch.zeros(c_out, c_in, 2 * l_out + 1, 2 * l_in + 1, dtype=F64)

    def block(w, m):  # rows/cols of W are (l - m) * C + c
        return w[0].view(layout.degrees(m), c_out, layout.degrees(m), c_in)[l_out - m, :, l_in - m, :]

    s[:, :, l_out, l_in] = block(weights[0], 0)
    for m in range(1, min(l_in, l_out, layout.mmax) + 1):
        real, imag = weights[m]
        wr = block(real, m)
        wi = block(imag, m) if imag is not None else torch.zeros_like(wr)
        plus_o, minus_o, plus_i, minus_i = l_out + m, l_out - m, l_in + m, l_in - m
        s[:, :, plus_o, plus_i], s[:, :, plus_o, minus_i] = wr, -wi
        s[:, :, minus_o, minus_i], s[:, :, minus_o, plus_i] = wr, wi
    return s


@lru_cache(maxsize=None)
def _path_basis(l_in: int, l_out: int) -> tuple:
    """Filter degrees and the (n_f, 2 l_out + 1, 2 l_in + 1) edge-frame matrices of the paths of a degree pair."""
    filters = list(range(abs(l_in - l_out), l_in + l_out + 1))
    basis = torch.stack([np.sqrt(2 * lf + 1) * o3.wigner_3j(l_in, lf, l_out, dtype=F64)[:, lf, :].T
                         for lf in filters])
    return filters, basis


def cg_path_weights(weights, layout: TruncatedLayout, lmax: int, c_in: int, c_out: int):
    """Solve for the SO(3) path weights w[(l_in, l_f, l_out)] (C_out, C_in) reproducing the SO(2) maps of one edge.

    Returns the weights and the largest least-squares residual (zero iff every SO(2) map is an SO(3) convolution).
    """
    paths, residual = {}, 0.0
    for l_in in range(lmax + 1):
        for l_out in range(lmax + 1):
            filters, basis = _path_basis(l_in, l_out)
            a = basis.reshape(len(filters), -1)
            target = so2_target_map(weights, layout, l_in, l_out, c_in, c_out).reshape(c_out * c_in, -1)
            solution = torch.linalg.lstsq(a.T, target.T).solution                     # (n_f, C_out*C_in)
            residual = max(residual, (solution.T @ a - target).abs().max().item())
            for k, lf in enumerate(filters):
                paths[(l_in, lf, l_out)] = solution[k].view(c_out, c_in)
    return paths, residual


@lru_cache(maxsize=None)
def path_weight_map(l_in: int, l_out: int) -> tuple:
    """(filters, P, residual): path weights of the pair (l_in, l_out) are ``P @ z`` with
    ``z = (w_0, w_1^r, w_1^i, ..., w_k^r, w_k^i)`` the SO(2) weights of orders 0..k = min(l_in, l_out).

    P (n_f, 2k + 1) float64 is the exact inverse of the (square, invertible) map from path weights to SO(2)
    weights; ``residual`` is the least-squares residual of the fit (zero to rounding)."""
    filters, basis = _path_basis(l_in, l_out)
    k = min(l_in, l_out)
    templates = torch.zeros(2 * k + 1, 2 * l_out + 1, 2 * l_in + 1, dtype=F64)
    templates[0, l_out, l_in] = 1.0
    for m in range(1, k + 1):
        re, im = templates[2 * m - 1], templates[2 * m]
        re[l_out + m, l_in + m] = re[l_out - m, l_in - m] = 1.0
        im[l_out + m, l_in - m], im[l_out - m, l_in + m] = -1.0, 1.0
    a = basis.reshape(len(filters), -1)
    target = templates.reshape(len(templates), -1)
    solution = torch.linalg.lstsq(a.T, target.T).solution                              # (n_f, 2k + 1)
    residual = (solution.T @ a - target).abs().max().item()
    return tuple(filters), solution, residual


def so3_paths(lmax: int, chiral: bool = True) -> list:
    """All paths (l_in, l_f, l_out) with l_in, l_out <= lmax; without ``chiral`` only those with l_in + l_f + l_out
    even (the ones an achiral SO(2) convolution uses; as many weights as the SO(2) convolution has)."""
    return [(l_in, lf, l_out) for l_in in range(lmax + 1) for l_out in range(lmax + 1)
            for lf in range(abs(l_in - l_out), l_in + l_out + 1) if chiral or (l_in + lf + l_out) % 2 == 0]


def edge_path_weights(weights, layout: TruncatedLayout, c_in: int, c_out: int, chiral: bool = True) -> dict:
    """Per-edge path weights ``{(l_in, l_f, l_out): (E, C_out, C_in)}`` of the SO(3) convolution that equals the
    SO(2) convolution with the effective weights ``weights`` (:meth:`SO2Convolution.effective_weights`, E edges).

    Orders above ``layout.mmax`` have zero SO(2) weight. Without ``chiral`` only parity-even paths are returned
    (the odd ones are exactly zero when the imaginary weights are absent)."""
    lmax, mmax = layout.lmax, layout.mmax
    e = weights[0].shape[0]
    blocks = {0: weights[0].view(e, layout.degrees(0), c_out, layout.degrees(0), c_in)}
    for m in range(1, mmax + 1):
        real, imag = weights[m]
        shape = (e, layout.degrees(m), c_out, layout.degrees(m), c_in)
        blocks[m] = (real.view(shape), imag.view(shape) if imag is not None else None)
    if not chiral and any(weights[m][1] is not None for m in range(1, mmax + 1)):
        raise ValueError("chiral=False, but the SO(2) convolution has imaginary weights")
    paths = {}
    for l_in in range(lmax + 1):
        for l_out in range(lmax + 1):
            filters, p, _ = path_weight_map(l_in, l_out)
            k = min(l_in, l_out)
            z = [blocks[0][:, l_out, :, l_in, :]]
            for m in range(1, k + 1):
                if m > mmax:
                    z += [None, None]
                    continue
                real, imag = blocks[m]
                z += [real[:, l_out - m, :, l_in - m, :], imag[:, l_out - m, :, l_in - m, :] if imag is not None
                      else None]
            present = [j for j, t in enumerate(z) if t is not None]
            stacked = torch.stack([z[j] for j in present], 1)                              # (E, n_z, C_out, C_in)
            coefficients = p[:, present].to(stacked.dtype)
            for row, lf in enumerate(filters):
                if chiral or (l_in + lf + l_out) % 2 == 0:
                    paths[(l_in, lf, l_out)] = torch.einsum("z,ezoi->eoi", coefficients[row], stacked)
    return paths


def e3nn_so3_convolution(paths, lmax: int, c_in: int, c_out: int, shared_weights: bool = True):
    """The SO(3) convolution ``x (x) Y(edge)`` as an e3nn TensorProduct with the given path weights.

    ``paths``: dict ``(l_in, l_f, l_out) -> weights`` (C_out, C_in) (``shared_weights``) or (E, C_out, C_in) per
    edge; a list of paths builds the module only (weights then None). Inputs of the module: ``x`` in the e3nn
    layout of ``irreps_x`` (C_in x l, parity (-1)^l), ``Y`` of degrees 0..2 lmax (:func:`spherical_harmonics`), and
    the flat weights. Outputs have parity (-1)^(l_in + l_f) per path (paths with l_in + l_f + l_out odd give
    pseudo-tensors); only output irreps some path reaches are created. The module is built in the default dtype.

    Returns ``(tp, flat_weights, irreps_out)``.
    """
    path_list = list(paths)
    irreps_x = o3.Irreps([(c_in, (l, (-1) ** l)) for l in range(lmax + 1)])
    irreps_sh = o3.Irreps([(1, (l, (-1) ** l)) for l in range(2 * lmax + 1)])
    reached = {(l_out, (-1) ** (l_in + lf)) for l_in, lf, l_out in path_list}
    out_keys = [(l, p) for l in range(lmax + 1) for p in (1, -1) if (l, p) in reached]
    irreps_out = o3.Irreps([(c_out, (l, p)) for l, p in out_keys])
    out_index = {key: k for k, key in enumerate(out_keys)}
    instructions = [(l_in, lf, out_index[(l_out, (-1) ** (l_in + lf))], "uvw", True) for l_in, lf, l_out in path_list]
    tp = o3.TensorProduct(irreps_x, irreps_sh, irreps_out, instructions, irrep_normalization="none",
                          path_normalization="none", internal_weights=False, shared_weights=shared_weights)
    flat = None
    if isinstance(paths, dict):
        # e3nn "uvw" weight layout per path: (u=C_in, v=1, w=C_out)
        flat = torch.cat([w.transpose(-1, -2).reshape(*w.shape[:-2], -1) for w in paths.values()], -1)
    return tp, flat, irreps_out


@lru_cache(maxsize=None)
def _raising_coefficients(l: int) -> torch.Tensor:
    """Wigner 3j (l-1, 1, l) scaled so that ``Y_l = C(Y_(l-1), Y_1)`` keeps |Y_l|^2 = 2l + 1 and Y_l(+y)_(m=0) > 0."""
    c = o3.wigner_3j(l - 1, 1, l, dtype=F64)
    y = torch.tensor([[0.0, 1.0, 0.0]], dtype=F64)
    previous = spherical_harmonics(l - 1, y)[:, (l - 1) ** 2:]
    value = torch.einsum("ijk,ei,ej->ek", c, previous, o3.spherical_harmonics(1, y, True, "component"))[0]
    # the product of degree-(l-1) and degree-1 harmonics projected onto degree l is proportional to Y_l
    return c * (np.sqrt(2 * l + 1) / value[l])


def spherical_harmonics(lmax: int, vec: torch.Tensor) -> torch.Tensor:
    """e3nn real spherical harmonics of degrees 0..lmax (component normalisation, input normalised), any lmax.

    Degrees up to 12 come from e3nn; higher ones by the recursion ``Y_l ~ (Y_(l-1) (x) Y_1)_l`` (e3nn's own
    construction), with the same normalisation and sign convention (``Y_l(+y) = sqrt(2l+1) delta_m0``)."""
    base = min(lmax, E3NN_MAX_SH_DEGREE)
    sh = o3.spherical_harmonics(list(range(base + 1)), vec, normalize=True, normalization="component")
    if lmax <= base:
        return sh
    parts = [sh]
    previous = sh[:, base * base:]
    y1 = sh[:, 1:4]
    for l in range(base + 1, lmax + 1):
        previous = torch.einsum("ijk,ei,ej->ek", _raising_coefficients(l).to(vec.dtype), previous, y1)
        parts.append(previous)
    return torch.cat(parts, 1)


def to_e3nn_layout(x: torch.Tensor) -> torch.Tensor:
    """(E, K, C) l-major coefficients -> e3nn flat (E, sum_l C (2l+1)) with channel-major blocks."""
    lmax = int(np.sqrt(x.shape[1])) - 1
    return torch.cat([x[:, l * l:(l + 1) ** 2].transpose(1, 2).reshape(x.shape[0], -1) for l in range(lmax + 1)], 1)


def from_e3nn_layout(y: torch.Tensor, irreps_out, lmax: int, c_out: int) -> torch.Tensor:
    """Sum both parities per degree, back to (E, K, C)."""
    blocks = {}
    for (mul, ir), sl in zip(irreps_out, irreps_out.slices()):
        part = y[:, sl].view(y.shape[0], mul, ir.dim).transpose(1, 2)
        blocks[ir.l] = blocks.get(ir.l, 0) + part
    return torch.cat([blocks[l] for l in range(lmax + 1)], 1)
