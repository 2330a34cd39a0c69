"""Gaunt tensor products on e3nn real spherical harmonics (Luo, Chen & Krishnapriyan, ICLR 2024).

Conventions
-----------
* Spherical harmonics are e3nn's real SH with ``normalize=True, normalization="component"``: polar axis y,
  coefficients stored l-major at index ``l*l + l + m``, and ``sum_m Y_lm(r)^2 = 2l + 1`` at every point, so
  ``∫ Y_lm Y_l'm' dΩ = 4π δ``.
* A feature of maximum degree L is a tensor ``x`` of shape ``(..., (L+1)^2)``; it stands for the function
  ``f_x(r) = sum_lm x_lm Y_lm(r)`` on the unit sphere. All leading dimensions are batch dimensions and are
  broadcast between the two inputs, so MACE-style channel-wise products are simply
  ``x1 (N, C, (L1+1)^2) ⊗ x2 (N, C, (L2+1)^2) -> (N, C, (Lout+1)^2)``; a single-channel edge attribute
  ``(N, 1, (L2+1)^2)`` broadcasts over the C channels (the e3nn "uvu" pattern).
* The Gaunt tensor product returns the SH coefficients of the pointwise product, truncated to ``Lout``:

      out_{l3m3} = (1/4π) ∫ f_x1 f_x2 Y_{l3m3} dΩ = (1/4π) sum G[(l1m1),(l2m2),(l3m3)] x1_{l1m1} x2_{l2m2},

  with the Gaunt coefficients ``G = ∫ Y Y Y dΩ`` (component normalisation, :func:`gaunt_coefficients`).
  If ``Lout >= L1 + L2`` then ``f_out = f_x1 f_x2`` exactly. In terms of e3nn's Clebsch-Gordan product,
  ``G_{l1l2l3} = c(l1,l2,l3) * wigner_3j(l1,l2,l3)`` with ``|c| = 4π sqrt((2l1+1)(2l2+1)(2l3+1)) (l1 l2 l3; 0 0 0)``
  (the tests check the constant and its sign independently). Paths with odd ``l1+l2+l3`` vanish.

Two routes compute the same numbers:

* ``method="grid"``: evaluate both functions on a Gauss-Legendre (in cos β) x uniform-α grid, multiply
  pointwise, project back by quadrature. The grid is exact for integrands of degree ``L1+L2+Lout``.
* ``method="fourier"``: write each function of (β, α) as a 2D Fourier series (the SH are trigonometric
  polynomials in both angles once β is extended to [0, 2π)), convolve the two coefficient arrays with a
  zero-padded real FFT (``torch.fft.irfft2``/``rfft2``), and project the product series back to SH with
  exact integrals over β ∈ [0, π].

Both transforms are separable: ``Y_lm(β, α) = P_{b,l}(β) φ_b(α)`` where ``φ_b`` runs over the real
Fourier basis ``[1, cos α, sin α, cos 2α, sin 2α, ...]`` and ``b`` is fixed by ``m``. The factors ``P`` and
the map ``m -> b`` are extracted numerically from e3nn at construction (no hand-typed tables), which makes
every transform O(L^3) per channel instead of O(L^4).

Every conversion matrix is built in float64 at construction, cached, and stored as a buffer (cast to the
input dtype/device on use), so modules work in float32 and float64 on any device and are differentiable.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .sphere_grid import degree_of_coefficient, grid_size_for_degree, spherical_harmonics

__all__ = [
    "gaunt_coefficients",
    "scale_degrees",
    "SphericalGrid",
    "FourierSphere",
    "GauntTensorProduct",
    "GauntPower",
    "gaunt_tensor_product",
]


# --------------------------------------------------------------------------------------------------------
# e3nn sampling and the separable factorisation Y_lm(β, α) = P_{b(m), l}(β) φ_b(α)
# --------------------------------------------------------------------------------------------------------


def _num_sh(lmax: int) -> int:
    return (lmax + 1) ** 2


def _check_degree(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer degree, got {value!r}")
    return int(value)


def _sphere_points(beta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """e3nn's parametrisation x(β, α) = (sin β sin α, cos β, sin β cos α); shape (len(beta), len(alpha), 3)."""
    b, a = torch.meshgrid(beta, alpha, indexing="ij")
    return torch.stack([torch.sin(b) * torch.sin(a), torch.cos(b), torch.sin(b) * torch.cos(a)], dim=-1)


def _real_fourier_basis(kmax: int, alpha: torch.Tensor) -> torch.Tensor:
    """φ_b(α) for b = 0..2kmax: [1, cos α, sin α, ..., cos kmax α, sin kmax α]; shape (2kmax+1, len(alpha))."""
    rows = [torch.ones_like(alpha)]
    for k in range(1, kmax + 1):
        rows += [torch.cos(k * alpha), torch.sin(k * alpha)]
    return torch.stack(rows)


