"""Tests of matkit.nn.gaunt: Gaunt tensor products on e3nn real spherical harmonics (component normalisation).

Independent reference: the Clebsch-Gordan tensor product built from ``e3nn.o3.wigner_3j(l1, l2, l3)``, summed over
all paths with the Gaunt path weight ``c(l1, l2, l3)``, ``∫ Y_l1 Y_l2 Y_l3 dΩ = c * wigner_3j``. The weight is
computed without matkit: its magnitude from the closed form ``4π sqrt((2l1+1)(2l2+1)(2l3+1)) |(l1 l2 l3; 0 0 0)|``
(sympy's exact 3j symbol) and its sign by projecting a Lebedev quadrature (scipy) of e3nn's own spherical
harmonics onto the 3j tensor; the quadrature must also reproduce the magnitude to 1e-11.
"""
import functools
import math
import time

import pytest
import torch
from e3nn import o3
from scipy.integrate import lebedev_rule
from sympy.physics.wigner import wigner_3j as sympy_wigner_3j

import matkit.nn.gaunt as gaunt_module
from matkit.nn.gaunt import (FourierSphere, GauntPower, GauntTensorProduct, SphericalGrid, gaunt_coefficients,
                             gaunt_tensor_product)

F64 = torch.float64
# (method, fourier backend): the grid route and both backends of the Fourier route
ROUTES = [("grid", "dft"), ("fourier", "dft"), ("fourier", "fft")]
ROUTE_IDS = ["grid", "fourier-dft", "fourier-fft"]
REL_TOL = 1e-10  # float64 agreement, relative to max|out| (the issue asks for 1e-6)


def _sh(lmax, points):
    return o3.spherical_harmonics(list(range(lmax + 1)), points, normalize=True, normalization="component")


def _block(l):
    return slice(l * l, (l + 1) ** 2)


# ---- independent reference ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _lebedev(order=31):
    points, weights = lebedev_rule(order)  # exact for spherical polynomials of degree <= order; weights sum to 4π
    return torch.from_numpy(points.T.copy()), torch.from_numpy(weights)


@functools.lru_cache(maxsize=None)
def _w3j(l1, l2, l3):
    return o3.wigner_3j(l1, l2, l3, dtype=F64)


@functools.lru_cache(maxsize=None)
def gaunt_path_weight(l1, l2, l3):
    """c with ∫ Y_l1m1 Y_l2m2 Y_l3m3 dΩ = c * wigner_3j(l1, l2, l3)[m1, m2, m3] (component-normalised SH)."""
    if (l1 + l2 + l3) % 2 or not abs(l1 - l2) <= l3 <= l1 + l2:
        return 0.0
    magnitude = 4 * math.pi * math.sqrt((2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1)) * abs(
        float(sympy_wigner_3j(l1, l2, l3, 0, 0, 0)))
    points, weights = _lebedev()
    assert l1 + l2 + l3 <= 31
    y = _sh(max(l1, l2, l3), points)
    integral = torch.einsum("g,gi,gj,gk->ijk", weights, y[:, _block(l1)], y[:, _block(l2)], y[:, _block(l3)])
    w3j = _w3j(l1, l2, l3)
    projected = (integral * w3j).sum().item()  # w3j has unit Frobenius norm
    assert abs(abs(projected) - magnitude) <= 1e-11 * magnitude
    assert (integral - projected * w3j).abs().max() <= 1e-11 * magnitude  # integral is proportional to w3j
    return math.copysign(magnitude, projected)


def reference_product(x1, x2, l1max, l2max, lout):
    """sum over paths (l1, l2, l3) of c(l1, l2, l3)/4π * CG product with e3nn's wigner_3j."""
    batch = torch.broadcast_shapes(x1.shape[:-1], x2.shape[:-1])
    out = torch.zeros(*batch, (lout + 1) ** 2, dtype=x1.dtype)
    for l1 in range(l1max + 1):
        for l2 in range(l2max + 1):
            for l3 in range(abs(l1 - l2), min(l1 + l2, lout) + 1):
                c = gaunt_path_weight(l1, l2, l3)
                if c:
                    out[..., _block(l3)] += c / (4 * math.pi) * torch.einsum(
                        "ijk,...i,...j->...k", _w3j(l1, l2, l3).to(x1.dtype), x1[..., _block(l1)], x2[..., _block(l2)])
    return out


def _inputs(l1, l2, batch=(3,), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, (l1 + 1) ** 2, generator=g, dtype=dtype),
            torch.randn(*batch, (l2 + 1) ** 2, generator=g, dtype=dtype))


def _assert_close(out, ref, rel=REL_TOL):
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err:.3e} vs max|ref| {ref.abs().max().item():.3e}"


