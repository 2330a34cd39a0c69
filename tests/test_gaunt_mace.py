"""Gaunt-MACE: the shared model harness plus checks of the Gaunt products against independent references.

References: e3nn's own S^2 transforms (``ToS2Grid``/``FromS2Grid``, Kostelec-Rockmore quadrature on a
different grid) for the two-body and repeated products, and e3nn's real Wigner 3j symbols for the
Gaunt = fixed-weight Clebsch-Gordan identity.
"""
import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from e3nn import o3
from sympy.physics.wigner import wigner_3j

import matkit
from matkit.graph import atoms_to_graph
from matkit.nn.radial import BesselBasis, PolynomialEnvelope
from matkit.nn.mace_blocks import GauntInteraction, GauntManyBodyProduct, NeighbourSlots, gaunt_product
from matkit.nn.sphere_grid import SphereGrid, grid_size_for_degree, sphere_points, spherical_harmonics
from model_harness import SPECIES, ModelHarness, periodic_structure


class TestGauntMACE(ModelHarness):
    model_name = "gaunt_mace"
    hparams = dict(num_channels=8, max_ell=2, hidden_lmax=2, correlation=3, num_interactions=2, num_bessel=6,
                   radial_mlp=[16, 16], avg_num_neighbors=8.0)


class TestGauntMACESharedYWeights(ModelHarness):
    """Channel-shared edge-SH weights in the l > 0 layers (the batched-matrix-product message)."""
    model_name = "gaunt_mace"
    hparams = dict(num_channels=8, max_ell=2, hidden_lmax=1, correlation=2, num_interactions=3, num_bessel=6,
                   radial_mlp=[16], avg_num_neighbors=8.0, channelwise_y_weights=False)


class TestGauntMACEScalarHidden(ModelHarness):
    """The MACE-MP 'small' shape (scalar hidden features, max_ell 3): only the scalar message path."""
    model_name = "gaunt_mace"
    hparams = dict(num_channels=8, max_ell=3, hidden_lmax=0, correlation=3, num_interactions=2, num_bessel=8,
                   radial_mlp=[16, 16], avg_num_neighbors=8.0)


# ---- independent reference: e3nn's S^2 grid transforms ---------------------------------------------------------
def e3nn_gaunt_product(x, y, lmax_x, lmax_y, lmax_out):
    """Project f_x f_y onto SH (component normalisation) with e3nn's SOFT-quadrature grid transforms.

    e3nn 'integral' transforms give values ``sum_lm x_lm Y^comp_lm / sqrt(4 pi)``; x, y: (..., K) -> (..., K_out).
    """
    top = lmax_x + lmax_y
    res = (2 * (top + 1) + 2, 2 * top + 3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its quadrature tables in the default dtype
    try:
        to_x = o3.ToS2Grid(lmax_x, res, normalization="integral", dtype=torch.float64)
        to_y = o3.ToS2Grid(lmax_y, res, normalization="integral", dtype=torch.float64)
        back = o3.FromS2Grid(res, top, normalization="integral", dtype=torch.float64)
    finally:
        torch.set_default_dtype(default)
    product = back(math.sqrt(4 * math.pi) * to_x(x) * to_y(y))
    return product[..., : (lmax_out + 1) ** 2]


def test_grid_projection_inverts_evaluation():
    grid = SphereGrid(3, 3, degree=6)
    eye = grid.from_grid_matrix(torch.float64) @ grid.to_grid_matrix(torch.float64)
    np.testing.assert_allclose(eye.numpy(), np.eye(16), atol=1e-13)
    # one degree too few and the quadrature is no longer exact for l = 3 x l = 3
    with pytest.raises(ValueError, match="grid degree"):
        SphereGrid(3, 3, degree=5)
    for degree, exact in [(5, False), (6, True)]:
        points, weights = sphere_points(*grid_size_for_degree(degree))
        y = spherical_harmonics(3, points).numpy()
        gram = (y * weights.numpy()[:, None]).T @ y
        assert (np.abs(gram - np.eye(16)).max() < 1e-13) == exact


@pytest.mark.parametrize("lmax_x,lmax_y,lmax_out", [(2, 3, 3), (1, 1, 2), (3, 2, 5)])
def test_two_body_gaunt_product_matches_e3nn_grid(lmax_x, lmax_y, lmax_out):
    torch.manual_seed(0)
    x = torch.randn(5, (lmax_x + 1) ** 2, 4, dtype=torch.float64)
    y = torch.randn(5, (lmax_y + 1) ** 2, 4, dtype=torch.float64)
    ours = gaunt_product(x, y, lmax_x, lmax_y, lmax_out)
    ref = e3nn_gaunt_product(x.transpose(1, 2), y.transpose(1, 2), lmax_x, lmax_y, lmax_out).transpose(1, 2)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-12)


