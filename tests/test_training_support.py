"""Support for the training tests: a tiny trainable potential and a reader for real DFT data.

``test_pair_mlp`` is a small many-body potential (radial MLP messages with a cosine cutoff, summed per
atom, then a nonlinear readout) registered here only to exercise the trainer; the real models live in
``matkit/models``. The tests in this file check that it is a valid conservative potential, so the trainer
tests build on something correct.

The data are the mlearn Si training cells (VASP PBE, BSD-3; ``mlearn_elemental/Si/training.json`` of the raw public
data in ``$MATKIT_SHARED_DATA``, default ``../shared/data`` next to the repository), read into ``ase.Atoms`` with
energies, forces and ASE-convention stresses.
"""
from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from matkit.graph import atoms_to_graph, graph_batch_vector
from matkit.models.base import Potential, register, registry

MLEARN_SI = (Path(os.environ.get("MATKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
             / "mlearn_elemental" / "Si" / "training.json")
KBAR_TO_EV_A3 = 0.1 / 160.21766208


class PairMLP(Potential):
    """Radial-MLP message passing with one interaction: ``h_i = emb(Z_i) + sum_j W(r_ij) fc(r_ij) * emb(Z_j)``,
    ``E_i = readout(silu(h_i))``. Gaussian radial basis, cosine cutoff (smooth at ``cutoff``)."""

    def __init__(self, species=(14,), cutoff: float = 3.5, num_basis: int = 8, hidden: int = 16):
        super().__init__(species=species, cutoff=cutoff)
        self.embedding = nn.Embedding(len(self.species), hidden)
        self.radial = nn.Sequential(nn.Linear(num_basis, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.register_buffer("centers", torch.linspace(0.0, cutoff, num_basis))
        self.width = cutoff / num_basis

    def raw_atomic_energies(self, graph, species, edge_vec):
        src, dst = graph.edge_index[0], graph.edge_index[1]
        r = edge_vec.norm(dim=-1)
        basis = torch.exp(-((r[:, None] - self.centers) / self.width) ** 2)
        fc = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0)
        h0 = self.embedding(species)
        messages = self.radial(basis) * fc[:, None] * h0[src]
        h = h0 + torch.zeros_like(h0).index_add(0, dst, messages)
        return self.readout(nn.functional.silu(h)).squeeze(-1)


if "test_pair_mlp" not in registry:
    register("test_pair_mlp")(PairMLP)
PairMLP = registry["test_pair_mlp"]


MLEARN_SI_H5 = Path(__file__).resolve().parent.parent / "datasets" / "mlearn_si.h5"


@lru_cache(maxsize=1)
def _mlearn_records():
    return json.loads(MLEARN_SI.read_text())


def _records_from_json(groups):
    """mlearn JSON records -> (group, Atoms) converted here, independently of matkit's converters."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    for rec in _mlearn_records():
        if rec["group"] not in groups:
            continue
        s = rec["structure"]
        atoms = Atoms(symbols=[site["species"][0]["element"] for site in s["sites"]],
                      positions=[site["xyz"] for site in s["sites"]], cell=s["lattice"]["matrix"], pbc=True)
        virial = np.asarray(rec["outputs"]["virial_stress"], dtype=float)  # xx yy zz xy yz xz, kBar, VASP sign
        stress = -KBAR_TO_EV_A3 * virial[[0, 1, 2, 4, 5, 3]]                # -> xx yy zz yz xz xy, eV/Å^3
        atoms.calc = SinglePointCalculator(atoms, energy=float(rec["outputs"]["energy"]),
                                           forces=np.asarray(rec["outputs"]["forces"], dtype=float), stress=stress)
        yield rec["group"], atoms


def _records_from_bundled_h5(groups):
    """The same cells from the bundled datasets/mlearn_si.h5 (used where ../shared/data is not mounted)."""
    import h5py
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from matkit.data.hdf5 import FrameFile

    with h5py.File(MLEARN_SI_H5, "r") as h5:
        frame_groups = [g.decode() if isinstance(g, bytes) else str(g) for g in h5["frames/groups"][:]]
    frames = FrameFile(str(MLEARN_SI_H5))
    for k, group in enumerate(frame_groups):
        if group not in groups:
            continue
        a = frames.read_arrays(k)
        atoms = Atoms(numbers=a["atomic_numbers"], positions=a["positions"], cell=a["cell"], pbc=a["pbc"])
        atoms.calc = SinglePointCalculator(atoms, energy=float(a["energy"]), forces=a["forces"], stress=a["stress"])
        yield group, atoms


def mlearn_si_atoms(n: int, groups=("AIMD-NVT", "Elastic", "Vacancy")):
    """The first ``n`` Si cells of the listed groups (round-robin), with a SinglePointCalculator holding
    energy (eV), forces (eV/Å) and stress (eV/Å^3, ASE Voigt order, tensile positive)."""
    records = _records_from_json(groups) if MLEARN_SI.exists() else _records_from_bundled_h5(groups)
    by_group = {g: [] for g in groups}
    for group, atoms in records:
        by_group[group].append(atoms)
    available = sum(len(v) for v in by_group.values())
    if n > available:
        raise ValueError(f"only {available} Si cells in the groups {groups}, {n} requested")
    images = []
    k = 0
    while len(images) < n:
        for g in groups:
            if k < len(by_group[g]) and len(images) < n:
                images.append(by_group[g][k])
        k += 1
    return images


def mlearn_si_graphs(n: int, cutoff: float = 3.5, dtype=torch.float64):
    graphs = []
    for atoms in mlearn_si_atoms(n):
        graphs.append(atoms_to_graph(
            atoms, cutoff, dtype=dtype,
            energy=torch.tensor([atoms.get_potential_energy()], dtype=torch.float64),
            forces=torch.as_tensor(atoms.get_forces(), dtype=dtype),
            stress=torch.as_tensor(atoms.get_stress(), dtype=dtype).reshape(1, 6)))
    return graphs


def config_with(defaults: dict, **sections):
    """A validated training config: ``defaults`` ({section: {key: value}}) with each of ``sections`` updated in."""
    from matkit.training import config_from_dict

    cfg = {key: dict(value) for key, value in defaults.items()}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return config_from_dict(cfg)


# ---- checks of the test potential itself ------------------------------------------------------------------------
def test_pair_mlp_forces_and_stress_match_finite_differences():
    torch.manual_seed(0)
    model = PairMLP(cutoff=3.5).double()
    atoms = mlearn_si_atoms(1)[0]
    atoms.rattle(0.05, seed=1)
    graph = atoms_to_graph(atoms, 3.5, dtype=torch.float64)
    out = model(graph, forces=True, stress=True)
    def energy(a):
        return float(model(atoms_to_graph(a, 3.5, dtype=torch.float64), forces=False)["energy"].detach())

    h = 1e-5
    for atom, axis in [(0, 0), (5, 2), (17, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        fd = -(energy(plus) - energy(minus)) / (2 * h)
        assert abs(fd - float(out["forces"][atom, axis])) < 1e-7
    # stress (1/V) dE/d(eps_xy) by a symmetric strain of cell and positions
    eps = np.zeros((3, 3))
    eps[0, 1] = eps[1, 0] = 0.5e-5
    strained = []
    for sign in (1, -1):
        a = atoms.copy()
        a.set_cell(a.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
        strained.append(energy(a))
    fd = (strained[0] - strained[1]) / (2 * 1e-5) / atoms.get_volume()
    assert abs(fd - float(out["stress"][0, 0, 1])) < 1e-7


def test_pair_mlp_energy_is_smooth_at_cutoff():
    torch.manual_seed(0)
    model = PairMLP(species=[14], cutoff=3.0).double()
    from ase import Atoms

    e = []
    for d in (3.0 - 1e-7, 3.0 + 1e-7):
        g = atoms_to_graph(Atoms("Si2", positions=[[0, 0, 0], [d, 0, 0]]), 3.0, dtype=torch.float64)
        e.append(float(model(g, forces=False)["energy"]))
    assert abs(e[0] - e[1]) < 1e-9
    assert graph_batch_vector(g).shape == (2,)