# ---- the reference itself ------------------------------------------------------------------------------------------
def test_reference_weights_match_known_values():
    """c(0, l, l) = 4π sqrt(2l+1) (Y_00 = 1 and wigner_3j(0, l, l) = δ/sqrt(2l+1)); c(1, 1, 2) from
    (1 1 2; 0 0 0) = sqrt(2/15)."""
    for l in range(5):
        assert gaunt_path_weight(0, l, l) == pytest.approx(4 * math.pi * math.sqrt(2 * l + 1), rel=1e-12)
    assert abs(gaunt_path_weight(1, 1, 2)) == pytest.approx(4 * math.pi * math.sqrt(45) * math.sqrt(2 / 15))
    assert gaunt_path_weight(1, 1, 1) == 0.0 and gaunt_path_weight(1, 1, 3) == 0.0


@pytest.mark.parametrize("lmax", [1, 2, 4])
def test_gaunt_coefficients_equal_weighted_wigner_3j(lmax):
    g = gaunt_coefficients(lmax, lmax, 2 * lmax)
    assert g.shape == ((lmax + 1) ** 2, (lmax + 1) ** 2, (2 * lmax + 1) ** 2) and g.dtype == F64
    for l1 in range(lmax + 1):
        for l2 in range(lmax + 1):
            for l3 in range(2 * lmax + 1):
                block = g[_block(l1), _block(l2), _block(l3)]
                c = gaunt_path_weight(l1, l2, l3)
                expected = c * _w3j(l1, l2, l3) if c else torch.zeros_like(block)
                assert (block - expected).abs().max() < 1e-12 * 4 * math.pi


# ---- both routes equal the Gaunt-weighted CG product -------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("lmax", range(1, 9))
def test_equals_weighted_clebsch_gordan_lout_l(lmax, route):
    method, backend = route
    x1, x2 = _inputs(lmax, lmax, seed=lmax)
    out = GauntTensorProduct(lmax, lmax, lmax, method, fourier_backend=backend)(x1, x2)
    _assert_close(out, reference_product(x1, x2, lmax, lmax, lmax))


# L1 = L2 = L with Lout = 2L (e3nn's spherical harmonics stop at l = 12, so L <= 6), and unequal degrees, including
# the shapes where the FFT backend's real half spectra used to be too short (L1 > L2 + Lout, Lout > L1 + L2).
DEGREES = [(1, 1, 2), (3, 3, 6), (6, 6, 12), (2, 0, 0), (3, 0, 0), (0, 3, 3), (4, 1, 1), (3, 1, 1), (1, 1, 5),
           (2, 5, 3), (5, 2, 7), (0, 0, 0)]


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("l1,l2,lout", DEGREES)
def test_equals_weighted_clebsch_gordan_other_degrees(l1, l2, lout, route):
    method, backend = route
    x1, x2 = _inputs(l1, l2, seed=10 * l1 + l2)
    out = GauntTensorProduct(l1, l2, lout, method, fourier_backend=backend)(x1, x2)
    _assert_close(out, reference_product(x1, x2, l1, l2, lout))


@pytest.mark.parametrize("method", ["grid", "fourier"])
def test_functional_form(method):
    x1, x2 = _inputs(3, 2, batch=(2, 4))
    _assert_close(gaunt_tensor_product(x1, x2, 4, method), reference_product(x1, x2, 3, 2, 4))


# ---- equivariance --------------------------------------------------------------------------------------------------
def wigner_d(lmax, matrix):
    """e3nn's block-diagonal D(R) for SH degrees 0..lmax (parity (-1)^l), accurate to float64.

    e3nn builds its so(3) generators in the *default* dtype (``change_basis_real_to_complex`` without a dtype), so
    with float32 as default ``D_from_matrix`` is only good to ~1e-7 even for float64 input; build it in float64.
    """
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        return o3.Irreps.spherical_harmonics(lmax).D_from_matrix(matrix)
    finally:
        torch.set_default_dtype(default)