def test_gaunt_coefficients_are_fixed_weight_clebsch_gordan():
    """Y_l1 (x)_G Y_l2 -> l3 is proportional to e3nn's real Wigner 3j; zero when l1 + l2 + l3 is odd."""
    for l1, l2, l3 in [(1, 1, 2), (1, 2, 3), (2, 2, 2), (1, 1, 1), (1, 2, 2), (2, 3, 1), (2, 2, 4)]:
        x = torch.eye(2 * l1 + 1, dtype=torch.float64)
        y = torch.eye(2 * l2 + 1, dtype=torch.float64)
        full_x = torch.zeros(2 * l1 + 1, (l1 + 1) ** 2, 1, dtype=torch.float64)
        full_x[:, l1 * l1:, 0] = x
        full_y = torch.zeros(2 * l2 + 1, (l2 + 1) ** 2, 1, dtype=torch.float64)
        full_y[:, l2 * l2:, 0] = y
        # tensor G[m1, m2, m3] of the product of basis functions
        prod = gaunt_product(full_x[:, None].expand(-1, 2 * l2 + 1, -1, -1).reshape(-1, (l1 + 1) ** 2, 1),
                             full_y[None].expand(2 * l1 + 1, -1, -1, -1).reshape(-1, (l2 + 1) ** 2, 1),
                             l1, l2, l3)
        gaunt = prod[:, l3 * l3:, 0].reshape(2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)
        w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
        if (l1 + l2 + l3) % 2:
            assert gaunt.abs().max() < 1e-13
            continue
        ratio = (gaunt * w3j).sum() / (w3j * w3j).sum()
        np.testing.assert_allclose(gaunt.numpy(), (ratio * w3j).numpy(), atol=1e-12)
        # closed form for component-normalised SH: sqrt((2l1+1)(2l2+1)(2l3+1)) |(l1 l2 l3; 0 0 0)| (3j symbol)
        closed = math.sqrt((2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1)) * abs(float(wigner_3j(l1, l2, l3, 0, 0, 0)))
        assert abs(abs(ratio.item()) - closed) < 1e-12


def test_self_product_to_scalar_is_the_norm():
    """[f_x^2]_00 = (1/4pi) ∫ f_x^2 = sum_lm x_lm^2 for component-normalised SH."""
    torch.manual_seed(1)
    x = torch.randn(3, 16, 2, dtype=torch.float64)
    out = gaunt_product(x, x, 3, 3, 0)[:, 0]
    np.testing.assert_allclose(out.numpy(), (x ** 2).sum(1).numpy(), atol=1e-12)


@pytest.mark.parametrize("lmax_in,lmax_out,correlation", [(3, 0, 3), (2, 2, 3), (1, 2, 4)])
def test_many_body_product_equals_repeated_two_body_products(lmax_in, lmax_out, correlation):
    """B = sum_nu w[z, c, nu, l] [(s A)^nu]_lm with the powers from iterated e3nn-grid Gaunt products
    (intermediates not truncated) and element-, channel-, order- and degree-dependent weights."""
    torch.manual_seed(2)
    n, channels = 6, 5
    block = GauntManyBodyProduct(channels, lmax_in, lmax_out, correlation, num_species=3).double()
    a = torch.randn(n, (lmax_in + 1) ** 2, channels, dtype=torch.float64)
    species = torch.tensor([0, 2, 1, 0, 2, 2])
    ours = block(a, species).detach()
    k_out = (lmax_out + 1) ** 2
    degree = torch.cat([torch.full((2 * l + 1,), l) for l in range(lmax_out + 1)])
    a_t = block.scale * a.transpose(1, 2)  # (N, C, K)
    power, lmax_power = a_t, lmax_in
    expected = torch.zeros(n, channels, k_out, dtype=torch.float64)
    w = block.weights.detach()[species]  # (N, C, nu, L+1)
    for nu in range(correlation):
        truncated = torch.zeros(n, channels, k_out, dtype=torch.float64)
        k = min(k_out, power.shape[-1])
        truncated[..., :k] = power[..., :k]
        expected += w[:, :, nu, degree] * truncated
        power = e3nn_gaunt_product(power, a_t, lmax_power, lmax_in, lmax_power + lmax_in)
        lmax_power += lmax_in
    np.testing.assert_allclose(ours.transpose(1, 2).numpy(), expected.numpy(),
                               atol=1e-11 * max(1.0, expected.abs().max().item()))