@functools.lru_cache(maxsize=None)
def _sh_alpha_index(lmax: int) -> torch.Tensor:
    """For every SH component (l, m), the index b of the real Fourier function φ_b(α) it is proportional to.

    Found numerically: sample e3nn's SH on a (β, α) grid, Fourier-analyse along α, and check that exactly
    one basis function carries the whole component. Shape ((lmax+1)^2,), int64.
    """
    coeffs = _alpha_coefficients(lmax, torch.linspace(0.1, 3.0, 2 * lmax + 3, dtype=torch.float64))
    weight = coeffs.abs().amax(dim=1)  # ((lmax+1)^2, 2lmax+1)
    index = weight.argmax(dim=1)
    leak = weight.scatter(1, index[:, None], 0.0).amax(dim=1) / weight.amax(dim=1)
    if leak.max() > 1e-10:
        raise RuntimeError("e3nn spherical harmonics are not separable in (β, α); unexpected SH convention")
    return index


def _alpha_coefficients(lmax: int, beta: torch.Tensor) -> torch.Tensor:
    """Coefficients a[lm, β, b] with Y_lm(β, α) = sum_b a[lm, β, b] φ_b(α), exact by a uniform-α DFT.

    Valid for any real β (including β in (π, 2π), where e3nn's formula continues the SH as trigonometric
    polynomials). Shape ((lmax+1)^2, len(beta), 2lmax+1), float64.
    """
    n_alpha = 2 * lmax + 2
    alpha = 2 * math.pi * torch.arange(n_alpha, dtype=torch.float64) / n_alpha
    values = spherical_harmonics(lmax, _sphere_points(beta, alpha))  # (nβ, nα, nlm)
    basis = _real_fourier_basis(lmax, alpha)  # (nb, nα)
    norms = (basis**2).sum(dim=1)  # n_alpha for b = 0, n_alpha / 2 otherwise (exact orthogonality)
    return torch.einsum("gal,ba->lgb", values, basis) / norms


def _legendre_factors(lmax: int, beta: torch.Tensor) -> torch.Tensor:
    """P[b, l, β] with Y_lm(β, α) = P[b(m), l, β] φ_{b(m)}(α); zero where no (l, m) maps to (b, l).

    Shape (2lmax+1, lmax+1, len(beta)), float64.
    """
    coeffs = _alpha_coefficients(lmax, beta)
    b_of_lm = _sh_alpha_index(lmax)
    out = torch.zeros(2 * lmax + 1, lmax + 1, len(beta), dtype=torch.float64)
    for l in range(lmax + 1):
        for lm in range(l * l, (l + 1) ** 2):
            b = int(b_of_lm[lm])
            out[b, l] = coeffs[lm, :, b]
    return out


@functools.lru_cache(maxsize=None)
def _cached_legendre_factors(lmax: int, nodes: str, n: int) -> torch.Tensor:
    """:func:`_legendre_factors` at ``n`` Gauss-Legendre polar angles (``nodes="gauss"``) or at ``n`` uniform
    torus angles 2πj/n (``nodes="torus"``). Cached: callers copy before modifying or registering it."""
    if nodes == "gauss":
        beta = _gauss_legendre_beta(n)[0]
    else:
        beta = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    return _legendre_factors(lmax, beta)