def test_wigner_d_rotates_spherical_harmonics():
    """The D used below satisfies Y(R r) = D(R) Y(r) to float64 accuracy, also for R times inversion."""
    lmax = 6
    torch.manual_seed(0)
    rotation = o3.rand_matrix(dtype=F64)
    points = torch.randn(20, 3, dtype=F64)
    for matrix in (rotation, -rotation):
        d = wigner_d(lmax, matrix)
        _assert_close(_sh(lmax, points @ matrix.T), _sh(lmax, points) @ d.T, rel=1e-12)


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("lmax", range(1, 7))
def test_equivariance(lmax, route):
    """out(D x1, D x2) = D out(x1, x2) for a rotation and for a rotation times inversion (SH parity (-1)^l)."""
    method, backend = route
    torch.manual_seed(100 + lmax)
    tp = GauntTensorProduct(lmax, lmax, lmax, method, fourier_backend=backend)
    x1, x2 = _inputs(lmax, lmax, batch=(4,), seed=lmax)
    out = tp(x1, x2)
    rotation = o3.rand_matrix(dtype=F64)
    for matrix in (rotation, -rotation):
        d = wigner_d(lmax, matrix)
        rotated = tp(x1 @ d.T, x2 @ d.T)
        _assert_close(rotated, out @ d.T)


