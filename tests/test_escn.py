"""eSCN: edge frames, Wigner matrices, SO(2) == SO(3) convolution, harness, poles, roll independence."""
import contextlib

import numpy as np
import pytest
import torch
from ase import Atoms
from e3nn import o3

import matkit
import matkit.models.escn as escn_module
from matkit.graph import atoms_to_graph
from matkit.nn.so2 import SO2Convolution, TruncatedLayout
from so2_reference import (cg_path_weights, e3nn_so3_convolution, edge_path_weights, from_e3nn_layout,
                                     path_weight_map, so3_paths, spherical_harmonics, to_e3nn_layout)
from matkit.nn.wigner import WignerD, edge_frame_rotation
from model_harness import SPECIES, ModelHarness, molecule, periodic_structure, random_rotation

F64 = torch.float64


@contextlib.contextmanager
def float64_default():
    """e3nn builds generators / Wigner 3j buffers in the default dtype: make it float64 for exact references."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def directions(n=12, seed=0):
    """Random unit vectors plus the exact poles +-y (and +-x, +-z)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    poles = np.array([[0, 1, 0], [0, -2.5, 0], [1, 0, 0], [0, 0, -1], [1e-9, -1, 0], [0, -1, -1e-12]], float)
    return torch.tensor(np.concatenate([v, poles]), dtype=F64)


def rotation_about_y(angle):
    c, s = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1),
                        torch.stack([-s, zero, c], -1)], -2)


# ---- edge frames and Wigner matrices ------------------------------------------------------------------------
def test_edge_frame_maps_every_direction_onto_plus_y():
    v = directions()
    rot = edge_frame_rotation(v)
    u = v / v.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(torch.einsum("eij,ej->ei", rot, u), np.tile([0, 1, 0], (len(v), 1)), atol=1e-15)
    np.testing.assert_allclose(rot @ rot.transpose(1, 2), np.tile(np.eye(3), (len(v), 1, 1)), atol=1e-15)
    np.testing.assert_allclose(torch.linalg.det(rot), np.ones(len(v)), atol=1e-15)


@pytest.mark.parametrize("lmax", [1, 3, 6, 8])
def test_wigner_d_is_the_e3nn_representation(lmax):
    v = directions()
    rot = edge_frame_rotation(v)
    d = WignerD(lmax).to(F64)(rot)
    irreps = o3.Irreps([(1, (l, 1)) for l in range(lmax + 1)])
    generic = slice(0, 12)  # e3nn's matrix -> Euler angles -> matrix_exp loses accuracy near its poles
    with float64_default():
        ref = torch.stack([irreps.D_from_matrix(r) for r in rot[generic]])
    np.testing.assert_allclose(d[generic], ref, atol=1e-7)  # e3nn itself is accurate to ~1e-8 at l = 8
    # the defining property, to rounding: Y(R x) = D(R) Y(x)
    x = torch.randn(30, 3, dtype=F64)
    ls = list(range(lmax + 1))
    for r, dr in zip(rot, d):
        np.testing.assert_allclose(o3.spherical_harmonics(ls, x @ r.T, True), o3.spherical_harmonics(ls, x, True)
                                   @ dr.T, atol=1e-12)


def test_edge_harmonics_are_pure_m0_in_the_edge_frame():
    lmax = 6
    v = directions()
    d = WignerD(lmax).to(F64)(edge_frame_rotation(v))
    sh = o3.spherical_harmonics(list(range(lmax + 1)), v, normalize=True, normalization="component")
    rotated = torch.einsum("eij,ej->ei", d, sh)
    m0 = [l * l + l for l in range(lmax + 1)]
    expected = torch.zeros_like(rotated)
    expected[:, m0] = torch.tensor([np.sqrt(2 * l + 1) for l in range(lmax + 1)], dtype=F64)
    np.testing.assert_allclose(rotated, expected, atol=1e-12)


def test_frame_gradients_are_finite_at_the_poles():
    v = directions().requires_grad_(True)
    d = WignerD(4).to(F64)(edge_frame_rotation(v))
    weights = torch.randn_like(d)
    (grad,) = torch.autograd.grad((d * weights).sum(), v)
    assert torch.isfinite(grad).all()