@functools.lru_cache(maxsize=None)
def _padded_layout(lmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps between the l-major layout (lm) and the padded (b, l) layout used by the transforms.

    Returns ``gather`` of shape (2lmax+1, lmax+1): the lm index feeding slot (b, l), or 0 for empty slots
    (their factor P is zero, so the value read there never contributes); and ``scatter`` of shape
    ((lmax+1)^2,): the flat slot b*(lmax+1) + l holding component lm.
    """
    b_of_lm = _sh_alpha_index(lmax)
    gather = torch.zeros(2 * lmax + 1, lmax + 1, dtype=torch.long)
    scatter = torch.zeros(_num_sh(lmax), dtype=torch.long)
    for l in range(lmax + 1):
        for lm in range(l * l, (l + 1) ** 2):
            b = int(b_of_lm[lm])
            gather[b, l] = lm
            scatter[lm] = b * (lmax + 1) + l
    return gather, scatter


def scale_degrees(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply every degree-l block of ``x`` (..., (L+1)^2) by ``weights[..., l]`` (..., L+1).

    Leading dimensions broadcast, so weights of shape (L+1,), (C, L+1) or (N, C, L+1) all work. This is the
    per-degree reparametrisation of the paper: it keeps a Gaunt product a Gaunt product.
    """
    lmax = int(round(math.sqrt(x.shape[-1]))) - 1
    if _num_sh(lmax) != x.shape[-1]:
        raise ValueError(f"last dimension of x must be (L+1)^2, got {x.shape[-1]}")
    if weights.shape[-1] != lmax + 1:
        raise ValueError(f"weights must have L+1 = {lmax + 1} entries in the last dimension, got {weights.shape}")
    return x * weights[..., degree_of_coefficient(lmax).to(weights.device)]


# --------------------------------------------------------------------------------------------------------
# Gaunt coefficients
# --------------------------------------------------------------------------------------------------------


def _gauss_legendre_beta(n_beta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar angles β_i = arccos(t_i) at the Gauss-Legendre nodes t_i and weights (sum 2); float64."""
    t, w = np.polynomial.legendre.leggauss(n_beta)
    return torch.from_numpy(np.arccos(t)), torch.from_numpy(w)


@functools.lru_cache(maxsize=None)
def _gaunt_coefficients_cached(l1: int, l2: int, l3: int) -> torch.Tensor:
    n_beta, n_alpha = grid_size_for_degree(l1 + l2 + l3)
    beta, w_beta = _gauss_legendre_beta(n_beta)
    alpha = 2 * math.pi * torch.arange(n_alpha, dtype=torch.float64) / n_alpha
    weights = (w_beta[:, None] * (2 * math.pi / n_alpha)).expand(n_beta, n_alpha).reshape(-1)
    y = spherical_harmonics(max(l1, l2, l3), _sphere_points(beta, alpha)).reshape(n_beta * n_alpha, -1)
    y1, y2, y3 = y[:, : _num_sh(l1)], y[:, : _num_sh(l2)], y[:, : _num_sh(l3)]
    return torch.einsum("g,gi,gj,gk->ijk", weights, y1, y2, y3)


def gaunt_coefficients(lmax1: int, lmax2: int, lmax3: int) -> torch.Tensor:
    """Gaunt coefficients G[(l1m1), (l2m2), (l3m3)] = ∫ Y_l1m1 Y_l2m2 Y_l3m3 dΩ for all degrees up to the maxima.

    e3nn real SH with component normalisation; computed by exact Gauss-Legendre x uniform quadrature and
    cached. Shape ((lmax1+1)^2, (lmax2+1)^2, (lmax3+1)^2), float64 on CPU (a fresh copy each call).
    """
    degrees = [_check_degree(n, v) for n, v in (("lmax1", lmax1), ("lmax2", lmax2), ("lmax3", lmax3))]
    return _gaunt_coefficients_cached(*degrees).clone()


# --------------------------------------------------------------------------------------------------------
# Shared machinery: float64 buffers cast on use, features-first layout
# --------------------------------------------------------------------------------------------------------
#
# Internally a feature batch is kept "features-first": x_t of shape ((L+1)^2, *batch). All transforms are
# then plain (batched) matrix products with the large batch as the contiguous last dimension, and grids or
# Fourier arrays of shape (n1, n2, *batch) broadcast over batch dimensions exactly like the inputs do.


class _Transform(torch.nn.Module):
    """Base class: buffers are stored once and cast to the input's dtype/device on use."""

    def _buf(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = getattr(self, name)
        real_dtype = like.real.dtype if like.is_complex() else like.dtype
        return buf.to(device=like.device, dtype=real_dtype)

    def _cbuf(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Complex buffer stored as a real (..., 2) tensor."""
        return torch.view_as_complex(self._buf(name, like))


def _features_first(x: torch.Tensor, lmax: int, name: str) -> torch.Tensor:
    """Validate x (..., (lmax+1)^2) and return the view ((lmax+1)^2, ...)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] != _num_sh(lmax):
        raise ValueError(f"{name} must have last dimension (L+1)^2 = {_num_sh(lmax)} for L = {lmax}, "
                         f"got {tuple(x.shape)}")
    return x.movedim(-1, 0)


def _features_last(x_t: torch.Tensor) -> torch.Tensor:
    """((L+1)^2, ...) -> contiguous (..., (L+1)^2)."""
    return x_t.movedim(0, -1).contiguous()


def _gather_padded(x_t: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """Features-first ((L+1)^2, *batch) -> padded (2L+1, L+1, M) with M = prod(batch), contiguous."""
    return x_t[gather.reshape(-1)].reshape(*gather.shape, -1)


def _scatter_padded(padded: torch.Tensor, scatter: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """Padded (2L+1, L+1, M) -> features-first ((L+1)^2, *batch)."""
    return padded.reshape(-1, padded.shape[-1])[scatter].reshape(-1, *batch)


def _align_batch(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend singleton batch dimensions so that features-first views broadcast like the inputs."""
    nd = max(x1.dim(), x2.dim())
    return x1.reshape((1,) * (nd - x1.dim()) + x1.shape), x2.reshape((1,) * (nd - x2.dim()) + x2.shape)


# --------------------------------------------------------------------------------------------------------
# Route (a): Gauss-Legendre x uniform spherical grid
# --------------------------------------------------------------------------------------------------------


class SphericalGrid(_Transform):
    """Exact SH <-> grid transforms on a Gauss-Legendre (in cos β) x uniform-α grid.

    Args:
        lmax_in: largest degree of features sent to the grid (``to_grid``).
        lmax_out: largest degree recovered by ``from_grid``.
        degree: polynomial degree the quadrature must integrate exactly. To project a product of
            functions of total degree D onto degree ``lmax_out``, use ``degree = D + lmax_out`` (default:
            ``2 * lmax_in + lmax_out``, the binary product).

    Public maps: ``to_grid(x (..., (lmax_in+1)^2)) -> (..., n_beta, n_alpha)`` (values f(β_i, α_j)) and
    ``from_grid((..., n_beta, n_alpha)) -> (..., (lmax_out+1)^2)``. For chained work (products, powers)
    use the features-first pair ``to_grid_t(((lmax_in+1)^2, *batch)) -> (n_alpha, n_beta, *batch)`` and
    ``from_grid_t`` (inverse layout), which avoid transposes; grids broadcast over batch dimensions.
    Both maps are linear and cost O(L^3) per feature; ``from_grid(to_grid(x))`` returns ``x`` truncated
    to ``lmax_out`` whenever the grid is exact.
    """

    def __init__(self, lmax_in: int, lmax_out: int, degree: int | None = None):
        super().__init__()
        self.lmax_in = _check_degree("lmax_in", lmax_in)
        self.lmax_out = _check_degree("lmax_out", lmax_out)
        degree = 2 * self.lmax_in + self.lmax_out if degree is None else _check_degree("degree", degree)
        if degree < self.lmax_in + self.lmax_out:
            raise ValueError(f"degree {degree} is too small to project degree {lmax_in} onto degree {lmax_out}")
        self.degree = degree
        self.n_beta, self.n_alpha = grid_size_for_degree(degree)
        w_beta = _gauss_legendre_beta(self.n_beta)[1]
        alpha = 2 * math.pi * torch.arange(self.n_alpha, dtype=torch.float64) / self.n_alpha

        # to_grid: padded (b, l, M) --P_in--> (b, β, M) --phi_in--> (α, β, M)
        p_in = _cached_legendre_factors(self.lmax_in, "gauss", self.n_beta).transpose(1, 2)
        self.register_buffer("p_in", p_in.clone(memory_format=torch.contiguous_format))  # (b, β, l)
        self.register_buffer("phi_in", _real_fourier_basis(self.lmax_in, alpha).t().contiguous())  # (α, b)
        self.register_buffer("gather_in", _padded_layout(self.lmax_in)[0], persistent=False)

        # from_grid: (α, β, M) --phi_out (with α weights)--> (b, β, M) --P_out (β weights / 4π)--> (b, l, M)
        p_out = _cached_legendre_factors(self.lmax_out, "gauss", self.n_beta) * w_beta / (4 * math.pi)
        self.register_buffer("p_out", p_out.contiguous())  # (b, l, β)
        self.register_buffer("phi_out", _real_fourier_basis(self.lmax_out, alpha) * (2 * math.pi / self.n_alpha))
        self.register_buffer("scatter_out", _padded_layout(self.lmax_out)[1], persistent=False)

    def extra_repr(self) -> str:
        return (f"lmax_in={self.lmax_in}, lmax_out={self.lmax_out}, degree={self.degree}, "
                f"grid=({self.n_beta}, {self.n_alpha})")

    def to_grid_t(self, x_t: torch.Tensor) -> torch.Tensor:
        """Features-first ((lmax_in+1)^2, *batch) -> grid values (n_alpha, n_beta, *batch)."""
        batch = x_t.shape[1:]
        padded = _gather_padded(x_t, self.gather_in)  # (b, l, M)
        h = torch.bmm(self._buf("p_in", x_t), padded)  # (b, β, M)
        grid = self._buf("phi_in", x_t) @ h.reshape(h.shape[0], -1)  # (α, β*M)
        return grid.reshape(self.n_alpha, self.n_beta, *batch)

    def from_grid_t(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid values (n_alpha, n_beta, *batch) -> features-first ((lmax_out+1)^2, *batch)."""
        batch = grid.shape[2:]
        h = self._buf("phi_out", grid) @ grid.reshape(self.n_alpha, -1)  # (b, β*M)
        padded = torch.bmm(self._buf("p_out", grid), h.reshape(h.shape[0], self.n_beta, -1))  # (b, l, M)
        return _scatter_padded(padded, self.scatter_out, batch)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Features (..., (lmax_in+1)^2) -> grid values f(β_i, α_j) of shape (..., n_beta, n_alpha)."""
        grid = self.to_grid_t(_features_first(x, self.lmax_in, "x"))
        return grid.movedim((0, 1), (-1, -2)).contiguous()

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid values (..., n_beta, n_alpha) -> SH coefficients (..., (lmax_out+1)^2) by exact quadrature."""
        if grid.dim() < 2 or grid.shape[-2:] != (self.n_beta, self.n_alpha):
            raise ValueError(f"grid must end with ({self.n_beta}, {self.n_alpha}), got {tuple(grid.shape)}")
        return _features_last(self.from_grid_t(grid.movedim((-1, -2), (0, 1))))

    def points(self) -> torch.Tensor:
        """Grid points on the unit sphere, shape (n_beta, n_alpha, 3), float64."""
        beta, _ = _gauss_legendre_beta(self.n_beta)
        alpha = 2 * math.pi * torch.arange(self.n_alpha, dtype=torch.float64) / self.n_alpha
        return _sphere_points(beta, alpha)


# --------------------------------------------------------------------------------------------------------
# Route (b): 2D Fourier series in (β, α) and convolution
# --------------------------------------------------------------------------------------------------------


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast sizes for pocketfft/cuFFT)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _half_line_integrals(n: torch.Tensor) -> torch.Tensor:
    """I(n) = ∫_0^π e^{i n β} sin β dβ for integer n, complex128 (from ∫_0^π e^{ikβ} dβ = π or i(1-(-1)^k)/k)."""

    def j(k: torch.Tensor) -> torch.Tensor:
        kf = k.to(torch.float64)
        odd = (k % 2 != 0).to(torch.float64)
        safe = torch.where(k == 0, torch.ones_like(kf), kf)
        return torch.where(k == 0, torch.full_like(kf, math.pi) + 0j, 1j * 2 * odd / safe)

    return (j(n + 1) - j(n - 1)) / 2j


def _complex_buffer(z: torch.Tensor) -> torch.Tensor:
    """Complex tensor -> real tensor (..., 2), so module.to(dtype) casts it safely."""
    return torch.view_as_real(z.to(torch.complex128)).contiguous()


class FourierSphere(_Transform):
    """SH <-> 2D Fourier series of f(β, α) on the torus (β continued to [0, 2π)), and their product.

    Each SH is a trigonometric polynomial of degree <= l in β and in α once e3nn's Cartesian formula is
    evaluated at x(β, α) for all real β, so a degree-L feature is exactly a (2L+1) x (2L+1) Fourier array and
    the product of two features is the 2D convolution of their arrays. Fourier arrays are half spectra in
    features-first layout: ``F[v, u, *batch]`` is the coefficient of ``exp(i(uβ + vα))`` for ``v = 0..L``
    and ``u = -L..L`` (stored at ``u + L``); negative ``v`` follow from ``F[-v, -u] = conj(F[v, u])``.

    The convolution uses the convolution theorem: both series are sampled on an (n_v x n_u) torus grid,
    multiplied, and transformed back. ``backend="fft"`` does the transforms with ``torch.fft.irfftn``/
    ``rfftn`` (O(n log n)); ``backend="dft"`` does them as dense DFT matrix products (O(n^2) but a handful of
    large GEMMs). The grids are alias-free: all |u| <= L1+L2 are kept (the projection back to SH is dense in
    u because e^{iuβ} is not orthogonal under sin β dβ on [0, π]), and only |v| <= Lout is read, so n_v > L1+L2+Lout
    (for ``"fft"`` also n_v > 2 max(L1, L2, Lout), so every half spectrum fits below the Nyquist bin).

    Args:
        lmax1, lmax2: degrees of the two factors; lmax_out: degree of the projected product.
        backend: "dft" (default, several times faster on CPU for L <= 8; see benchmarks/tensor_products.py)
            or "fft".
    """

    def __init__(self, lmax1: int, lmax2: int, lmax_out: int, backend: str = "dft"):
        super().__init__()
        if backend not in ("dft", "fft"):
            raise ValueError(f"backend must be 'dft' or 'fft', got {backend!r}")
        self.backend = backend
        self.lmax1 = _check_degree("lmax1", lmax1)
        self.lmax2 = _check_degree("lmax2", lmax2)
        self.lmax_out = _check_degree("lmax_out", lmax_out)
        self.lmax_prod = self.lmax1 + self.lmax2
        self.n_u = 2 * self.lmax_prod + 1
        self.n_v = self.lmax_prod + self.lmax_out + 1
        if backend == "fft":
            # The real FFTs keep only v = 0..n_v//2 of the α axis, so that half spectrum must hold every factor
            # (v <= L1, L2) and the output (v <= Lout) strictly below the Nyquist bin: n_v >= 2 max(...) + 1.
            # This only matters for unequal degrees (L1 > L2 + Lout or Lout > L1 + L2); n_u > 2 max(L1, L2).
            self.n_u = _fft_size(self.n_u)
            self.n_v = _fft_size(max(self.n_v, 2 * max(self.lmax1, self.lmax2, self.lmax_out) + 1))
        for i, lmax in ((1, self.lmax1), (2, self.lmax2)):
            p, e = self._sh_to_fourier_factors(lmax)
            self.register_buffer(f"p_sh2f_{i}", p)  # (b, u, l, 2): β factor
            self.register_buffer(f"e_sh2f_{i}", e)  # (v, b, 2): α factor
            self.register_buffer(f"gather_{i}", _padded_layout(lmax)[0], persistent=False)
            if backend == "dft":
                inv_u, inv_v = self._inverse_dft(lmax)
                self.register_buffer(f"inv_u_{i}", inv_u)  # (n_u, 2L+1, 2)
                self.register_buffer(f"inv_v_{i}", inv_v)  # (n_v, 2(L+1)) real
        q, e = self._fourier_to_sh_factors(self.lmax_out, self.lmax_prod)
        self.register_buffer("q_f2sh", q)  # (b, l, u, 2)
        self.register_buffer("e_f2sh", e)  # (b, v, 2)
        self.register_buffer("scatter_out", _padded_layout(self.lmax_out)[1], persistent=False)
        if backend == "dft":
            fwd_v, fwd_u = self._forward_dft()
            self.register_buffer("fwd_v", fwd_v)  # (2(Lout+1), n_v) real
            self.register_buffer("fwd_u", fwd_u)  # (2(L1+L2)+1, n_u, 2)
        u = torch.arange(-self.lmax_prod, self.lmax_prod + 1)
        self.register_buffer("u_unwrap", u % self.n_u, persistent=False)

    def extra_repr(self) -> str:
        return (f"lmax1={self.lmax1}, lmax2={self.lmax2}, lmax_out={self.lmax_out}, backend={self.backend!r}, "
                f"torus=({self.n_v}, {self.n_u})")

    # ---- construction of the conversion matrices (all numerical, from e3nn samples) ----

    @staticmethod
    def _torus_beta(lmax: int) -> torch.Tensor:
        n = 2 * lmax + 2
        return 2 * math.pi * torch.arange(n, dtype=torch.float64) / n

    @classmethod
    def _beta_fourier(cls, lmax: int) -> torch.Tensor:
        """p[b, l, u] with P_{b,l}(β) = sum_u p[b,l,u] e^{iuβ}, u = -lmax..lmax; from an exact FFT of samples."""
        n = len(cls._torus_beta(lmax))
        spectrum = torch.fft.fft(_cached_legendre_factors(lmax, "torus", n), dim=-1) / n
        u = torch.arange(-lmax, lmax + 1)
        return spectrum[..., u % n]

    @staticmethod
    def _alpha_fourier(lmax: int, v: torch.Tensor) -> torch.Tensor:
        """E[b, v] with φ_b(α) = sum_v E[b, v] e^{ivα}; exact FFT of samples; shape (2lmax+1, len(v))."""
        n = 2 * lmax + 2
        alpha = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
        spectrum = torch.fft.fft(_real_fourier_basis(lmax, alpha).to(torch.complex128), dim=-1) / n
        return spectrum[:, v % n]

    @classmethod
    def _sh_to_fourier_factors(cls, lmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = cls._beta_fourier(lmax).transpose(1, 2)  # (b, u, l)
        e = cls._alpha_fourier(lmax, torch.arange(lmax + 1)).t()  # (v >= 0, b)
        return _complex_buffer(p), _complex_buffer(e)

    @classmethod
    def _fourier_to_sh_factors(cls, lmax_out: int, lmax_prod: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Projection c_lm = (1/4π) ∫ F Y_lm dΩ = Re sum_{v>=0,u} F[v,u] w_v (2π E[b,-v]) Q[b,l,u].

        Q[b,l,u] = (1/4π) ∫_0^π e^{iuβ} P_{b,l}(β) sin β dβ, exact from the Fourier series of P and I(n);
        w_v = 1 for v = 0 and 2 for v > 0 (the v < 0 half is the complex conjugate).
        """
        p = cls._beta_fourier(lmax_out)  # (b, l, u'), u' = -lmax_out..lmax_out
        u = torch.arange(-lmax_prod, lmax_prod + 1)
        u_in = torch.arange(-lmax_out, lmax_out + 1)
        integrals = _half_line_integrals(u[:, None] + u_in[None, :])  # (u, u')
        q = torch.einsum("blk,uk->blu", p, integrals) / (4 * math.pi)
        v = torch.arange(lmax_out + 1)
        w_v = torch.where(v == 0, 1.0, 2.0).to(torch.float64)
        e = cls._alpha_fourier(lmax_out, -v) * (2 * math.pi) * w_v  # (b, v)
        return _complex_buffer(q), _complex_buffer(e)

    def _torus_angles(self) -> tuple[torch.Tensor, torch.Tensor]:
        beta = 2 * math.pi * torch.arange(self.n_u, dtype=torch.float64) / self.n_u
        alpha = 2 * math.pi * torch.arange(self.n_v, dtype=torch.float64) / self.n_v
        return beta, alpha

    def _inverse_dft(self, lmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Matrices sampling a half spectrum on the torus: e^{iuβ_j} (n_u, 2L+1) and [w cos vα, -w sin vα]."""
        beta, alpha = self._torus_angles()
        u = torch.arange(-lmax, lmax + 1, dtype=torch.float64)
        v = torch.arange(lmax + 1, dtype=torch.float64)
        w_v = torch.where(v == 0, 1.0, 2.0)
        inv_u = torch.exp(1j * beta[:, None] * u[None, :])
        inv_v = torch.cat([w_v * torch.cos(alpha[:, None] * v), -w_v * torch.sin(alpha[:, None] * v)], dim=1)
        return _complex_buffer(inv_u), inv_v

    def _forward_dft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Matrices taking torus samples to the half spectrum v = 0..Lout, u = -(L1+L2)..(L1+L2)."""
        beta, alpha = self._torus_angles()
        v = torch.arange(self.lmax_out + 1, dtype=torch.float64)
        u = torch.arange(-self.lmax_prod, self.lmax_prod + 1, dtype=torch.float64)
        fwd_v = torch.cat([torch.cos(v[:, None] * alpha), -torch.sin(v[:, None] * alpha)]) / self.n_v
        fwd_u = torch.exp(-1j * u[:, None] * beta[None, :]) / self.n_u
        return fwd_v, _complex_buffer(fwd_u)

    # ---- the maps ----

    def sh_to_fourier_t(self, x_t: torch.Tensor, which: int = 1) -> torch.Tensor:
        """Features-first ((L+1)^2, *batch) of factor ``which`` (1 or 2) -> half spectrum (L+1, 2L+1, *batch)."""
        batch = x_t.shape[1:]
        padded = _gather_padded(x_t, getattr(self, f"gather_{which}"))  # (b, l, M) real
        p = self._cbuf(f"p_sh2f_{which}", x_t)  # (b, u, l)
        h = torch.bmm(p, padded.to(p.dtype))  # (b, u, M)
        e = self._cbuf(f"e_sh2f_{which}", x_t)  # (v, b)
        return (e @ h.reshape(h.shape[0], -1)).reshape(e.shape[0], h.shape[1], *batch)

    def fourier_to_sh_t(self, f: torch.Tensor) -> torch.Tensor:
        """Half spectrum of a product (Lout+1, 2(L1+L2)+1, *batch) -> features-first ((Lout+1)^2, *batch)."""
        batch = f.shape[2:]
        e = self._cbuf("e_f2sh", f)  # (b, v)
        h = (e @ f.reshape(f.shape[0], -1)).reshape(e.shape[0], f.shape[1], -1)  # (b, u, M)
        padded = torch.bmm(self._cbuf("q_f2sh", f), h).real  # (b, l, M)
        return _scatter_padded(padded, self.scatter_out, batch)

    def to_torus(self, f: torch.Tensor, which: int = 1) -> torch.Tensor:
        """Half spectrum (L+1, 2L+1, *batch) -> real samples f(β_j, α_k) of shape (n_v, n_u, *batch)."""
        if self.backend == "fft":
            return self._to_torus_fft(f)
        batch = f.shape[2:]
        g = self._cbuf(f"inv_u_{which}", f) @ f.reshape(*f.shape[:2], -1)  # (v, n_u, M): sum over u
        g = torch.cat([g.real, g.imag]).reshape(2 * f.shape[0], -1)  # (2(L+1), n_u*M)
        return (self._buf(f"inv_v_{which}", f) @ g).reshape(self.n_v, self.n_u, *batch)

    def from_torus(self, g: torch.Tensor) -> torch.Tensor:
        """Real torus samples (n_v, n_u, *batch) -> product half spectrum (Lout+1, 2(L1+L2)+1, *batch)."""
        if self.backend == "fft":
            prod = torch.fft.rfftn(g, dim=(1, 0), norm="forward")  # (n_v//2+1, n_u, *batch)
            return prod[: self.lmax_out + 1].index_select(1, self.u_unwrap)
        batch = g.shape[2:]
        t = (self._buf("fwd_v", g) @ g.reshape(self.n_v, -1)).reshape(2, self.lmax_out + 1, self.n_u, -1)
        t = torch.complex(t[0], t[1])  # (v, n_u, M)
        return (self._cbuf("fwd_u", t) @ t).reshape(self.lmax_out + 1, -1, *batch)

    def multiply(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """2D convolution of two half spectra (factor 1 and factor 2), truncated to v <= Lout.

        Shapes: (L1+1, 2L1+1, *batch1), (L2+1, 2L2+1, *batch2) -> (Lout+1, 2(L1+L2)+1, *batch).
        """
        return self.from_torus(self.to_torus(f1, 1) * self.to_torus(f2, 2))

    def _to_torus_fft(self, f: torch.Tensor) -> torch.Tensor:
        lv, lu = f.shape[0], (f.shape[1] - 1) // 2
        padded = f.new_zeros(self.n_v // 2 + 1, self.n_u, *f.shape[2:])
        padded[:lv, : lu + 1] = f[:, lu:]
        if lu > 0:
            padded[:lv, self.n_u - lu :] = f[:, :lu]
        # norm="forward": the inverse transform is the plain sum, so samples equal the series values.
        return torch.fft.irfftn(padded, s=(self.n_u, self.n_v), dim=(1, 0), norm="forward")


# --------------------------------------------------------------------------------------------------------
# Public modules
# --------------------------------------------------------------------------------------------------------


class GauntTensorProduct(torch.nn.Module):
    """Gaunt tensor product of two SH features, ``out = SH_{<=Lout}(f_x1 * f_x2)`` (see module docstring).

    Args:
        lmax1, lmax2: maximum degrees of the inputs; lmax_out: maximum degree of the output.
        method: ``"grid"`` (Gauss-Legendre sphere grid, real arithmetic; the fastest route) or
            ``"fourier"`` (2D Fourier series with convolution, Luo et al. 2024).
        channels: if given, learnable per-channel, per-degree input weights ``weight1`` (channels, L1+1)
            and ``weight2`` (channels, L2+1), initialised to one, scale the inputs before the product
            (the paper's reparametrisation); the channel axis is then the second-to-last input axis.
        fourier_backend: "dft" or "fft", see :class:`FourierSphere` (only for ``method="fourier"``).

    Shapes: ``forward(x1 (..., (L1+1)^2), x2 (..., (L2+1)^2)) -> (..., (Lout+1)^2)``. Leading dimensions
    broadcast, e.g. x1 (N, C, ·) with x2 (N, 1, ·): the single-channel factor is transformed only once per
    edge. Optional ``weight1``/``weight2`` arguments to ``forward`` (broadcastable to (..., L+1), e.g.
    per-element weights gathered per node) multiply on top of the module's own weights.
    """

    def __init__(
        self,
        lmax1: int,
        lmax2: int,
        lmax_out: int,
        method: str = "grid",
        channels: int | None = None,
        fourier_backend: str = "dft",
    ):
        super().__init__()
        if method not in ("grid", "fourier"):
            raise ValueError(f"method must be 'grid' or 'fourier', got {method!r}")
        self.lmax1 = _check_degree("lmax1", lmax1)
        self.lmax2 = _check_degree("lmax2", lmax2)
        self.lmax_out = _check_degree("lmax_out", lmax_out)
        self.method = method
        degree = self.lmax1 + self.lmax2 + self.lmax_out
        if method == "grid":
            self.grid1 = SphericalGrid(self.lmax1, self.lmax_out, degree)
            self.grid2 = self.grid1 if self.lmax2 == self.lmax1 else SphericalGrid(self.lmax2, self.lmax_out, degree)
        else:
            self.fourier = FourierSphere(self.lmax1, self.lmax2, self.lmax_out, backend=fourier_backend)
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
        self.channels = channels
        if channels is not None:
            self.weight1 = torch.nn.Parameter(torch.ones(channels, self.lmax1 + 1))
            self.weight2 = torch.nn.Parameter(torch.ones(channels, self.lmax2 + 1))

    def extra_repr(self) -> str:
        return (f"lmax1={self.lmax1}, lmax2={self.lmax2}, lmax_out={self.lmax_out}, method={self.method!r}, "
                f"channels={self.channels}")

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        weight1: torch.Tensor | None = None,
        weight2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x1 = self._weighted(x1, self.lmax1, "x1", getattr(self, "weight1", None), weight1)
        x2 = self._weighted(x2, self.lmax2, "x2", getattr(self, "weight2", None), weight2)
        if x1.dtype != x2.dtype or x1.device != x2.device:
            raise TypeError(f"x1 and x2 must share dtype and device, got {x1.dtype}/{x1.device} and "
                            f"{x2.dtype}/{x2.device}")
        x1, x2 = _align_batch(x1, x2)
        x1_t = _features_first(x1, self.lmax1, "x1")
        x2_t = _features_first(x2, self.lmax2, "x2")
        if self.method == "grid":
            product = self.grid1.to_grid_t(x1_t) * self.grid2.to_grid_t(x2_t)
            out_t = self.grid1.from_grid_t(product)
        else:
            f1 = self.fourier.sh_to_fourier_t(x1_t, 1)
            f2 = self.fourier.sh_to_fourier_t(x2_t, 2)
            out_t = self.fourier.fourier_to_sh_t(self.fourier.multiply(f1, f2))
        return _features_last(out_t)

    def _weighted(self, x, lmax, name, own, extra):
        _features_first(x, lmax, name)  # validates
        if own is not None:
            if x.dim() < 2 or x.shape[-2] not in (1, self.channels):
                raise ValueError(f"{name} must have shape (..., {self.channels}, {_num_sh(lmax)}) or (..., 1, "
                                 f"{_num_sh(lmax)}) (one channel shared by all), got {tuple(x.shape)}")
            if x.shape[-2] == 1:  # e.g. edge spherical harmonics, the same for every channel
                x = x.expand(*x.shape[:-2], self.channels, x.shape[-1])
            x = scale_degrees(x, own.to(x.dtype))
        if extra is not None:
            x = scale_degrees(x, extra.to(x.dtype))
        return x


def gaunt_tensor_product(x1: torch.Tensor, x2: torch.Tensor, lmax_out: int, method: str = "grid") -> torch.Tensor:
    """Functional Gaunt product ``SH_{<=lmax_out}(f_x1 f_x2)``; the module is built once per degrees and cached."""
    l1 = int(round(math.sqrt(x1.shape[-1]))) - 1
    l2 = int(round(math.sqrt(x2.shape[-1]))) - 1
    return _cached_product(l1, l2, _check_degree("lmax_out", lmax_out), method)(x1, x2)


@functools.lru_cache(maxsize=64)
def _cached_product(l1: int, l2: int, lout: int, method: str) -> GauntTensorProduct:
    return GauntTensorProduct(l1, l2, lout, method)


class GauntPower(torch.nn.Module):
    """Powers of one SH feature on the sphere grid: ``[SH_{<=Lout}(f_x^ν) for ν = 1..correlation]``.

    This is MACE-Gaunt's many-body basis: every channel's function is sent to the grid once, the powers are
    formed pointwise (``f, f^2, f^3, ...``) and each is projected back. The grid integrates degree
    ``correlation * lmax_in + lmax_out`` exactly, so every power equals the iterated Gaunt product without
    intermediate truncation.

    Shapes: ``forward(x (..., (lmax_in+1)^2)) -> (..., correlation, (lmax_out+1)^2)``. Combine the powers
    with per-(element, ν, channel, l) weights through :func:`scale_degrees` and a sum over ν, e.g.
    ``B = scale_degrees(powers, w[species]).sum(-2)`` with ``w`` of shape (n_elements, C, correlation, Lout+1)
    after moving the channel axis: powers (N, C, ν, ·) and ``w[species]`` (N, C, ν, Lout+1).
    """

    def __init__(self, lmax_in: int, lmax_out: int, correlation: int):
        super().__init__()
        if not isinstance(correlation, int) or correlation < 1:
            raise ValueError(f"correlation must be a positive integer, got {correlation!r}")
        self.correlation = correlation
        self.lmax_in = _check_degree("lmax_in", lmax_in)
        self.lmax_out = _check_degree("lmax_out", lmax_out)
        self.grid = SphericalGrid(self.lmax_in, self.lmax_out, correlation * self.lmax_in + self.lmax_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid.to_grid_t(_features_first(x, self.lmax_in, "x"))
        power = g
        outs = [self.grid.from_grid_t(power)]
        for _ in range(self.correlation - 1):
            power = power * g
            outs.append(self.grid.from_grid_t(power))
        return torch.stack(outs, dim=-1).movedim(0, -1).contiguous()  # (..., ν, nlm_out)