def test_mace_blocks_grid_agrees_with_gaunt_module():
    """The dense-matrix SphereGrid product used in the messages equals matkit.nn.gaunt.GauntTensorProduct."""
    from matkit.nn.gaunt import GauntTensorProduct

    torch.manual_seed(6)
    x = torch.randn(4, 9, 3, dtype=torch.float64)
    y = torch.randn(4, 16, 3, dtype=torch.float64)
    ours = gaunt_product(x, y, 2, 3, 3)
    theirs = GauntTensorProduct(2, 3, 3).double()(x.transpose(1, 2), y.transpose(1, 2)).transpose(1, 2)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-12)


def test_grid_message_equals_per_edge_gaunt_products():
    """GauntInteraction's summed-on-grid message equals sum over edges of explicit e3nn-grid Gaunt products."""
    torch.manual_seed(4)
    lmax_h, max_ell, channels = 2, 3, 3
    block = GauntInteraction(channels, lmax_h, max_ell, max_ell, num_radial=4, radial_mlp=[8],
                             avg_num_neighbors=1.0).double()
    n, e = 4, 9
    h_up = torch.randn(n, (lmax_h + 1) ** 2, channels, dtype=torch.float64)
    r1 = torch.randn(e, lmax_h + 1, channels, dtype=torch.float64)
    r2 = torch.randn(e, max_ell + 1, channels, dtype=torch.float64)
    vec = torch.randn(e, 3, dtype=torch.float64)
    sh = spherical_harmonics(max_ell, vec)
    src = torch.randint(0, n, (e,))
    dst = torch.randint(0, n, (e,))
    ours = block.grid_message(h_up, r1, r2, sh, src, dst)
    deg_h = torch.cat([torch.full((2 * l + 1,), l) for l in range(lmax_h + 1)])
    deg_y = torch.cat([torch.full((2 * l + 1,), l) for l in range(max_ell + 1)])
    ref = torch.zeros(n, (max_ell + 1) ** 2, channels, dtype=torch.float64)
    for k in range(e):
        x = (r1[k][deg_h] * h_up[src[k]]).T  # (C, K_h)
        y = (r2[k][deg_y] * sh[k][:, None]).T  # (C, K_Y)
        ref[dst[k]] += e3nn_gaunt_product(x, y, lmax_h, max_ell, max_ell).T
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-11)

    # channel-shared Y weights on padded slots: the same reference with R2 equal for every channel
    slots = NeighbourSlots(torch.stack([src, dst]), n, sh, torch.zeros(e, 4, dtype=torch.float64))
    r2_shared = r2[:, :, 0]
    pad = lambda x: slots.pad(x.reshape(e, -1)).view(n, slots.max_neighbours, *x.shape[1:])  # noqa: E731
    shared = block.shared_y_grid_message(h_up, pad(r1), pad(r2_shared), slots)
    ref = torch.zeros(n, (max_ell + 1) ** 2, channels, dtype=torch.float64)
    for k in range(e):
        x = (r1[k][deg_h] * h_up[src[k]]).T
        y = (r2_shared[k][deg_y] * sh[k]).expand(channels, -1)
        ref[dst[k]] += e3nn_gaunt_product(x, y, lmax_h, max_ell, max_ell).T
    np.testing.assert_allclose(shared.numpy(), ref.numpy(), atol=1e-11)


def test_bessel_and_envelope_match_closed_forms():
    r = torch.tensor([0.3, 1.7, 4.2, 4.999, 5.0, 6.0], dtype=torch.float64)
    basis = BesselBasis(5.0, 8).double()(r)
    n = np.arange(1, 9)
    expected = np.sqrt(2 / 5.0) * np.sin(n * np.pi * r.numpy()[:, None] / 5.0) / r.numpy()[:, None]
    np.testing.assert_allclose(basis.numpy(), expected, atol=1e-14)
    env = PolynomialEnvelope(5.0, 5)(r).numpy()
    x = r.numpy() / 5.0
    u = 1 - 21 * x ** 5 + 35 * x ** 6 - 15 * x ** 7
    np.testing.assert_allclose(env, np.where(x < 1, u, 0.0), atol=1e-14)
    assert env[0] > 0.99 and abs(env[3]) < 1e-9 and env[4] == 0 and env[5] == 0


def test_force_loss_backward_matches_finite_difference_of_parameter():
    """Training uses d/dtheta of a force loss (double backward); check one parameter against central differences."""
    torch.manual_seed(0)
    model = matkit.build("gaunt_mace", species=SPECIES, cutoff=4.0, **TestGauntMACE.hparams).double()
    graph = atoms_to_graph(periodic_structure(4), model.cutoff, dtype=torch.float64)
    target = torch.randn(graph.num_nodes, 3, dtype=torch.float64)

    def loss_value():
        out = model(graph, forces=True, stress=True, training=True)
        return (out["forces"] - target).pow(2).sum() + 1e3 * out["stress"].pow(2).sum() + out["energy"].sum()

    loss = loss_value()
    loss.backward()
    param = model.layers[0].interaction.radial.net[0].weight
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    analytic = param.grad[1, 2].item()
    h = 1e-5
    with torch.no_grad():
        param[1, 2] += h
    plus = loss_value().item()
    with torch.no_grad():
        param[1, 2] -= 2 * h
    minus = loss_value().item()
    numeric = (plus - minus) / (2 * h)
    assert abs(analytic) > 1e-6
    assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric))


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="correlation"):
        matkit.build("gaunt_mace", species=[14], correlation=0)
    with pytest.raises(ValueError, match="avg_num_neighbors"):
        matkit.build("gaunt_mace", species=[14], avg_num_neighbors=0.0)


