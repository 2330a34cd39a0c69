"""Radial tables: the spline against analytic functions (values, derivatives, h^4 convergence), and TensorNet with
tables against the exact MLPs (float64, finite differences, weight changes, training mode)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

import matkit
from matkit.calculator import MatkitCalculator
from matkit.checkpoint import load_checkpoint
from matkit.nn.radial_table import RadialTable
from matkit.potentials import checkpoint_path


def _analytic(d):
    """Two channels with known derivatives: exp(-d) sin(3 d) and a cosine cutoff at 5 Å."""
    return torch.stack((torch.exp(-d) * torch.sin(3 * d), 0.5 * (torch.cos(np.pi * d / 5.0) + 1.0)), 1)


def _analytic_slope(d):
    return torch.stack((torch.exp(-d) * (3 * torch.cos(3 * d) - torch.sin(3 * d)),
                        -0.5 * np.pi / 5.0 * torch.sin(np.pi * d / 5.0)), 1)


def test_spline_matches_values_derivatives_and_converges_as_h4():
    d = torch.tensor([0.0, 0.137, 1.0, 2.71828, 4.5, 4.9999, 5.0], dtype=torch.float64, requires_grad=True)
    errors = []
    for knots in (257, 513):
        table = RadialTable(_analytic, 5.0, knots, dtype=torch.float64)
        value = table(d)
        (slope0,) = torch.autograd.grad(value[:, 0].sum(), d, retain_graph=True)
        (slope1,) = torch.autograd.grad(value[:, 1].sum(), d)
        exact = _analytic(d.detach())
        exact_slope = _analytic_slope(d.detach())
        # Hermite bound h^4/384 max|f|; |f| <= |-1 + 3i|^4 = 100 for channel 0, (pi/5)^4/2 for channel 1
        bound = table.spacing ** 4 / 384 * 100
        assert float((value.detach() - exact).abs().max()) <= bound
        np.testing.assert_allclose(torch.stack((slope0, slope1), 1).numpy(), exact_slope.numpy(), atol=1e-5)
        errors.append(table.max_error())                  # at the midpoints, relative to max |f| = 1
        assert 0.1 * bound < errors[-1] <= bound
    # at the knots the spline is exact; between them its error falls as h^4 (ratio 16 for twice the knots)
    assert 10 < errors[0] / errors[1] < 22
    float32 = RadialTable(_analytic, 5.0, 2048, dtype=torch.float32)
    np.testing.assert_allclose(float32(d.detach().float()).numpy(), _analytic(d.detach()).numpy(), atol=2e-7)


@pytest.mark.parametrize("dtype,start", [(torch.float32, 0.0), (torch.float64, 0.0), (torch.float64, 0.35)])
def test_compiled_cpu_spline_equals_the_torch_ops(dtype, start):
    table = RadialTable(_analytic, 5.0, 300, dtype=dtype, start=start)
    d = torch.cat((torch.linspace(-0.1, 5.1, 997, dtype=dtype), torch.tensor([0.0, 5.0], dtype=dtype)))
    d.requires_grad_(True)
    weights = torch.randn(len(d), 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    compiled, reference = table(d), table.evaluate(d)
    assert compiled.grad_fn is not None and "Compiled" in type(compiled.grad_fn).__name__
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    np.testing.assert_allclose(compiled.detach().numpy(), reference.detach().numpy(), atol=tol)
    (g1,) = torch.autograd.grad((compiled * weights).sum(), d)
    (g2,) = torch.autograd.grad((reference * weights).sum(), d)
    np.testing.assert_allclose(g1.numpy(), g2.numpy(), atol=10 * tol)
    assert g1[0] == 0 and g1[-3] == 0   # outside [0, cutoff] the spline is clamped


def _si_cell():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(1).normal(scale=0.1, size=atoms.positions.shape)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.02 * np.random.default_rng(2).normal(size=(3, 3))),
                   scale_atoms=True)
    return atoms


def _results(model, atoms, **kwargs):
    atoms = atoms.copy()
    atoms.calc = MatkitCalculator(model, **kwargs)
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


@pytest.mark.parametrize("which", ["tensornet", "tensornet-matpes-pbe", "gaunt_mace", "gaunt_mace_l1",
                                   "gaunt_mace_l1_shared_y"])
def test_tables_agree_with_exact_mlps(which):
    torch.manual_seed(0)
    if which == "tensornet-matpes-pbe":
        model = load_checkpoint(checkpoint_path(which))
    elif which == "tensornet":
        model = matkit.build("tensornet", species=[14], hidden_channels=32, num_rbf=16, cutoff=5.0)
    elif which == "gaunt_mace":   # scalar hidden features: the padded-slot message
        model = matkit.build("gaunt_mace", species=[14], num_channels=16, hidden_lmax=0, cutoff=5.0)
    elif which == "gaunt_mace_l1":  # l = 1 hidden features: the per-edge grid message
        model = matkit.build("gaunt_mace", species=[14], num_channels=8, hidden_lmax=1, cutoff=5.0)
    else:                         # l = 1 hidden features, Y weights shared by the channels
        model = matkit.build("gaunt_mace", species=[14], num_channels=8, hidden_lmax=1, cutoff=5.0,
                             channelwise_y_weights=False)
    atoms = _si_cell()
    e0, f0, s0 = _results(model, atoms, dtype="float64")                      # exact MLPs (float64 default)
    assert model.radial_table_knots == 0
    e1, f1, s1 = _results(model, atoms, dtype="float64", radial_table=2048)
    assert model._radial_tables(torch.zeros(1, dtype=torch.float64)) is not None
    assert abs(e1 - e0) / len(atoms) < 1e-10
    np.testing.assert_allclose(f1, f0, atol=1e-7)
    np.testing.assert_allclose(s1, s0, atol=1e-9)
    assert abs(e1 - e0) > 0 or np.abs(f1 - f0).max() > 0  # the tables were really used

    # float32 default (tables) and float32 exact MLPs: both within float32 inference accuracy of float64
    # (the float32 targets of the matgl parity: 1e-5 eV/atom, 1e-4 eV/Å, 1e-5 eV/Å^3)
    for radial_table in (None, 0):
        e2, f2, s2 = _results(model, atoms, radial_table=radial_table)
        assert model.radial_table_knots == (2048 if radial_table is None else 0)
        assert abs(e2 - e0) / len(atoms) < 1e-5
        np.testing.assert_allclose(f2, f0, atol=1e-4)
        np.testing.assert_allclose(s2, s0, atol=1e-5)


def test_tabulated_forces_are_the_gradient_and_tables_follow_the_weights():
    torch.manual_seed(3)
    model = matkit.build("tensornet", species=[14], hidden_channels=16, num_rbf=8, cutoff=4.0)
    atoms = _si_cell()
    atoms.calc = MatkitCalculator(model, dtype="float64", radial_table=512, skin=0.0)
    forces = atoms.get_forces()
    step = 1e-5
    for a, c in ((0, 0), (5, 2), (17, 1)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, c] += step
        minus.positions[a, c] -= step
        plus.calc = minus.calc = atoms.calc
        fd = -(plus.get_potential_energy() - minus.get_potential_energy()) / (2 * step)
        assert fd == pytest.approx(forces[a, c], abs=1e-7)

    with torch.no_grad():  # an in-place weight change (as an optimiser step) must rebuild the tables
        model.layers[0].radial_mlp[0].weight.mul_(1.5)
    atoms.calc.reset()
    changed = atoms.get_potential_energy()
    exact = _results(model, atoms, dtype="float64")[0]
    assert abs(changed - exact) / len(atoms) < 1e-9

    model.train()
    assert model._radial_tables(torch.zeros(1, dtype=torch.float64)) is None
    model.eval()
    model.layers[0].radial_mlp[0].weight.requires_grad_(True)     # trainable weights: never tabulated
    assert model._radial_tables(torch.zeros(1, dtype=torch.float64)) is None


def test_a_model_with_built_tables_still_pickles_and_rebuilds_them():
    import pickle

    torch.manual_seed(4)
    model = matkit.build("tensornet", species=[14], hidden_channels=8, num_rbf=4, cutoff=4.0)
    atoms = _si_cell()
    energy = _results(model, atoms)[0]                       # float32 default: tables built and cached
    assert "_radial_table_cache" in model.__dict__
    copy = pickle.loads(pickle.dumps(model))                 # e.g. a process pool or torch.save(model)
    assert "_radial_table_cache" not in copy.__dict__
    assert _results(copy, atoms)[0] == pytest.approx(energy, abs=1e-6)
    assert "_radial_table_cache" in copy.__dict__
