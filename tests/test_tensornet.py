"""TensorNet: shared harness (O(3) and SO(3)), torchmd-net equivalence on a stored fixture, model specifics."""
import numpy as np
import pytest
import torch

import matkit
from model_harness import DTYPES, ModelHarness, periodic_structure, random_rotation


class TestTensorNet(ModelHarness):
    model_name = "tensornet"
    hparams = dict(hidden_channels=16, num_layers=2, num_rbf=8)


class TestTensorNetSO3(ModelHarness):
    """SO(3) variant: invariant under proper rotations only (plain product Y M mixes parities)."""

    model_name = "tensornet"
    hparams = dict(hidden_channels=16, num_layers=2, num_rbf=8, group="SO(3)")

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("reflect", [False])
    def test_rotation_and_reflection(self, dtype, reflect):
        super().test_rotation_and_reflection(dtype, reflect)

    def test_reflection_changes_energy(self):
        """The SO(3) model is chiral: a mirror image has a different energy (the O(3) one does not)."""
        atoms = periodic_structure(seed=4)
        mirrored = atoms.copy()
        mirrored.positions[:, 0] *= -1
        mirrored.cell = atoms.cell.array * np.array([-1.0, 1.0, 1.0])
        energies = {}
        for group in ("SO(3)", "O(3)"):
            torch.manual_seed(0)
            model = matkit.build("tensornet", species=[1, 6, 8, 14], cutoff=self.cutoff, group=group,
                                 **{k: v for k, v in self.hparams.items() if k != "group"}).double()
            energies[group] = [self.evaluate(model, a, torch.float64)["energy"][0] for a in (atoms, mirrored)]
        so3, o3 = energies["SO(3)"], energies["O(3)"]
        assert abs(o3[0] - o3[1]) < 1e-10 * max(1.0, abs(o3[0]))
        # random weights give a small chirality (~4e-7 eV here), far above the float64 noise floor (<1e-12)
        assert abs(so3[0] - so3[1]) > 1e-8 * max(1.0, abs(so3[0]))