def test_default_model_runs_on_silicon():
    model = matkit.build("gaunt_mace", species=[14], num_channels=16)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    out = model(atoms_to_graph(atoms, model.cutoff), forces=True, stress=True)
    assert out["forces"].dtype == torch.float32 and torch.isfinite(out["stress"]).all()
    assert model.hparams["hidden_lmax"] == 2 and model.hparams["max_ell"] == 3


def test_scalar_message_equals_edge_sum():
    """The padded-slot batched product equals the plain sum over edges of h_j R[e, l, c] Y_lm(e)."""
    torch.manual_seed(5)
    channels, max_ell = 3, 3
    block = GauntInteraction(channels, 0, max_ell, max_ell, num_radial=4, radial_mlp=[8],
                             avg_num_neighbors=1.0).double()
    n, e = 5, 13
    edge_index = torch.stack([torch.randint(0, n, (e,)), torch.tensor([0, 0, 0, 1, 3, 3, 0, 1, 3, 3, 3, 0, 1])])
    vec = torch.randn(e, 3, dtype=torch.float64)
    sh = spherical_harmonics(max_ell, vec)
    radial = torch.rand(e, 4, dtype=torch.float64)
    slots = NeighbourSlots(edge_index, n, sh, radial)
    assert slots.max_neighbours == 5
    h_up = torch.randn(n, 1, channels, dtype=torch.float64)
    r2 = block.radial(slots.radial_padded).view(n, slots.max_neighbours, -1, channels)
    ours = block.scalar_message(h_up, r2, slots)
    weights = block.radial(radial).view(e, -1, channels)
    degree = torch.cat([torch.full((2 * l + 1,), l) for l in range(max_ell + 1)])
    ref = torch.zeros(n, (max_ell + 1) ** 2, channels, dtype=torch.float64)
    for k in range(e):
        j, i = edge_index[:, k].tolist()
        ref[i] += h_up[j, 0] * weights[k][degree] * sh[k][:, None]
    np.testing.assert_allclose(ours.detach().numpy(), ref.detach().numpy(), atol=1e-12)
    assert ours[2].abs().max() == 0 and ours[4].abs().max() == 0  # atoms without neighbours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_slot_message_equals_the_torch_ops(dtype):
    """The Numba scalar message (inference on CPU) against the torch ops it replaces: values and the gradients for
    the slot SH, the radial weights and the node features, with empty slots."""
    from matkit.nn.mace_kernels import SlotMessage

    g = torch.Generator().manual_seed(0)
    n, m, c, lmax = 7, 5, 6, 3
    counts = torch.tensor([5, 3, 0, 4, 5, 1, 2])
    filled = torch.arange(m)[None] < counts[:, None]
    src = torch.where(filled, torch.randint(0, n, (n, m), generator=g), 0)
    Y = (torch.randn(n, (lmax + 1) ** 2, m, generator=g, dtype=dtype) * filled[:, None]).requires_grad_(True)
    R = (torch.randn(n, m, lmax + 1, c, generator=g, dtype=dtype) * filled[:, :, None, None]).requires_grad_(True)
    H = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    # radial weights read through a row index: here the rows of R in reverse order (as per-edge weights would be)
    perm = torch.arange(n * m - 1, -1, -1)
    rows = torch.empty_like(perm)
    rows[perm] = torch.arange(n * m)
    compiled = SlotMessage.apply(Y, R.reshape(n * m, lmax + 1, c)[perm], H, src, rows.view(n, m), counts, lmax)
    weighted = (R * H.index_select(0, src.reshape(-1)).view(n, m, 1, c)).unbind(2)
    reference = torch.cat([Y[:, l * l:(l + 1) ** 2] @ weighted[l] for l in range(lmax + 1)], 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(compiled, reference, atol=tol, rtol=0)
    weights = torch.randn(compiled.shape, generator=g, dtype=dtype)
    for a, b in zip(torch.autograd.grad((compiled * weights).sum(), (Y, R, H)),
                    torch.autograd.grad((reference * weights).sum(), (Y, R, H))):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=0)
