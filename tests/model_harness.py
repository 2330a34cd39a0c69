"""Shared tests every matkit potential must pass.

Use it by subclassing in a model's test module (the class name must start with ``Test``)::

    from model_harness import ModelHarness

    class TestMyModel(ModelHarness):
        model_name = "mymodel"
        hparams = dict(hidden=16, ...)       # small and fast; ``species`` and ``cutoff`` are filled in

Every test runs in float64 and float32 (``dtype`` parameter). Invariance / equivariance, finite-difference
forces and stress, cutoff smoothness, batched-vs-single, isolated atoms, permutation, periodic images and the
checkpoint round trip are checked against independent references (rotated/permuted copies, central
differences), never against the model itself on the same input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import matkit
from matkit.graph import atoms_to_graph, batch_graphs

SPECIES = [1, 6, 8, 14]
DTYPES = [torch.float64, torch.float32]


def random_rotation(seed: int, reflect: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if reflect else q


def periodic_structure(seed: int = 0) -> Atoms:
    """8-atom diamond Si cell with two substitutions, rattled, in a strained triclinic cell."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.numbers[[1, 5]] = [6, 8]
    rng = np.random.default_rng(seed)
    cell = atoms.cell.array @ (np.eye(3) + 0.06 * rng.normal(size=(3, 3)))
    atoms.set_cell(cell, scale_atoms=True)
    atoms.positions += 0.15 * rng.normal(size=atoms.positions.shape)
    return atoms


def molecule(seed: int = 1) -> Atoms:
    rng = np.random.default_rng(seed)
    positions = rng.uniform(0, 3.0, size=(7, 3))
    return Atoms(numbers=[6, 1, 1, 8, 1, 14, 6], positions=positions)


