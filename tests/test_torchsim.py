"""torch-sim interface: batched outputs equal the ASE calculator's on each structure; torch-sim's own checks and
its batched FIRE relaxation work with it.

Stress convention: torch-sim's stress is ASE's (1/V dE/d(strain), tensile positive, as a 3x3 tensor); its cell
optimisers turn it into forces with ``virial = -V * (stress + pressure)``, the formula of ASE's cell filters.
"""
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.stress import voigt_6_to_full_3x3_stress

from matkit.calculator import MatkitCalculator

ts = pytest.importorskip("torch_sim")
from matkit.torchsim import MatkitTorchSimModel  # noqa: E402

NAME = "tensornet-matpes-pbe"
CPU = torch.device("cpu")


def strained(atoms, deformation, rattle, seed):
    """``atoms`` with its cell multiplied by ``deformation`` (atoms follow) and rattled by ``rattle`` Å."""
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell.array @ np.asarray(deformation), scale_atoms=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def calc():
    return MatkitCalculator.from_pretrained(NAME, dtype="float64")


@pytest.fixture(scope="module")
def model():
    return MatkitTorchSimModel(NAME, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def structures():
    triclinic = [[1.03, 0.04, -0.02], [0.01, 0.97, 0.05], [0.03, -0.02, 1.01]]  # not symmetric: cell != cell.T
    return [
        strained(bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1)), np.eye(3), 0.05, 1),  # 16 atoms
        strained(bulk("MgO", "rocksalt", a=4.21, cubic=True), triclinic, 0.05, 2),  # 8 atoms
        strained(bulk("Si", "diamond", a=5.43).repeat((2, 1, 1)), np.eye(3), 0.05, 3),  # 4 atoms, cell < cutoff
    ]


def test_batched_outputs_equal_ase_calculator(model, calc, structures):
    out = model(ts.io.atoms_to_state(structures, CPU, torch.float64))
    assert out["energy"].shape == (3,) and out["forces"].shape == (28, 3) and out["stress"].shape == (3, 3, 3)
    start = 0
    for b, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calc
        n = len(atoms)
        # torch-sim's stress has ASE's sign: only the Voigt -> 3x3 layout changes
        expected_stress = voigt_6_to_full_3x3_stress(atoms.get_stress())
        np.testing.assert_allclose(out["energy"][b].item(), atoms.get_potential_energy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out["forces"][start:start + n].numpy(), atoms.get_forces(), rtol=1e-10,
                                   atol=1e-9)
        np.testing.assert_allclose(out["stress"][b].numpy(), expected_stress, rtol=1e-10, atol=1e-9)
        start += n


def test_float32_matches_float64(model, structures):
    model32 = MatkitTorchSimModel(NAME, device="cpu", dtype=torch.float32)
    out32 = model32(ts.io.atoms_to_state(structures, CPU, torch.float32))
    out64 = model(ts.io.atoms_to_state(structures, CPU, torch.float64))
    assert all(out32[k].dtype == torch.float32 for k in ("energy", "forces", "stress"))
    np.testing.assert_allclose(out32["energy"].double().numpy(), out64["energy"].numpy(), atol=1e-3)
    np.testing.assert_allclose(out32["forces"].double().numpy(), out64["forces"].numpy(), atol=1e-3)
    np.testing.assert_allclose(out32["stress"].double().numpy(), out64["stress"].numpy(), atol=1e-5)


def test_torch_sim_validation(model):
    from torch_sim.models.interface import validate_model_outputs

    validate_model_outputs(model, CPU, torch.float64)


def test_unknown_element_is_refused(model):
    with pytest.raises(ValueError, match="unknown element"):
        model(ts.io.atoms_to_state([bulk("Og", "fcc", a=5.0)], CPU, torch.float64))


def test_batched_fire_relaxation(model, calc):
    start = [
        strained(bulk("Si", "diamond", a=5.43, cubic=True), np.diag([1.03, 0.99, 1.01]), 0.05, 4),
        strained(bulk("NaCl", "rocksalt", a=5.64, cubic=True), [[0.98, 0.02, 0], [0, 1.0, 0], [0, 0, 1.02]], 0.05, 5),
    ]
    relaxed = ts.optimize(start, model, optimizer=ts.frechet_cell_fire, max_steps=500,
                          convergence_fn=ts.generate_force_convergence_fn(0.05, include_cell_forces=True))
    out = model(relaxed)
    for b, (before, after) in enumerate(zip(start, ts.io.state_to_atoms(relaxed))):
        before = before.copy()
        before.calc = calc
        after.calc = calc
        assert np.linalg.norm(after.get_forces(), axis=1).max() < 0.05
        # the cell relaxed too (Frechet cell force ~ V * stress / n_atoms), so the stress sign was right
        assert np.abs(after.get_stress()).max() * after.get_volume() / len(after) < 0.05
        assert after.get_potential_energy() < before.get_potential_energy() - 1e-3
        np.testing.assert_allclose(out["energy"][b].item(), after.get_potential_energy(), rtol=1e-10, atol=1e-10)