# ---- the product of functions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["grid", "fourier"])
@pytest.mark.parametrize("l1,l2", [(1, 1), (2, 3), (4, 4), (6, 6)])
def test_pointwise_product_when_lout_is_large(l1, l2, method):
    """With Lout >= L1 + L2 the output expansion is the product of the input functions at every point."""
    x1, x2 = _inputs(l1, l2, batch=(2,), seed=7)
    out = gaunt_tensor_product(x1, x2, l1 + l2, method)
    points = torch.randn(50, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    f1 = x1 @ _sh(l1, points).T
    f2 = x2 @ _sh(l2, points).T
    f_out = out @ _sh(l1 + l2, points).T
    _assert_close(f_out, f1 * f2)


def test_projection_truncates_the_product():
    """Lout < L1 + L2 returns the leading coefficients of the full product (SH are orthogonal)."""
    x1, x2 = _inputs(3, 3)
    full = gaunt_tensor_product(x1, x2, 6)
    _assert_close(gaunt_tensor_product(x1, x2, 2), full[..., :9])
    _assert_close(GauntTensorProduct(3, 3, 2, "fourier")(x1, x2), full[..., :9])


def test_grid_size_is_the_exactness_rule():
    """The grid integrates degree L1 + L2 + Lout exactly; one degree less aliases and is wrong."""
    l1 = l2 = lout = 3
    x1, x2 = _inputs(l1, l2)
    ref = reference_product(x1, x2, l1, l2, lout)
    tp = GauntTensorProduct(l1, l2, lout, "grid")
    assert (tp.grid1.n_beta, tp.grid1.n_alpha) == gaunt_module.grid_size_for_degree(9) == (5, 10)
    for degree, exact in ((l1 + l2 + lout, True), (l1 + l2 + lout - 1, False)):
        grid = SphericalGrid(l1, lout, degree)
        out = grid.from_grid_t(grid.to_grid_t(x1.T) * grid.to_grid_t(x2.T)).T
        err = (out - ref).abs().max().item() / ref.abs().max().item()
        assert (err < REL_TOL) == exact, (degree, err)


def test_power_equals_repeated_products():
    x = _inputs(2, 2, batch=(3, 2))[0]
    powers = GauntPower(2, 3, correlation=3)(x)  # (3, 2, ν, 16)
    square = gaunt_tensor_product(x, x, 4)
    _assert_close(powers[..., 0, :9], x)
    _assert_close(powers[..., 1, :], square[..., :16])
    _assert_close(powers[..., 2, :], reference_product(square, x, 4, 2, 3))


# ---- shapes, dtypes, gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_broadcasting_of_batch_dimensions(route):
    method, backend = route
    tp = GauntTensorProduct(2, 3, 3, method, fourier_backend=backend)
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(6, 5, 9, dtype=F64, generator=g)
    x2_edge = torch.randn(6, 1, 16, dtype=F64, generator=g)  # MACE "uvu": one edge attribute for all channels
    out = tp(x1, x2_edge)
    assert out.shape == (6, 5, 16)
    _assert_close(out, tp(x1, x2_edge.expand(6, 5, 16)))
    _assert_close(out, reference_product(x1, x2_edge, 2, 3, 3))
    x2 = torch.randn(16, dtype=F64, generator=g)  # no batch dimensions at all
    _assert_close(tp(x1, x2), tp(x1, x2.expand(6, 5, 16)))
    a = torch.randn(4, 1, 9, dtype=F64, generator=g)
    b = torch.randn(1, 3, 16, dtype=F64, generator=g)  # outer broadcast, (4, 1) x (1, 3) -> (4, 3)
    assert tp(a, b).shape == (4, 3, 16)
    _assert_close(tp(a, b), tp(a.expand(4, 3, 9), b.expand(4, 3, 16)))
    assert tp(a[0, 0], b[0, 0]).shape == (16,)
    with pytest.raises(ValueError):
        tp(x1[..., :8], x2)


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_float32(route):
    method, backend = route
    tp = GauntTensorProduct(4, 4, 4, method, fourier_backend=backend)
    x1, x2 = _inputs(4, 4, batch=(8, 3))
    out32 = tp(x1.float(), x2.float())
    assert out32.dtype == torch.float32
    _assert_close(out32.double(), tp(x1, x2), rel=2e-6)
    tp.float()  # buffers cast to float32 still give the float64 route's answer to float32 accuracy
    _assert_close(tp(x1.float(), x2.float()).double(), tp(x1, x2), rel=2e-6)


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_gradcheck(route):
    method, backend = route
    tp = GauntTensorProduct(2, 1, 2, method, channels=2, fourier_backend=backend).double()
    with torch.no_grad():
        tp.weight1.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(9)
    x1 = torch.randn(3, 2, 9, dtype=F64, generator=g, requires_grad=True)
    x2 = torch.randn(3, 2, 4, dtype=F64, generator=g, requires_grad=True)
    w2 = torch.rand(3, 1, 2, dtype=F64, generator=g, requires_grad=True)  # extra per-edge degree weights
    assert torch.autograd.gradcheck(lambda a, b, w: tp(a, b, weight2=w), (x1, x2, w2))
    out = tp(x1, x2)
    out.square().sum().backward()
    assert tp.weight1.grad is not None and tp.weight1.grad.abs().sum() > 0


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_single_channel_second_input_is_shared_by_all_channels(route):
    """x2 with one channel (e.g. edge spherical harmonics) equals that channel repeated for every channel."""
    method, backend = route
    tp = GauntTensorProduct(2, 2, 2, method, channels=3, fourier_backend=backend).double()
    with torch.no_grad():
        tp.weight2.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(4)
    x1 = torch.randn(5, 3, 9, dtype=F64, generator=g)
    x2 = torch.randn(5, 1, 9, dtype=F64, generator=g)
    _assert_close(tp(x1, x2), tp(x1, x2.expand(5, 3, 9)), rel=1e-14)
    with pytest.raises(ValueError, match="one channel shared"):
        tp(x1, torch.randn(5, 2, 9, dtype=F64))


# ---- cached conversion matrices ------------------------------------------------------------------------------------
def test_conversion_matrices_are_cached(monkeypatch):
    """A second construction reuses the cached e3nn-derived matrices: no spherical harmonics evaluated again."""
    lmax = 7
    modules = [GauntTensorProduct(lmax, lmax, lmax, m, fourier_backend=b) for m, b in ROUTES]
    gaunt_coefficients(lmax, lmax, lmax)
    calls = []
    original = gaunt_module.spherical_harmonics
    monkeypatch.setattr(gaunt_module, "spherical_harmonics", lambda *a: calls.append(a) or original(*a))
    start = time.perf_counter()
    again = [GauntTensorProduct(lmax, lmax, lmax, m, fourier_backend=b) for m, b in ROUTES]
    gaunt_coefficients(lmax, lmax, lmax)
    elapsed = time.perf_counter() - start
    assert calls == []
    assert elapsed < 2.0  # generous: a few ms when the machine is idle
    for first, second in zip(modules, again):
        for (name, a), (_, b) in zip(first.named_buffers(), second.named_buffers()):
            assert torch.equal(a, b), name
        for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
            # persistent buffers are written in place by load_state_dict: they must not alias the cache
            assert a.data_ptr() != b.data_ptr(), f"{name} shares storage with the cache"
    # the functional form caches whole modules
    assert gaunt_module._cached_product(3, 3, 3, "grid") is gaunt_module._cached_product(3, 3, 3, "grid")
    # gaunt_coefficients hands out copies, so callers cannot corrupt the cache
    g = gaunt_coefficients(1, 1, 2)
    g.zero_()
    assert gaunt_coefficients(1, 1, 2).abs().max() > 1


def test_cached_buffers_survive_load_state_dict():
    """Loading a state dict writes into buffers in place; that must not leak into later modules."""
    tp = GauntTensorProduct(2, 2, 2, "grid")
    state = {k: torch.zeros_like(v) for k, v in tp.state_dict().items()}
    tp.load_state_dict(state)
    x1, x2 = _inputs(2, 2)
    _assert_close(GauntTensorProduct(2, 2, 2, "grid")(x1, x2), reference_product(x1, x2, 2, 2, 2))


def test_fft_backend_half_spectrum_sizes():
    for l1, l2, lout in DEGREES:
        fs = FourierSphere(l1, l2, lout, backend="fft")
        assert fs.n_v // 2 + 1 > max(l1, l2, lout) and fs.n_v > l1 + l2 + lout and fs.n_u > 2 * (l1 + l2)