# ---- SO(2) convolution == SO(3) Clebsch-Gordan convolution -------------------------------------------------
# the reference builders are shared with benchmarks/so2_convolution.py (tests/so2_reference.py)
@pytest.mark.parametrize("lmax,mmax,chiral", [(1, 1, True), (2, 1, True), (3, 2, False), (4, 2, True),
                                              (6, 2, True), (6, 6, True)])
def test_so2_convolution_equals_cg_so3_convolution(lmax, mmax, chiral):
    """rotate -> SO(2) conv -> rotate back == sum over CG paths w (x (x) Y(edge)) with the mapped weights."""
    torch.manual_seed(lmax + 10 * mmax)
    c_in, c_out, edge_channels = 3, 2, 5
    conv = SO2Convolution(lmax, mmax, c_in, c_out, hidden_channels=4, edge_channels=edge_channels,
                          chiral=chiral).to(F64)
    edge_features = torch.randn(1, edge_channels, dtype=F64)  # one radial feature shared by all test edges
    weights = conv.effective_weights(edge_features)
    layout = TruncatedLayout(lmax, mmax)
    paths, residual = cg_path_weights(weights, layout, lmax, c_in, c_out)
    assert residual < 1e-12, "the SO(2) map is not spanned by CG paths"
    if not chiral:
        odd = [w.abs().max().item() for (a, b, c), w in paths.items() if (a + b + c) % 2]
        assert max(odd) < 1e-12, "without imaginary weights only parity-even paths may appear"

    v = directions()
    n_edges = len(v)
    x = torch.randn(n_edges, (lmax + 1) ** 2, c_in, dtype=F64)
    d = WignerD(lmax).to(F64)(edge_frame_rotation(v))[:, layout.kept]
    y_so2 = d.transpose(1, 2) @ conv(d @ x, edge_features.expand(n_edges, -1))

    # the same convolution on m-major coefficients (eSCN's edge-frame order) gives the same result
    conv_m = SO2Convolution(lmax, mmax, c_in, c_out, hidden_channels=4, edge_channels=edge_channels,
                            chiral=chiral, order="m").to(F64)
    conv_m.load_state_dict(conv.state_dict())
    d_m = WignerD(lmax).to(F64)(edge_frame_rotation(v))[:, TruncatedLayout(lmax, mmax, order="m").kept]
    y_m = d_m.transpose(1, 2) @ conv_m(d_m @ x, edge_features.expand(n_edges, -1))
    np.testing.assert_allclose(y_m.detach(), y_so2.detach(), rtol=0, atol=1e-13)

    with float64_default():
        tp, tp_weights, irreps_out = e3nn_so3_convolution(paths, lmax, c_in, c_out)
        tp = tp.to(F64)
    sh = o3.spherical_harmonics(list(range(2 * lmax + 1)), v, normalize=True, normalization="component")
    y_so3 = from_e3nn_layout(tp(to_e3nn_layout(x), sh, tp_weights), irreps_out, lmax, c_out)

    assert y_so3.abs().max() > 0.1
    np.testing.assert_allclose(y_so2.detach(), y_so3.detach(), rtol=0, atol=1e-10)


def test_per_edge_path_weights_match_the_least_squares_solution():
    """edge_path_weights (a fixed linear map per degree pair, all edges at once) == cg_path_weights edge by edge."""
    torch.manual_seed(1)
    lmax, mmax, c_in, c_out = 4, 2, 3, 2
    for chiral in (True, False):
        conv = SO2Convolution(lmax, mmax, c_in, c_out, hidden_channels=4, edge_channels=5, chiral=chiral).to(F64)
        layout = TruncatedLayout(lmax, mmax)
        edge_features = torch.randn(3, 5, dtype=F64)
        batched = edge_path_weights(conv.effective_weights(edge_features), layout, c_in, c_out, chiral=chiral)
        assert sorted(batched) == sorted(so3_paths(lmax, chiral))
        for e in range(3):
            single, residual = cg_path_weights(conv.effective_weights(edge_features[e:e + 1]), layout, lmax, c_in,
                                               c_out)
            assert residual < 1e-12
            for path, w in batched.items():
                np.testing.assert_allclose(w[e].detach(), single[path].detach(), rtol=0, atol=1e-12)
    assert max(path_weight_map(a, b)[2] for a in range(7) for b in range(7)) < 1e-12


