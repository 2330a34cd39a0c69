"""The S^2 quadrature grid and spherical-harmonic layout every model uses.

Convention (e3nn's): real spherical harmonics with ``normalization="component"`` (each ``Y_lm`` has mean square 1
over the sphere, ``Y_00 = 1``), coefficients l-major ((lmax+1)^2 of them), polar axis +y. Grid points are
``(sin b sin a, cos b, sin b cos a)`` with ``n_beta`` Gauss-Legendre nodes in ``cos b`` and ``n_alpha``
equispaced ``a``; the rule integrates exactly every band-limited function of degree ``< 2 n_beta`` in
``cos b`` and ``< n_alpha`` in ``a``, i.e. spherical polynomials of degree ``degree`` when
``(n_beta, n_alpha) = grid_size_for_degree(degree)``.

:class:`SphereGrid` holds dense SH <-> grid matrices (eSCN's pointwise nonlinearities, Gaunt-MACE's messages);
:class:`matkit.nn.gaunt.SphericalGrid` is the factorised fast transform on the same grid.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from e3nn import o3

from .precision import KeepsFloat64
from .sphere_grid_kernels import GridSiLU, cpu_inference

__all__ = ["grid_size_for_degree", "sphere_points", "spherical_harmonics", "degree_of_coefficient", "SphereGrid"]


def grid_size_for_degree(degree: int) -> Tuple[int, int]:
    """(n_beta, n_alpha) of the smallest grid integrating spherical polynomials of ``degree`` exactly:
    ``2 n_beta - 1 >= degree`` and ``n_alpha >= degree + 1``."""
    if not isinstance(degree, (int, np.integer)) or isinstance(degree, bool) or degree < 0:
        raise ValueError(f"degree must be a non-negative integer, got {degree!r}")
    return int(degree) // 2 + 1, int(degree) + 1


def sphere_points(n_beta: int, n_alpha: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grid points (n_beta * n_alpha, 3), beta-major, and quadrature weights (n_beta * n_alpha,) summing to 1
    (so ``weights @ f`` is the mean of f over the sphere); float64."""
    cos_b, w_b = np.polynomial.legendre.leggauss(n_beta)
    alpha = 2 * np.pi * np.arange(n_alpha) / n_alpha
    cos_b_all = np.repeat(cos_b, n_alpha)
    sin_b_all = np.sqrt(1 - cos_b_all ** 2)
    a = np.tile(alpha, n_beta)
    points = np.stack([sin_b_all * np.sin(a), cos_b_all, sin_b_all * np.cos(a)], -1)
    weights = np.repeat(w_b, n_alpha) * (2 * np.pi / n_alpha) / (4 * np.pi)
    return torch.from_numpy(points), torch.from_numpy(weights)


def spherical_harmonics(lmax: int, vectors: torch.Tensor) -> torch.Tensor:
    """e3nn real SH of unit-normalised ``vectors`` (..., 3), component normalisation -> (..., (lmax+1)^2)."""
    return o3.spherical_harmonics(list(range(lmax + 1)), vectors, normalize=True, normalization="component")


def degree_of_coefficient(lmax: int) -> torch.Tensor:
    """(K,) int64: the degree l of each of the ``(lmax+1)^2`` coefficients."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


class SphereGrid(KeepsFloat64):
    """Dense SH <-> grid transforms.

    Parameters
    ----------
    lmax_in : degree of the coefficients sent to the grid.
    lmax_out : degree recovered by :meth:`from_grid` (default ``lmax_in``).
    degree : build the exact grid for spherical polynomials of this degree (``>= lmax_in + lmax_out``; a product
        of functions of degrees L1, L2 projected onto L_out needs ``L1 + L2 + L_out``), or
    resolution : ``(n_beta, n_alpha)`` explicitly (e.g. eSCN's grids, where pointwise nonlinearities alias anyway).
    kept : optional indices of a truncated coefficient set (e.g. ``|m| <= mmax``) used on both sides.

    ``to_grid`` (..., K_in, C) -> (..., P, C) values ``Y(x_p) @ x``; ``from_grid`` (..., P, C) -> (..., K_out, C)
    by quadrature; ``mean`` (..., P, C) -> (..., C). The matrices are float64 masters (kept float64 when the
    module is cast, only moved between devices) and cast to the input's dtype where used.
    """

    _FLOAT64_BUFFERS = ("to_grid64", "from_grid64", "weights64")

    def __init__(self, lmax_in: int, lmax_out: Optional[int] = None, degree: Optional[int] = None,
                 resolution: Optional[Sequence[int]] = None, kept: Optional[torch.Tensor] = None):
        super().__init__()
        lmax_out = lmax_in if lmax_out is None else lmax_out
        if (degree is None) == (resolution is None):
            raise ValueError("give exactly one of degree and resolution")
        if degree is not None and degree < lmax_in + lmax_out:
            raise ValueError(f"grid degree {degree} < lmax_in + lmax_out = {lmax_in + lmax_out}")
        self.lmax_in, self.lmax_out, self.degree = int(lmax_in), int(lmax_out), degree
        self.n_beta, self.n_alpha = grid_size_for_degree(degree) if degree is not None else map(int, resolution)
        points, weights = sphere_points(self.n_beta, self.n_alpha)
        y_in, y_out = spherical_harmonics(self.lmax_in, points), spherical_harmonics(self.lmax_out, points)
        if kept is not None:
            y_in, y_out = y_in[:, kept], y_out[:, kept]
        self.register_buffer("to_grid64", y_in.contiguous(), persistent=False)                       # (P, K_in)
        self.register_buffer("from_grid64", (y_out * weights[:, None]).T.contiguous(), persistent=False)  # (K_out, P)
        self.register_buffer("weights64", weights, persistent=False)                                 # (P,)

    @property
    def num_points(self) -> int:
        return self.n_beta * self.n_alpha

    def to_grid_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """(P, K_in) values of the SH at the grid points."""
        return self.to_grid64 if dtype == torch.float64 else self.to_grid64.to(dtype)

    def from_grid_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """(K_out, P) quadrature projection onto the SH."""
        return self.from_grid64 if dtype == torch.float64 else self.from_grid64.to(dtype)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients (..., K_in, C) -> values (..., P, C)."""
        return torch.matmul(self.to_grid_matrix(x.dtype), x)

    def from_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Values (..., P, C) -> coefficients (..., K_out, C) by quadrature (projection onto the harmonics)."""
        return torch.matmul(self.from_grid_matrix(values.dtype), values)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """``from_grid(silu(to_grid(x)))``: SiLU applied pointwise on the sphere, (..., K_in, C) -> (..., K_out, C).

        At inference (eval mode) on CPU this is one Numba pass that keeps each feature's grid values in cache
        (:mod:`matkit.nn.sphere_grid_kernels`, first-order gradients); in training, or on other devices, torch ops
        (which support the double backward of force training)."""
        if cpu_inference(self, x):
            shape = x.shape
            out = GridSiLU.apply(x.reshape(-1, shape[-2], shape[-1]), self.to_grid_matrix(x.dtype),
                                 self.from_grid_matrix(x.dtype))
            return out.view(*shape[:-2], out.shape[-2], shape[-1])
        return self.from_grid(torch.nn.functional.silu(self.to_grid(x)))

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average over the sphere of values (..., P, C) -> (..., C)."""
        return torch.einsum("p,...pc->...c", self.weights64.to(values.dtype), values)

    def extra_repr(self) -> str:
        return (f"lmax_in={self.lmax_in}, lmax_out={self.lmax_out}, degree={self.degree}, "
                f"grid={self.n_beta}x{self.n_alpha}")
