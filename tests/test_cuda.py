"""The CUDA path: every model gives the CPU's energy, forces and stress on a GPU (training-mode autograd ops and
the fused inference ops), the calculator runs there, and a training run on the GPU gives a checkpoint that loads on
the CPU with the same predictions.

Skipped where no CUDA device is available (CI has none); on a GPU machine: ``pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

import matkit
from matkit.calculator import MatkitCalculator
from matkit.graph import atoms_to_graph, batch_graphs
from model_harness import SPECIES, molecule, periodic_structure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODELS = {
    "tensornet": dict(hidden_channels=16, num_layers=2, num_rbf=8),
    "escn": dict(num_layers=2, lmax=3, mmax=2, sphere_channels=8, hidden_channels=8, edge_channels=8, num_radial=12,
                 avg_num_neighbors=1.0),
    "faenet": dict(hidden=16, filters=16, num_interactions=2, num_gaussians=12, pg_dim=4, avg_num_neighbors=1.0),
    "gaunt_mace": dict(num_channels=8, max_ell=2, hidden_lmax=2, correlation=3, num_interactions=2, num_bessel=6,
                       radial_mlp=[16, 16], avg_num_neighbors=8.0),
}
#: relative tolerance of GPU vs CPU results (different summation orders; float32 accumulates more rounding)
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _model(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = matkit.build(name, species=SPECIES, cutoff=4.0, **MODELS[name])
    model.atomic_reference_energies.copy_(torch.tensor([-1.1, -2.2, -3.3, -4.4], dtype=torch.float64))
    return model.to(dtype)


def _batch(dtype):
    return batch_graphs([atoms_to_graph(periodic_structure(0), 4.0, dtype=dtype),
                         atoms_to_graph(periodic_structure(1), 4.0, dtype=dtype)])


def _predict(model, graph, training: bool):
    model.train(training)
    out = model(graph, forces=True, stress=True, training=training)
    return {k: v.detach().double().cpu().numpy() for k, v in out.items()}


def _assert_close(got: dict, want: dict, rtol: float):
    for key in ("energy", "forces", "stress"):
        scale = np.abs(want[key]).max() + 1e-12
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=rtol * scale, err_msg=key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_on_cuda_matches_cpu(name, training, dtype):
    model = _model(name, dtype)
    if name == "faenet":
        # FAENet's training frame is one random sign choice of the PCA axes; CPU and CUDA eigh return axes with
        # different signs, so the same random index picks a different frame (checked on an H200). Average over
        # all frames in training mode too, so that both devices compute the same function.
        model.stochastic_training = False
    graph = _batch(dtype)
    want = _predict(model, graph, training)
    got = _predict(model.to("cuda"), graph.to("cuda"), training)
    _assert_close(got, want, RTOL[dtype])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_on_cuda_molecule_and_isolated_atom(name):
    """Non-periodic input and a lone atom with no edges on the GPU."""
    from ase import Atoms

    model = _model(name, torch.float64).eval()
    lone = Atoms("O", positions=[[0.0, 0.0, 0.0]])
    graph = batch_graphs([atoms_to_graph(molecule(1), 4.0, dtype=torch.float64),
                          atoms_to_graph(lone, 4.0, dtype=torch.float64)])
    want = model(graph, forces=True)
    got = model.to("cuda")(graph.to("cuda"), forces=True)
    got, want = ({k: v.detach().cpu().numpy() for k, v in out.items()} for out in (got, want))
    np.testing.assert_allclose(got["energy"], want["energy"], rtol=1e-10)
    np.testing.assert_allclose(got["forces"], want["forces"], atol=1e-10)
    assert np.all(got["forces"][-1] == 0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bundled_potential_calculator_on_cuda(dtype):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=3)
    results = {}
    for device in ("cpu", "cuda"):
        atoms.calc = MatkitCalculator.from_pretrained("tensornet-si", device=device, dtype=dtype)
        results[device] = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
    tol = 1e-9 if dtype == "float64" else 1e-4
    assert abs(results["cuda"][0] - results["cpu"][0]) < tol * abs(results["cpu"][0])
    np.testing.assert_allclose(results["cuda"][1], results["cpu"][1], atol=tol * 10)
    np.testing.assert_allclose(results["cuda"][2], results["cpu"][2], atol=tol)


def test_training_on_cuda_gives_a_checkpoint_the_cpu_reproduces(tmp_path):
    from matkit.checkpoint import load_checkpoint
    from matkit.training import GraphListDataset, config_from_dict, train
    from test_training_support import mlearn_si_graphs

    graphs = mlearn_si_graphs(12, cutoff=4.0, dtype=torch.float32)
    config = config_from_dict({
        "model": {"name": "tensornet", "hparams": {"cutoff": 4.0, "hidden_channels": 8, "num_rbf": 8}},
        "data": {"batch_size": 4, "val_fraction": 0.25, "seed": 0},
        "loss": {"energy_weight": 1.0, "forces_weight": 1.0, "stress_weight": 1.0},
        "optim": {"lr": 5e-3, "epochs": 3, "warmup_steps": 2},
        "run": {"out_dir": str(tmp_path), "seed": 0, "device": "cuda", "parity_plots": False},
    })
    summary = train(config, train_dataset=GraphListDataset(graphs))
    assert np.isfinite(summary["best_val_metrics"]["forces_mae"])
    model = load_checkpoint(tmp_path / "best.pt")
    assert next(model.parameters()).device.type == "cpu"
    graph = batch_graphs(mlearn_si_graphs(3, cutoff=4.0, dtype=torch.float64))
    cpu = model.double()(graph, forces=True, stress=True)
    gpu = model.to("cuda")(graph.to("cuda"), forces=True, stress=True)
    np.testing.assert_allclose(gpu["energy"].detach().cpu().numpy(), cpu["energy"].detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(gpu["forces"].detach().cpu().numpy(), cpu["forces"].detach().numpy(), atol=1e-9)