def test_spherical_harmonics_beyond_e3nn_degree_limit():
    """Degrees 13..16 (e3nn stops at 12) by recursion: component norm, Y(+y) = sqrt(2l+1) delta_m0, equivariant;
    the same recursion from degree 4 reproduces e3nn's degrees 5..12."""
    import so2_reference as reference

    v = torch.randn(10, 3, dtype=F64)
    sh = spherical_harmonics(16, v)
    for l in range(17):
        np.testing.assert_allclose((sh[:, l * l:(l + 1) ** 2] ** 2).sum(1), 2 * l + 1, rtol=1e-12)
    pole = spherical_harmonics(16, torch.tensor([[0.0, 2.0, 0.0]], dtype=F64))[0]
    expected = torch.zeros(17 ** 2, dtype=F64)
    expected[[l * l + l for l in range(17)]] = torch.tensor([np.sqrt(2 * l + 1) for l in range(17)], dtype=F64)
    np.testing.assert_allclose(pole, expected, atol=1e-12)
    rot = torch.tensor(random_rotation(5, False), dtype=F64)
    with float64_default():
        d = o3.Irreps([(1, (l, (-1) ** l)) for l in range(17)]).D_from_matrix(rot)
    np.testing.assert_allclose(spherical_harmonics(16, v @ rot.T), sh @ d.T, atol=1e-9)
    reference._raising_coefficients.cache_clear()
    try:
        reference.E3NN_MAX_SH_DEGREE = 4
        recursed = spherical_harmonics(12, v)
    finally:
        reference.E3NN_MAX_SH_DEGREE = 12
        reference._raising_coefficients.cache_clear()
    np.testing.assert_allclose(recursed, o3.spherical_harmonics(list(range(13)), v, True, "component"), atol=1e-12)


# ---- the model through the harness -------------------------------------------------------------------------
SMALL = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=8, hidden_channels=8, edge_channels=8, num_radial=12,
             avg_num_neighbors=1.0)


class TestESCN(ModelHarness):
    """Approximate equivariance (grid nonlinearities). With SMALL (lmax 3, default grids: edge (5, 12), node
    (12, 24)) the measured float64 errors after a rotation are < 1e-12 relative (energy) and < 1e-11 (forces,
    stress); the tolerance below keeps a margin of ~100 and is far below the errors of coarse grids (e.g. node grid
    (4, 7): ~1e-4, see test_equivariance_error_falls_with_grid_resolution)."""
    model_name = "escn"
    hparams = SMALL
    cutoff = 4.0
    equivariance_atol = 1e-9


def rotation_error(model, atoms, rot):
    def evaluate(a):
        out = model(atoms_to_graph(a, model.cutoff, dtype=F64), forces=True)
        return out["energy"].item(), out["forces"].detach().numpy()

    e, f = evaluate(atoms)
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    if atoms.pbc.any():
        turned.cell = atoms.cell.array @ rot.T
    e2, f2 = evaluate(turned)
    return abs(e2 - e), np.abs(f2 - f @ rot.T).max(), np.abs(f).max()


def test_equivariance_error_falls_with_grid_resolution():
    """Node-grid aliasing: the rotation error falls by orders of magnitude from a minimal to the default grid.

    Errors are relative to the largest force component (a freshly initialised model has forces of ~5e-3 eV/Å;
    measured relative errors: node grid (4, 7) ~2e-2, (6, 12) ~4e-5, default ~2e-10)."""
    atoms, rot = periodic_structure(), random_rotation(3, False)
    relative = []
    for node_grid in [(4, 7), (6, 12), None]:
        torch.manual_seed(0)
        model = matkit.build("escn", species=SPECIES, cutoff=4.0, node_grid=node_grid, **SMALL).double()
        _, force_error, fmax = rotation_error(model, atoms, rot)
        assert fmax > 1e-3, "forces must be far above round-off for relative errors to mean anything"
        relative.append(force_error / fmax)
    assert relative[0] > 1e-5, "a minimal grid must show aliasing, else this test measures nothing"
    assert relative[0] > 100 * relative[1] > 100 * 100 * relative[2]
    assert relative[2] < 1e-9


