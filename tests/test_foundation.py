"""Graph construction, calculator behaviour, checkpoints and bad-input errors."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.optimize import BFGS, FIRE, LBFGS
from ase.units import fs
from pymatgen.core import Lattice, Molecule, Structure

import matkit
from matkit.calculator import MatkitCalculator
from matkit.checkpoint import CheckpointError
from matkit.graph import atoms_to_graph, batch_graphs, edge_vectors, graph_batch_vector, pymatgen_to_graph

LJ = dict(sigma=2.3, epsilon=0.1, rc=6.0, smooth=True)


def lj_model():
    return matkit.build("lj", **LJ)


# ---- graphs ------------------------------------------------------------------------------------------------------
def test_graph_edges_are_neighbour_minus_centre_and_match_ase_distances():
    from ase.neighborlist import neighbor_list as ase_nl

    atoms = bulk("NaCl", "rocksalt", a=5.6).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=0)
    graph = atoms_to_graph(atoms, 4.5, dtype=torch.float64)
    vec = edge_vectors(graph.pos, graph.cell, graph.edge_index, graph.shifts, graph_batch_vector(graph))
    i, j, D = ase_nl("ijD", atoms, 4.5)
    ours = sorted(zip(graph.edge_index[1].tolist(), graph.edge_index[0].tolist(), np.round(vec.numpy(), 9).tolist()))
    ref = sorted(zip(i.tolist(), j.tolist(), np.round(D, 9).tolist()))
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a[:2] == b[:2]
        np.testing.assert_allclose(a[2], b[2], atol=1e-8)


def test_pymatgen_structure_and_molecule_give_same_graph_as_ase():
    lattice = Lattice.from_parameters(4.1, 4.3, 5.0, 80, 95, 100)
    structure = Structure(lattice, ["Si", "O", "O"], [[0, 0, 0], [0.25, 0.3, 0.1], [0.6, 0.7, 0.55]])
    from pymatgen.io.ase import AseAtomsAdaptor

    g1 = pymatgen_to_graph(structure, 4.0, dtype=torch.float64)
    g2 = atoms_to_graph(AseAtomsAdaptor.get_atoms(structure), 4.0, dtype=torch.float64)
    assert torch.equal(g1.edge_index, g2.edge_index) and torch.allclose(g1.pos, g2.pos)
    mol = Molecule(["C", "O"], [[0, 0, 0], [1.13, 0, 0]])
    g3 = pymatgen_to_graph(mol, 3.0)
    assert g3.edge_index.shape == (2, 2) and not g3.pbc.any()


def test_batching_offsets_edges_and_stacks_cells():
    a, b = bulk("Cu", "fcc", a=3.6), molecule("H2O")
    ga, gb = atoms_to_graph(a, 3.0), atoms_to_graph(b, 3.0)
    batch = batch_graphs([ga, gb])
    assert batch.cell.shape == (2, 3, 3) and batch.pbc.shape == (2, 3)
    assert batch.edge_index[:, ga.edge_index.shape[1]:].min() == 1  # second graph's edges shifted by 1 atom
    assert batch.batch.tolist() == [0, 1, 1, 1]


def test_batched_lj_equals_single():
    model = lj_model().double()
    structures = [bulk("Ar", "fcc", a=5.3) * (2, 2, 1), molecule("CH4"), fcc111("Ar", size=(2, 2, 3), a=5.3, vacuum=4)]
    for s in structures:
        s.rattle(0.05, seed=1)
    graphs = [atoms_to_graph(s, model.cutoff, dtype=torch.float64) for s in structures]
    out = model(batch_graphs(graphs), forces=True)
    for k, g in enumerate(graphs):
        ref = model(g, forces=True)
        assert abs(out["energy"][k].item() - ref["energy"][0].item()) < 1e-12
    forces = torch.cat([model(g)["forces"] for g in graphs])
    assert torch.allclose(out["forces"], forces, atol=1e-12)


# ---- calculator --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", [FIRE, BFGS, LBFGS])
def test_relaxation_with_frechet_cell_filter_reaches_zero_stress(optimizer):
    atoms = bulk("Ar", "fcc", a=3.75) * (2, 2, 2)  # expanded by 6% from the minimum (a = 3.55 Å)
    atoms.rattle(0.02, seed=3)
    atoms.calc = MatkitCalculator(lj_model(), dtype="float64")
    cell_filter = FrechetCellFilter(atoms)
    opt = optimizer(cell_filter, logfile=None)
    assert opt.run(fmax=1e-4, steps=300)
    # converged in the filter's generalized forces: atomic forces (in the deformed frame) and virial / N
    generalized = cell_filter.get_forces()
    assert np.linalg.norm(generalized, axis=1).max() < 1e-4
    assert np.abs(atoms.get_stress()).max() * atoms.get_volume() / len(atoms) < 1e-4
    # independent check: ASE's own LJ sees the relaxed structure as an equilibrium too
    from ase.calculators.lj import LennardJones

    ref = atoms.copy()
    ref.calc = LennardJones(**LJ)
    assert np.abs(ref.get_forces()).max() < 2e-4 and np.abs(ref.get_stress()).max() * ref.get_volume() < 1e-3
    d_nn = (4 * atoms.get_volume() / len(atoms)) ** (1 / 3) / np.sqrt(2)
    assert 1.07 < d_nn / LJ["sigma"] < 1.11  # infinite-range fcc LJ: d_nn = 1.0902 sigma


def test_md_integrators_run_and_verlet_list_is_reused():
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    atoms.calc = MatkitCalculator(lj_model(), dtype="float32", skin=1.0)
    for dyn in (Langevin(atoms, 2 * fs, temperature_K=60, friction=0.01, fixcm=False),
                NoseHooverChainNVT(atoms, 2 * fs, temperature_K=60, tdamp=50 * fs)):
        dyn.run(20)
    assert np.isfinite(atoms.get_potential_energy())
    assert atoms.calc.neighbors.n_builds < 10


def test_calculator_dtype_and_per_atom_energies_sum():
    atoms = bulk("Ar", "fcc", a=5.3) * (2, 2, 2)
    atoms.rattle(0.1, seed=0)
    atoms.calc = MatkitCalculator(lj_model(), dtype="float32")
    assert abs(atoms.get_potential_energies().sum() - atoms.get_potential_energy()) < 1e-5
    assert atoms.get_potential_energy() == atoms.get_potential_energy(force_consistent=True)
    with pytest.raises(ValueError, match="dtype"):
        MatkitCalculator(lj_model(), dtype="float16")


def test_reference_energies_stay_float64_in_a_float32_model():
    model = lj_model()
    model.atomic_reference_energies[17] = -123456.789012345
    model = model.to(torch.float32)
    assert model.atomic_reference_energies.dtype == torch.float64
    assert model.atomic_reference_energies[17].item() == -123456.789012345
    atoms = Atoms("Ar", positions=[[0, 0, 0]])
    atoms.calc = MatkitCalculator(model, dtype="float32")
    assert atoms.get_potential_energy() == -123456.789012345


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_nan_positions_are_rejected():
    atoms = bulk("Ar", "fcc", a=5.3)
    atoms.positions[0, 1] = np.nan
    atoms.calc = MatkitCalculator(lj_model())
    with pytest.raises(ValueError, match="NaN"):
        atoms.get_potential_energy()
    atoms.positions[0, 1] = np.inf
    with pytest.raises(ValueError, match="inf"):
        atoms_to_graph(atoms, 3.0)


def test_zero_volume_and_singular_cells_are_rejected():
    atoms = Atoms("Ar2", positions=[[0, 0, 0], [1, 1, 1]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True)
    with pytest.raises(ValueError, match="singular|zero"):
        atoms_to_graph(atoms, 3.0)
    atoms = Atoms("Ar", positions=[[0, 0, 0]], cell=np.zeros((3, 3)), pbc=True)
    with pytest.raises(ValueError, match="singular|zero"):
        atoms_to_graph(atoms, 3.0)


@pytest.mark.parametrize("cutoff", [0.0, -1.0, float("nan")])
def test_bad_cutoff_is_rejected(cutoff):
    with pytest.raises(ValueError, match="cutoff"):
        atoms_to_graph(bulk("Ar", "fcc", a=5.3), cutoff)


def test_unknown_element_names_the_element():
    model = matkit.build("lj", species=[18], **LJ)
    atoms = Atoms("ArXe", positions=[[0, 0, 0], [3, 0, 0]])
    atoms.calc = MatkitCalculator(model)
    with pytest.raises(ValueError, match=r"Xe \(Z=54\)"):
        atoms.get_potential_energy()


def test_stress_without_3d_periodicity_is_refused():
    from ase.calculators.calculator import PropertyNotImplementedError

    atoms = molecule("H2O")
    atoms.calc = MatkitCalculator(lj_model())
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


# ---- checkpoints -------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_everything(tmp_path):
    model = matkit.build("lj", species=[18, 36], sigma=3.0, epsilon=0.01, rc=7.0)
    model.atomic_reference_energies.copy_(torch.tensor([-0.05, -0.07], dtype=torch.float64))
    path = matkit.save_checkpoint(model, tmp_path / "lj.pt", metadata={"epochs": 3, "dataset": "none"})
    loaded, payload = matkit.load_checkpoint(path, return_payload=True)
    assert payload["model"] == "lj" and payload["species"] == [18, 36] and payload["cutoff"] == 7.0
    assert payload["units"]["energy"] == "eV" and payload["metadata"]["epochs"] == 3
    assert loaded.hparams == model.hparams
    assert torch.equal(loaded.atomic_reference_energies, model.atomic_reference_energies)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_crafted_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "matkit-checkpoint", "model": "lj", "hparams": {}, "state_dict": {}, "x": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        matkit.load_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


def test_truncated_and_corrupt_checkpoints_are_refused(tmp_path):
    good = matkit.save_checkpoint(lj_model(), tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        matkit.load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt is not a matkit checkpoint: not a zip archive"):
        matkit.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        matkit.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a matkit checkpoint"):
        matkit.load_checkpoint(tmp_path / "other.pt")


def test_cli_demo_runs(tmp_path, capsys):
    from matkit.cli import main

    assert main(["demo", "--nvt-steps", "20", "--nve-steps", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "drift" in out and (tmp_path / "demo_nve.png").is_file()
