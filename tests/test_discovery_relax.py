"""Relaxation: the ASE path follows the protocol; the batched relaxer reproduces ASE FIRE + FrechetCellFilter.

The model is the Lennard-Jones potential with a smooth cutoff (LJ is a poor physical model for these MP
crystals, but it is an exact, smooth potential: both paths must find the same minima step for step).
"""
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

import matkit
from matkit.calculator import MatkitCalculator
from matkit.discovery.batched_relax import BatchedRelaxer
from matkit.discovery.io import read_structures
from matkit.discovery.relax import RelaxSettings, atoms_from_dict, relax_atoms

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "discovery"
LJ = dict(sigma=2.0, epsilon=0.05, rc=5.0, smooth=True)


@pytest.fixture(scope="module")
def structures():
    pairs = read_structures(FIXTURES / "mp20-mini.csv")
    out = [atoms for _, atoms in pairs]
    # two distorted cells with more atoms, so the pool holds structures of different sizes
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        atoms = bulk("Cu", "fcc", a=3.2).repeat((2, 2, 1))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.05 * rng.normal(size=(3, 3))), scale_atoms=True)
        atoms.rattle(0.05, seed=seed)
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def model():
    return matkit.build("lj", **LJ)


@pytest.fixture(scope="module")
def ase_results(structures, model):
    calc = MatkitCalculator(model, dtype="float64", skin=0.0)
    return [relax_atoms(a, calc) for a in structures]


def test_ase_path_matches_plain_ase_fire(structures):
    """relax_atoms == FIRE(FrechetCellFilter(atoms)).run(fmax=0.05, steps=500) with ASE's own LJ."""
    calc = AseLJ(sigma=LJ["sigma"], epsilon=LJ["epsilon"], rc=LJ["rc"], smooth=True)
    atoms = structures[-1]
    ours = relax_atoms(atoms, calc)
    work = atoms.copy()
    work.calc = AseLJ(sigma=LJ["sigma"], epsilon=LJ["epsilon"], rc=LJ["rc"], smooth=True)
    opt = FIRE(FrechetCellFilter(work), logfile=None)
    converged = opt.run(fmax=0.05, steps=500)
    assert ours.n_steps == opt.nsteps and ours.converged == converged
    assert ours.energy == pytest.approx(work.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(ours.atoms.cell.array, work.cell.array, atol=1e-10)
    assert np.allclose(atoms.positions, structures[-1].positions)  # input untouched
    # record round trip
    back = atoms_from_dict(ours.to_record()["structure"])
    np.testing.assert_allclose(back.positions, ours.atoms.positions)


def test_batched_equals_ase_path(structures, model, ase_results):
    results = BatchedRelaxer(model, dtype="float64").relax(structures)
    for ref, res, atoms in zip(ase_results, results, structures):
        assert ref.converged and res.converged
        assert abs(ref.energy - res.energy) / len(atoms) < 1e-4  # the target; in practice ~1e-13
        assert abs(ref.energy - res.energy) / len(atoms) < 1e-9
        assert res.n_steps == ref.n_steps
        np.testing.assert_allclose(res.atoms.cell.array, ref.atoms.cell.array, atol=1e-6)
        np.testing.assert_allclose(res.atoms.positions, ref.atoms.positions, atol=1e-6)
    assert max(r.n_steps for r in results) > 20  # real relaxations, not already-converged inputs


def test_pool_swapping_and_no_skin_do_not_change_results(structures, model, ase_results):
    """A pool of at most 8 atoms forces constant swapping; skin=0 rebuilds the lists every step."""
    relaxer = BatchedRelaxer(model, dtype="float64", max_atoms=8, skin=0.0)
    order, results = [], [None] * len(structures)
    for index, result in relaxer.irelax(structures):
        order.append(index)
        results[index] = result
    assert sorted(order) == list(range(len(structures)))
    for ref, res, atoms in zip(ase_results, results, structures):
        assert abs(ref.energy - res.energy) / len(atoms) < 1e-9 and res.n_steps == ref.n_steps


def test_max_steps_and_positions_only(structures, model):
    calc = MatkitCalculator(model, dtype="float64", skin=0.0)
    few = RelaxSettings(max_steps=7)
    atoms = structures[-2]
    ref = relax_atoms(atoms, calc, few)
    (res,) = BatchedRelaxer(model, few, dtype="float64").relax([atoms])
    assert ref.n_steps == res.n_steps == 7 and not ref.converged and not res.converged
    assert res.energy == pytest.approx(ref.energy, abs=1e-10)
    fixed = RelaxSettings(relax_cell=False)
    ref = relax_atoms(atoms, calc, fixed)
    (res,) = BatchedRelaxer(model, fixed, dtype="float64").relax([atoms])
    assert res.n_steps == ref.n_steps and res.energy == pytest.approx(ref.energy, abs=1e-10)
    np.testing.assert_allclose(res.atoms.cell.array, atoms.cell.array, atol=0)


def test_float32_model_stays_close(structures, model, ase_results):
    results = BatchedRelaxer(model, dtype="float32").relax(structures[:4])
    for ref, res, atoms in zip(ase_results, results, structures):
        assert abs(ref.energy - res.energy) / len(atoms) < 1e-4


def test_bad_input_errors(model):
    relaxer = BatchedRelaxer(model)
    from ase import Atoms

    with pytest.raises(ValueError, match="periodic in all three directions"):
        relaxer.relax([Atoms("H2", positions=[[0, 0, 0], [0, 0, 1]])])
    with pytest.raises(ValueError, match="no atoms"):
        relaxer.relax([Atoms(cell=np.eye(3), pbc=True)])
    species_model = matkit.build("lj", species=[29], **LJ)
    with pytest.raises(ValueError, match="unknown element"):
        BatchedRelaxer(species_model).relax([bulk("Al", "fcc", a=4.0)])
    with pytest.raises(ValueError, match="max_steps"):
        RelaxSettings(max_steps=-1)