def test_chiral_variant_is_rotation_but_not_mirror_invariant():
    """Imaginary SO(2) weights: rotations leave the energy unchanged (to round-off), a mirror changes it; the
    achiral model is mirror invariant to round-off. Force differences are relative to the largest force."""
    torch.manual_seed(0)
    model = matkit.build("escn", species=SPECIES, cutoff=4.0, chiral=True, **SMALL).double()
    atoms = molecule()
    de, df, fmax = rotation_error(model, atoms, random_rotation(3, False))
    assert fmax > 1e-3 and de < 1e-10 and df < 1e-9 * fmax
    de_mirror, df_mirror, _ = rotation_error(model, atoms, np.diag([1.0, 1.0, -1.0]))
    assert df_mirror > 1e-3 * fmax and de_mirror > 1e4 * 1e-10, \
        "imaginary SO(2) weights should distinguish mirror images"
    torch.manual_seed(0)
    achiral = matkit.build("escn", species=SPECIES, cutoff=4.0, chiral=False, **SMALL).double()
    de_achiral, df_achiral, fmax_achiral = rotation_error(achiral, atoms, np.diag([1.0, 1.0, -1.0]))
    assert de_achiral < 1e-10 and df_achiral < 1e-9 * fmax_achiral


# ---- poles and roll -------------------------------------------------------------------------------------------
def make_model(**kw):
    torch.manual_seed(0)
    return matkit.build("escn", species=SPECIES, cutoff=4.0, **{**SMALL, **kw}).double()


def energy_and_forces(model, atoms):
    out = model(atoms_to_graph(atoms, model.cutoff, dtype=F64), forces=True)
    return out["energy"].item(), out["forces"].detach().numpy()


@pytest.mark.parametrize("axis", [(0, 1, 0), (0, -1, 0)])
def test_edges_exactly_along_the_polar_axis_have_correct_finite_forces(axis):
    """A trimer with one bond exactly along +-y (both directions of the edge are poles): forces are finite,
    match central finite differences, and equal the forces of a rotated copy (no pole at all)."""
    model = make_model()
    axis = np.array(axis, float)
    atoms = Atoms(numbers=[14, 8, 6], positions=[[0, 0, 0], 1.7 * axis, [1.1, 0.4, -0.9]])
    energy, forces = energy_and_forces(model, atoms)
    assert np.isfinite(forces).all() and np.abs(forces).max() > 1e-3
    h = 1e-5
    fd = np.zeros_like(forces)
    for a in range(3):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, k] += h
            minus.positions[a, k] -= h
            fd[a, k] = -(energy_and_forces(model, plus)[0] - energy_and_forces(model, minus)[0]) / (2 * h)
    np.testing.assert_allclose(forces, fd, rtol=0, atol=1e-7 * max(1.0, np.abs(fd).max()))
    rot = random_rotation(7, False)
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    energy_turned, forces_turned = energy_and_forces(model, turned)
    assert abs(energy_turned - energy) < 1e-10
    np.testing.assert_allclose(forces_turned, forces @ rot.T, rtol=0, atol=1e-9)


def test_energy_is_continuous_through_the_south_pole():
    """The frame is singular only at -y; the energy there matches nearby directions to the grid error."""
    model = make_model()

    def dimer_energy(direction):
        return energy_and_forces(model, Atoms(numbers=[14, 8], positions=[[0, 0, 0], 2.0 * np.asarray(direction)]))

    e_pole, f_pole = dimer_energy([0, -1, 0])
    for tilt in ([1e-7, -1, 0], [0, -1, 1e-7], [-1e-7, -1, -1e-7]):
        e, f = dimer_energy(np.array(tilt) / np.linalg.norm(tilt))
        assert abs(e - e_pole) < 1e-10
        np.testing.assert_allclose(f, f_pole, rtol=0, atol=1e-6)