class ModelHarness:
    model_name: str = ""
    hparams: dict = {}
    cutoff: float = 4.0
    #: float64 tolerance for invariance/equivariance (models with grid nonlinearities may document a larger one)
    equivariance_atol: float = 1e-10
    fd_rtol: float = 1e-6
    seed: int = 0

    # ---- helpers --------------------------------------------------------------------------------------------
    def make_model(self, dtype=torch.float64):
        torch.manual_seed(self.seed)
        model = matkit.build(self.model_name, species=SPECIES, cutoff=self.cutoff, **self.hparams)
        # non-trivial output transform so that scale/shift/reference energies are exercised
        model.scale.fill_(1.7)
        model.shift.fill_(-0.3)
        model.atomic_reference_energies.copy_(torch.tensor([-1.1, -2.2, -3.3, -4.4], dtype=torch.float64))
        return model.to(dtype).eval()

    def evaluate(self, model, atoms, dtype, stress=None):
        stress = atoms.pbc.all() if stress is None else stress
        graph = atoms_to_graph(atoms, model.cutoff, dtype=dtype)
        out = model(graph, forces=True, stress=stress)
        return {k: v.detach().double().numpy() for k, v in out.items()}

    def atol(self, dtype, scale=1.0):
        return self.equivariance_atol * scale if dtype == torch.float64 else 2e-4 * scale

    # ---- tests ----------------------------------------------------------------------------------------------
    def test_forces_nontrivial(self):
        model = self.make_model()
        out = self.evaluate(model, periodic_structure(), torch.float64)
        assert np.abs(out["forces"]).max() > 1e-4, "forces vanish: the harness would test nothing"
        assert np.abs(out["stress"]).max() > 1e-6

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("reflect", [False, True])
    def test_rotation_and_reflection(self, dtype, reflect):
        model = self.make_model(dtype)
        rot = random_rotation(3, reflect)
        for atoms in (periodic_structure(), molecule()):
            ref = self.evaluate(model, atoms, dtype)
            turned = atoms.copy()
            turned.positions = atoms.positions @ rot.T
            turned.cell = atoms.cell.array @ rot.T
            out = self.evaluate(model, turned, dtype)
            scale = max(1.0, np.abs(ref["energy"]).max())
            np.testing.assert_allclose(out["energy"], ref["energy"], rtol=0, atol=self.atol(dtype, scale))
            np.testing.assert_allclose(out["forces"], ref["forces"] @ rot.T, rtol=0,
                                       atol=self.atol(dtype, max(1.0, np.abs(ref["forces"]).max())))
            if "stress" in ref:
                np.testing.assert_allclose(out["stress"][0], rot @ ref["stress"][0] @ rot.T, rtol=0,
                                           atol=self.atol(dtype, max(1.0, np.abs(ref["stress"]).max())))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_translation_permutation_and_wrapping(self, dtype):
        model = self.make_model(dtype)
        atoms = periodic_structure()
        ref = self.evaluate(model, atoms, dtype)
        moved = atoms.copy()
        moved.positions += np.array([0.37, -1.3, 2.1])
        moved.positions[2] += atoms.cell[0] - 2 * atoms.cell[2]  # another periodic image of atom 2
        perm = np.random.default_rng(0).permutation(len(atoms))
        moved = moved[perm]
        out = self.evaluate(model, moved, dtype)
        scale = max(1.0, np.abs(ref["energy"]).max())
        np.testing.assert_allclose(out["energy"], ref["energy"], rtol=0, atol=self.atol(dtype, scale))
        np.testing.assert_allclose(out["energies"], ref["energies"][perm], rtol=0, atol=self.atol(dtype, scale))
        np.testing.assert_allclose(out["forces"], ref["forces"][perm], rtol=0,
                                   atol=self.atol(dtype, max(1.0, np.abs(ref["forces"]).max())))
        np.testing.assert_allclose(out["stress"], ref["stress"], rtol=0,
                                   atol=self.atol(dtype, max(1.0, np.abs(ref["stress"]).max())))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_supercell_is_extensive(self, dtype):
        model = self.make_model(dtype)
        atoms = periodic_structure()
        ref = self.evaluate(model, atoms, dtype)
        big = atoms.repeat((2, 1, 1))
        out = self.evaluate(model, big, dtype)
        scale = max(1.0, np.abs(out["energy"]).max())
        np.testing.assert_allclose(out["energy"], 2 * ref["energy"], rtol=0, atol=self.atol(dtype, scale))
        np.testing.assert_allclose(out["forces"], np.concatenate([ref["forces"]] * 2), rtol=0,
                                   atol=self.atol(dtype, max(1.0, np.abs(ref["forces"]).max())))
        np.testing.assert_allclose(out["stress"], ref["stress"], rtol=0,
                                   atol=self.atol(dtype, max(1.0, np.abs(ref["stress"]).max())))

    def test_forces_and_stress_match_finite_differences(self):
        model = self.make_model(torch.float64)
        atoms = periodic_structure(seed=2)
        out = self.evaluate(model, atoms, torch.float64)
        h = 1e-5

        def energy(a):
            return self.evaluate(model, a, torch.float64, stress=False)["energy"][0]

        fd_forces = np.zeros((len(atoms), 3))
        for a in range(len(atoms)):
            for k in range(3):
                plus, minus = atoms.copy(), atoms.copy()
                plus.positions[a, k] += h
                minus.positions[a, k] -= h
                fd_forces[a, k] = -(energy(plus) - energy(minus)) / (2 * h)
        np.testing.assert_allclose(out["forces"], fd_forces, rtol=0,
                                   atol=self.fd_rtol * max(1.0, np.abs(fd_forces).max()))
        fd_stress = np.zeros((3, 3))
        volume = atoms.get_volume()
        for k in range(3):
            for m in range(3):
                eps = np.zeros((3, 3))
                eps[k, m] = eps[m, k] = h / 2 if k != m else h
                strained = []
                for sign in (1, -1):
                    s = atoms.copy()
                    s.set_cell(atoms.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
                    strained.append(energy(s))
                fd_stress[k, m] = (strained[0] - strained[1]) / (2 * h) / volume
        np.testing.assert_allclose(out["stress"][0], fd_stress, rtol=0,
                                   atol=self.fd_rtol * max(1.0, np.abs(fd_stress).max()))

    def test_smooth_at_cutoff(self):
        """Energy and force of a dimer go continuously to their isolated-atom values at the cutoff."""
        model = self.make_model(torch.float64)
        rc = model.cutoff

        def dimer(r):
            atoms = Atoms(numbers=[14, 8], positions=[[0, 0, 0], [r, 0, 0]])
            return self.evaluate(model, atoms, torch.float64)

        far = dimer(rc + 1e-3)
        assert np.abs(far["forces"]).max() == 0.0
        near = dimer(rc - 1e-3)
        assert abs(near["energy"][0] - far["energy"][0]) < 1e-6
        assert np.abs(near["forces"]).max() < 1e-4
        # and the energy really depends on distance inside the cutoff
        assert abs(dimer(0.7 * rc)["energy"][0] - far["energy"][0]) > 1e-6

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_batched_equals_single(self, dtype):
        model = self.make_model(dtype)
        structures = [periodic_structure(0), molecule(1), periodic_structure(5).repeat((1, 2, 1))]
        graphs = [atoms_to_graph(a, model.cutoff, dtype=dtype) for a in structures]
        out = model(batch_graphs(graphs), forces=True, stress=False)
        forces = np.split(out["forces"].detach().double().numpy(), np.cumsum([len(a) for a in structures])[:-1])
        for k, atoms in enumerate(structures):
            ref = self.evaluate(model, atoms, dtype, stress=False)
            scale = max(1.0, abs(ref["energy"][0]))
            assert abs(out["energy"][k].item() - ref["energy"][0]) <= self.atol(dtype, scale)
            np.testing.assert_allclose(forces[k], ref["forces"], rtol=0,
                                       atol=self.atol(dtype, max(1.0, np.abs(ref["forces"]).max())))

    def test_isolated_atoms_and_no_edges(self):
        model = self.make_model(torch.float64)
        single = Atoms(numbers=[8], positions=[[0.0, 0.0, 0.0]])
        far_apart = Atoms(numbers=[8, 14, 1], positions=[[0, 0, 0], [3 * self.cutoff, 0, 0], [0, 4 * self.cutoff, 0]])
        e_single = {z: self.evaluate(model, Atoms(numbers=[z], positions=[[0, 0, 0]]), torch.float64)["energy"][0]
                    for z in (8, 14, 1)}
        out = self.evaluate(model, far_apart, torch.float64)
        assert np.isfinite(out["energy"]).all()
        np.testing.assert_allclose(out["energy"][0], sum(e_single.values()), rtol=0, atol=1e-10)
        assert np.abs(out["forces"]).max() == 0.0
        one = self.evaluate(model, single, torch.float64)
        assert one["forces"].shape == (1, 3) and np.isfinite(one["energy"]).all()

    def test_float32_close_to_float64(self):
        atoms = periodic_structure()
        e64 = self.evaluate(self.make_model(torch.float64), atoms, torch.float64)
        e32 = self.evaluate(self.make_model(torch.float32), atoms, torch.float32)
        assert abs(e32["energy"][0] - e64["energy"][0]) < 1e-4 * max(1.0, abs(e64["energy"][0]))
        np.testing.assert_allclose(e32["forces"], e64["forces"], rtol=0,
                                   atol=1e-3 * max(1.0, np.abs(e64["forces"]).max()))

    def test_checkpoint_round_trip(self, tmp_path):
        model = self.make_model(torch.float64)
        path = matkit.save_checkpoint(model, tmp_path / "model.pt", metadata={"note": "harness"})
        loaded = matkit.load_checkpoint(path).double()
        atoms = periodic_structure()
        a, b = self.evaluate(model, atoms, torch.float64), self.evaluate(loaded, atoms, torch.float64)
        assert a["energy"][0] == b["energy"][0]
        np.testing.assert_array_equal(a["forces"], b["forces"])

    def test_unknown_element_is_rejected(self):
        model = self.make_model(torch.float64)
        atoms = Atoms(numbers=[14, 79], positions=[[0, 0, 0], [2.0, 0, 0]])
        with pytest.raises(ValueError, match="Au"):
            self.evaluate(model, atoms, torch.float64)
