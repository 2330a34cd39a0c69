"""TensorNet: shared harness (O(3) and SO(3)), torchmd-net equivalence on a stored fixture, model specifics."""
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

import matkit
from matkit.convert.torchmdnet import tensornet_from_torchmdnet_state
from matkit.graph import atoms_to_graph
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


# ---- torchmd-net equivalence ----------------------------------------------------------------------------------
FIXTURE = Path(__file__).parent / "data" / "tensornet_torchmdnet.pt"


def _fixture():
    """Small random torchmd-net 3.1.0 TensorNet (8 channels, 2 layers, 6 rbf, 4.5 Å, max_z 16, std 1.7) and its
    float64 energies / forces (pure-PyTorch ops) on Si64, SiCO64 (periodic) and ethanol, written by
    ``benchmarks/tensornet_vs_torchmdnet.py --small --fixture``."""
    return torch.load(FIXTURE, weights_only=True)


def _evaluate_structures(model, data, dtype=torch.float64):
    for s in data["structures"]:
        atoms = Atoms(numbers=s["numbers"].numpy(), positions=s["positions"].numpy(), cell=s["cell"].numpy(),
                      pbc=s["pbc"].numpy())
        out = model.compute(atoms_to_graph(atoms, model.cutoff, dtype=dtype), forces=True)
        yield s["name"], float(out["energy"][0].detach()), out["forces"].detach().double().numpy()


def test_converted_torchmdnet_fixture_matches():
    """Converted weights reproduce torchmd-net's float64 energies and forces to round-off."""
    data = _fixture()
    model = tensornet_from_torchmdnet_state(data["state_dict"], data["hyper_parameters"], species=data["species"])
    assert model.scale.item() == pytest.approx(1.7)
    for name, energy, forces in _evaluate_structures(model, data):
        ref_e, ref_f = float(data["energy"][name]), data["forces"][name].numpy()
        assert abs(energy - ref_e) < 1e-12 * abs(ref_e), name
        np.testing.assert_allclose(forces, ref_f, rtol=0, atol=1e-12 * np.abs(ref_f).max())


def test_converter_species_subset_and_errors():
    data = _fixture()
    sd, hp = dict(data["state_dict"]), data["hyper_parameters"]
    # species order is free: a permuted species list gives the same energies
    a = tensornet_from_torchmdnet_state(sd, hp, species=[14, 8, 6, 1])
    b = tensornet_from_torchmdnet_state(sd, hp, species=[1, 6, 8, 14])
    ea = [e for _, e, _ in _evaluate_structures(a, data)]
    eb = [e for _, e, _ in _evaluate_structures(b, data)]
    np.testing.assert_allclose(ea, eb, rtol=1e-13)
    with pytest.raises(ValueError, match="max_z"):
        tensornet_from_torchmdnet_state(sd, hp, species=[1, 79])
    with pytest.raises(ValueError, match="mean"):
        tensornet_from_torchmdnet_state(dict(sd, **{"model.mean": torch.tensor(1.0, dtype=torch.float64)}), hp,
                                        species=[1, 14])
    with pytest.raises(ValueError, match="model='graph-network'"):
        tensornet_from_torchmdnet_state(sd, dict(hp, model="graph-network"), species=[1, 14])


def test_matches_torchmdnet():
    """Direct comparison with a live torchmd-net in this interpreter (float64, pure-PyTorch and warp ops)."""
    pytest.importorskip("torchmdnet", reason="torchmd-net is not installed in this interpreter; it lives in its own "
                                              "venv: run benchmarks/tensornet_vs_torchmdnet.py (the stored fixture "
                                              "test above covers CI)")
    from torchmdnet.models.model import create_model

    data = _fixture()
    hp = dict(data["hyper_parameters"])
    reference = create_model(dict(hp, precision=64)).double().eval()
    reference.load_state_dict({k[len("model."):]: v for k, v in data["state_dict"].items()})
    ours = tensornet_from_torchmdnet_state(data["state_dict"], hp, species=data["species"])
    for (name, energy, forces), s in zip(_evaluate_structures(ours, data), data["structures"]):
        z = s["numbers"].long()
        box = s["cell"] if bool(s["pbc"].any()) else None
        ref_e, ref_neg_dy = reference(z, s["positions"].clone(), batch=torch.zeros_like(z), box=box)
        # torchmd-net's warp kernels agree with its own pure-PyTorch ops to ~1e-8 relative in float64
        assert abs(energy - float(ref_e)) < 1e-6 * abs(float(ref_e)), name
        np.testing.assert_allclose(forces, ref_neg_dy.detach().numpy(), rtol=0,
                                   atol=1e-5 * float(ref_neg_dy.abs().max()))


def test_fused_messages_match_autograd_path_and_training_double_backward():
    """Inference uses chunked fused message kernels; training mode uses plain autograd ops. Same numbers, and
    the training path supports a force loss (double backward)."""
    torch.manual_seed(1)
    model = matkit.build("tensornet", species=[1, 6, 8, 14], cutoff=4.0, hidden_channels=8, num_rbf=6).double()
    graph = atoms_to_graph(periodic_structure(seed=3), model.cutoff, dtype=torch.float64)
    fused = model.eval().compute(graph, forces=True, stress=True)
    plain = model.train().compute(graph, forces=True, stress=True, training=True)
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(fused[key].detach().numpy(), plain[key].detach().numpy(), rtol=0, atol=1e-12)
    loss = (plain["forces"] ** 2).sum() + plain["stress"].pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert max(float(g.abs().max()) for g in model.layers[0].parameters()) > 0