def test_result_does_not_depend_on_the_roll_of_the_edge_frame(monkeypatch):
    """Replacing each edge frame by a random roll about the edge changes nothing (beyond edge-grid aliasing):
    the deterministic frame is a choice, not an approximation."""
    model = make_model()
    atoms = periodic_structure()
    e_ref, f_ref = energy_and_forces(model, atoms)
    original = escn_module.edge_frame_rotation
    generator = torch.Generator().manual_seed(3)

    def rolled(edge_vec):
        angle = 2 * np.pi * torch.rand(edge_vec.shape[0], generator=generator, dtype=edge_vec.dtype)
        return rotation_about_y(angle) @ original(edge_vec)

    monkeypatch.setattr(escn_module, "edge_frame_rotation", rolled)
    e, f = energy_and_forces(model, atoms)
    assert abs(e - e_ref) < 1e-11 * max(1, abs(e_ref))
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-10 * max(1, np.abs(f_ref).max()))


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="mmax"):
        matkit.build("escn", species=[14], lmax=2, mmax=3)
    with pytest.raises(ValueError, match="node_grid"):
        matkit.build("escn", species=[14], lmax=4, node_grid=(3, 9))
    with pytest.raises(ValueError, match="edge_grid"):
        matkit.build("escn", species=[14], lmax=4, mmax=2, edge_grid=(5, 4))


# ---- inference kernels (matkit.nn.escn_kernels, matkit.nn.sphere_grid_kernels) ---------------------------------
def test_inference_kernels_match_training_ops_and_training_has_double_backward(monkeypatch):
    """Eval mode on CPU runs the Numba kernels (edge rotations, edge-grid SiLU, and with frozen weights the node
    grid MLPs); train mode the torch ops. Same energy, forces and stress in float64, and the training path
    supports a force loss."""
    from matkit.nn import escn_blocks

    calls, kernel = [], escn_blocks.GridMLP

    class CountedGridMLP(kernel):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return kernel.forward(ctx, *args)

    monkeypatch.setattr(escn_blocks, "GridMLP", CountedGridMLP)
    model = make_model()
    # 8 and 7 atoms (a partial tile of atoms), periodic with stress and a molecule
    for atoms, stress in ((periodic_structure(seed=2), True), (molecule(), False)):
        graph = atoms_to_graph(atoms, model.cutoff, dtype=F64)
        model.eval().requires_grad_(False)
        calls.clear()
        fast = model(graph, forces=True, stress=stress)
        assert len(calls) == len(model.updates) + 1   # every node update and the readout ran the kernel
        plain = model.train().requires_grad_(True)(graph, forces=True, stress=stress, training=True)
        for key in ("energy", "forces") + (("stress",) if stress else ()):
            ref = plain[key].detach().numpy()
            np.testing.assert_allclose(fast[key].detach().numpy(), ref, rtol=0,
                                       atol=1e-12 * max(1, np.abs(ref).max()))
        assert np.abs(plain["forces"].detach().numpy()).max() > 1e-3
        ((plain["forces"] ** 2).sum() + (plain["stress"].pow(2).sum() if stress else 0)).backward()
    assert max(float(p.grad.abs().max()) for p in model.messages[0].so2.parameters()) > 0


@pytest.mark.parametrize("mean", [False, True])
def test_grid_mlp_is_the_mlp_applied_at_every_grid_point(mean):
    """``grid_mlp`` applies the outer linear maps in coefficient space; it is the MLP applied pointwise to the grid
    values, projected back (or averaged), in both the training path and the frozen-weight kernel, with
    gradients."""
    from matkit.nn.escn_blocks import grid_mlp, sphere_mlp
    from matkit.nn.sphere_grid import SphereGrid

    torch.manual_seed(0)
    grid = SphereGrid(2, resolution=(6, 11))
    mlp = sphere_mlp(6, 5, 1 if mean else 4).double()
    x = torch.randn(5, 9, 6, dtype=F64, requires_grad=True)
    values = mlp(grid.to_grid(x))
    ref = grid.mean(values) if mean else grid.from_grid(values)
    weights = torch.randn(ref.shape, dtype=F64)
    (ref_grad,) = torch.autograd.grad(ref, x, weights)
    for frozen in (False, True):
        mlp.eval().requires_grad_(not frozen)
        out = grid_mlp(mlp, grid, x, mean=mean)
        (grad,) = torch.autograd.grad(out, x, weights)
        assert float(ref.abs().max()) > 1e-2
        np.testing.assert_allclose(out.detach(), ref.detach(), rtol=0, atol=1e-13)
        np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-13)


