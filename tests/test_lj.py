"""The Lennard-Jones potential through the whole pipeline against ase.calculators.lj.LennardJones."""

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk, molecule
from ase.calculators.lj import LennardJones as AseLJ
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import thermalize_momenta

import matkit
from matkit.calculator import MatkitCalculator
from model_harness import ModelHarness

PARAMS = dict(sigma=2.1, epsilon=0.17, rc=5.8)


def triclinic_cu(seed=0):
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.61).repeat((2, 2, 2))
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.08 * rng.normal(size=(3, 3))), scale_atoms=True)
    atoms.rattle(0.1, seed=seed)
    return atoms


def cluster():
    atoms = molecule("CH3CH2OH")
    atoms.positions *= 1.4
    return atoms


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("make", [triclinic_cu, cluster])
def test_matches_ase_lennard_jones(smooth, make):
    ours, ref = make(), make()
    ours.calc = MatkitCalculator(matkit.build("lj", smooth=smooth, **PARAMS), dtype="float64")
    ref.calc = AseLJ(smooth=smooth, **PARAMS)
    assert abs(ours.get_potential_energy() - ref.get_potential_energy()) < 1e-10
    np.testing.assert_allclose(ours.get_forces(), ref.get_forces(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.get_potential_energies(), ref.get_potential_energies(), rtol=0, atol=1e-10)
    if ours.pbc.all():
        np.testing.assert_allclose(ours.get_stress(), ref.get_stress(), rtol=0, atol=1e-10)
        # and against finite differences of the energy (ASE's numerical stress)
        np.testing.assert_allclose(ours.get_stress(), ours.calc.calculate_numerical_stress(ours, d=1e-6),
                                   rtol=0, atol=1e-7)
    # central differences: error ~ h^2 |F'''| + eps |E| / h, relative to the force scale
    forces = ours.get_forces()
    np.testing.assert_allclose(forces, ours.calc.calculate_numerical_forces(ours, d=1e-6),
                               rtol=0, atol=1e-7 * max(1.0, np.abs(forces).max()))


def test_float32_calculator_close_to_float64():
    a32, a64 = triclinic_cu(), triclinic_cu()
    a32.calc = MatkitCalculator(matkit.build("lj", **PARAMS), dtype="float32")
    a64.calc = MatkitCalculator(matkit.build("lj", **PARAMS), dtype="float64")
    assert abs(a32.get_potential_energy() - a64.get_potential_energy()) < 1e-4
    np.testing.assert_allclose(a32.get_forces(), a64.get_forces(), atol=1e-4)


def test_nve_energy_conservation_fcc_argon():
    """64-atom fcc Ar, smooth LJ, float64, 2 fs for 10 ps: drift below 1e-5 eV/atom/ps."""
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
    atoms.calc = MatkitCalculator(matkit.build("lj", sigma=3.405, epsilon=0.0104, rc=8.5,
                                               smooth=True), dtype="float64", skin=1.0)
    thermalize_momenta(atoms, temperature_K=40, rng=np.random.default_rng(0), exact_temperature=True)
    dyn = VelocityVerlet(atoms, timestep=2 * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy() / len(atoms)), interval=25)
    dyn.run(5000)
    t_ps = np.arange(len(energies)) * 25 * 2e-3
    drift = abs(np.polyfit(t_ps, energies, 1)[0])
    assert drift < 1e-5, f"energy drift {drift:.2e} eV/atom/ps"
    assert atoms.calc.neighbors.n_builds < 5000 / 2, "the Verlet list should be reused across steps"


class TestLJHarness(ModelHarness):
    model_name = "lj"
    cutoff = 4.0

    def make_model(self, dtype=torch.float64):
        model = matkit.build("lj", species=[1, 6, 8, 14], sigma=1.6, epsilon=0.2, rc=self.cutoff, smooth=True)
        model.scale.fill_(1.7)
        model.shift.fill_(-0.3)
        model.atomic_reference_energies.copy_(torch.tensor([-1.1, -2.2, -3.3, -4.4], dtype=torch.float64))
        return model.to(dtype).eval()