def test_rotation_kernels_match_torch_ops():
    """Projected gather-and-rotate and rotate-back-and-scatter against plain batched products, values and
    gradients (for the Wigner matrices through the edge vectors: their off-block zeros are constants)."""
    from matkit.nn.escn_kernels import ProjectGather, RotateScatter
    from matkit.nn.sphere_grid import degree_of_coefficient

    g = torch.Generator().manual_seed(0)
    lmax, mmax, n, e, c, h = 3, 2, 6, 40, 5, 4
    kept = TruncatedLayout(lmax, mmax, order="m").kept
    degree = degree_of_coefficient(lmax)[kept]
    order = kept - degree * (degree + 1)
    pairs = [(0, 0)] + [(m, s) for m in range(1, mmax + 1) for s in (1, -1)]     # hidden rows m = 0, +1, -1, ...
    group = torch.tensor([pairs.index((abs(int(m)), 1 if m > 0 else -1 if m < 0 else 0)) for m in order])
    block = order.abs()
    src, dst = torch.randint(0, n, (e,), generator=g), torch.randint(0, n, (e,), generator=g)
    vec = torch.randn(e, 3, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(n, (lmax + 1) ** 2, c, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(n, (lmax + 1) ** 2, 2 * (mmax + 1) * h, generator=g, dtype=F64, requires_grad=True)
    m = torch.randn(e, len(kept), c, generator=g, dtype=F64, requires_grad=True)
    w = torch.rand(e, generator=g, dtype=F64, requires_grad=True)
    wigner = WignerD(lmax)

    def rotations():
        return wigner(edge_frame_rotation(vec))[:, kept]

    def gathered_reference():
        ends = y[src].view(e, -1, 2, mmax + 1, h), y[dst].view(e, -1, 2, mmax + 1, h)
        rows = []
        for k in range(len(kept)):   # row k reads its block's source and target projections
            rows.append(rotations()[:, k, None, :] @ (ends[0][:, :, 0, block[k]] + ends[1][:, :, 1, block[k]]))
        return torch.zeros(e, len(pairs), h, dtype=F64).index_add(1, group, torch.cat(rows, 1))

    gathered = ProjectGather.apply(y, rotations(), src, dst, degree, group, block, len(pairs))
    scattered = RotateScatter.apply(m, rotations(), w, dst, degree, n)
    scattered_ref = torch.zeros_like(x).index_add(0, dst, rotations().transpose(1, 2) @ m * w[:, None, None])
    for out, ref, inputs in ((gathered, gathered_reference(), (y, vec)), (scattered, scattered_ref, (m, vec, w))):
        np.testing.assert_allclose(out.detach(), ref.detach(), rtol=0, atol=1e-13)
        weights = torch.randn(out.shape, generator=g, dtype=F64)
        for a, b in zip(torch.autograd.grad(out, inputs, weights), torch.autograd.grad(ref, inputs, weights)):
            assert float(b.abs().max()) > 1e-3
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grid_silu_kernel_matches_torch_ops(dtype):
    """The fused grid SiLU (float32: its own vectorised exponential) against the torch ops in float64, with
    values large enough to reach the exponential's clamp."""
    from matkit.nn.sphere_grid import SphereGrid
    from matkit.nn.sphere_grid_kernels import GridSiLU

    kept = TruncatedLayout(3, 2).kept
    grid = SphereGrid(3, resolution=(5, 12), kept=kept)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(30, len(kept), 6, generator=g, dtype=F64) * torch.logspace(-1, 2, 30, dtype=F64)[:, None, None]
    weights = torch.randn(h.shape, generator=g, dtype=F64)
    h64 = h.clone().requires_grad_()
    ref = grid.from_grid(torch.nn.functional.silu(grid.to_grid(h64)))
    (ref_grad,) = torch.autograd.grad(ref, h64, weights)
    h_in = h.to(dtype).requires_grad_()
    out = GridSiLU.apply(h_in, grid.to_grid_matrix(dtype), grid.from_grid_matrix(dtype))
    (grad,) = torch.autograd.grad(out, h_in, weights.to(dtype))
    # float32: the torch ops themselves are off by ~1e-7 of the largest values (rounding of the products)
    rel = 1e-13 if dtype == F64 else 2e-6
    for a, b in ((out, ref), (grad, ref_grad)):
        err = (a.double() - b).abs() / b.abs().amax(dim=(1, 2), keepdim=True)
        assert float(err.max()) < rel, float(err.max())
    assert float((grid.eval().silu(h_in.detach()) - out).abs().max()) == 0.0  # eval mode dispatches to the kernel
