"""Fine-tuning the universal potential: ``finetune.from_checkpoint`` takes a bundled name, the reference energies
are re-fitted to the new data's energy scale before training (checked against the potential's own ASE
predictions), all 89 elements are kept, and frozen layers stay fixed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from matkit.calculator import MatkitCalculator
from matkit.checkpoint import read_checkpoint
from matkit.potentials import checkpoint_path
from matkit.training import ConfigError, GraphListDataset, config_from_dict, train
from matkit.training.datasets import load_dataset
from test_training_support import config_with

ROOT = Path(__file__).resolve().parents[1]
MO = ROOT / "datasets" / "mlearn_mo.h5"
UNIVERSAL = "tensornet-matpes-pbe"


def _mo_graphs(indices):
    dataset = load_dataset(str(MO), 5.0)
    return [dataset[i] for i in indices]


def _mo_atoms(graph):
    from ase import Atoms

    return Atoms(numbers=graph.atomic_numbers.numpy(), positions=graph.pos.double().numpy(),
                 cell=graph.cell[0].double().numpy(), pbc=graph.pbc[0].numpy())


def _config(out_dir, **sections):
    cfg = {"finetune": {"from_checkpoint": UNIVERSAL},
           "data": {"batch_size": 2, "val_fraction": 0.0, "seed": 0},
           "loss": {"energy_weight": 1.0, "forces_weight": 1.0, "stress_weight": 0.0},
           "optim": {"lr": 1e-5, "epochs": 1, "max_steps": 1, "warmup_steps": 0},
           "run": {"out_dir": str(out_dir), "parity_plots": False, "progress": "off"}}
    return config_with(cfg, **sections)


def test_finetune_from_bundled_name_refits_reference_energies_first(tmp_path):
    graphs = _mo_graphs([0, 40, 80, 120])
    # the bundled potential's own energies through ASE: mlearn's PBE scale differs from MatPES's by a per-Mo
    # constant, which the refit has to find as mean((E_DFT - E_model) / N) for a one-element dataset
    calc = MatkitCalculator.from_pretrained(UNIVERSAL, dtype="float64")
    offsets = []
    for graph in graphs:
        atoms = _mo_atoms(graph)
        atoms.calc = calc
        offsets.append((float(graph.energy) - atoms.get_potential_energy()) / len(atoms))
    start = read_checkpoint(checkpoint_path(UNIVERSAL))
    species = list(start["hparams"]["species"])
    refs_before = start["state_dict"]["atomic_reference_energies"].numpy()

    config = _config(tmp_path / "ft", finetune={"from_checkpoint": UNIVERSAL, "freeze": ["embedding"]})
    train(config, train_dataset=GraphListDataset(graphs))
    after = read_checkpoint(tmp_path / "ft" / "latest.pt")
    assert list(after["hparams"]["species"]) == species and len(species) == 89
    refs_after = after["state_dict"]["atomic_reference_energies"].numpy()
    mo = species.index(42)
    # least squares over counts (N_i) and residuals (N_i * offset_i) weighs each structure by N_i^2
    sizes = np.array([g.num_nodes for g in graphs], dtype=float)
    expected = float(np.sum(sizes ** 2 * np.array(offsets)) / np.sum(sizes ** 2))
    assert refs_after[mo] - refs_before[mo] == pytest.approx(expected, abs=1e-6)
    assert abs(expected) > 0.1  # the scales do differ: a refit that did nothing would fail above
    others = np.arange(len(species)) != mo
    np.testing.assert_array_equal(refs_after[others], refs_before[others])
    for key, value in start["state_dict"].items():
        if key.startswith("embedding."):
            assert torch.equal(value, after["state_dict"][key]), key
    changed = [k for k in start["state_dict"] if k.startswith(("layers.", "output_mlp."))]
    assert any(not torch.equal(start["state_dict"][k], after["state_dict"][k]) for k in changed)


def test_finetune_keep_and_unknown_source(tmp_path):
    graphs = _mo_graphs([0, 40])
    config = _config(tmp_path / "keep", model={"reference_energies": "keep"})
    train(config, train_dataset=GraphListDataset(graphs))
    before = read_checkpoint(checkpoint_path(UNIVERSAL))["state_dict"]["atomic_reference_energies"]
    after = read_checkpoint(tmp_path / "keep" / "latest.pt")["state_dict"]["atomic_reference_energies"]
    assert torch.equal(before, after)

    with pytest.raises(ConfigError, match=r"'finetune.from_checkpoint': 'tensornet-matpes-pbf' is neither a file "
                                          r"nor a bundled potential \(.*tensornet-matpes-pbe"):
        train(_config(tmp_path / "bad", finetune={"from_checkpoint": "tensornet-matpes-pbf"}),
              train_dataset=GraphListDataset(graphs))
    with pytest.raises(ConfigError, match=r"'model.reference_energies' 'refit' corrects a loaded model"):
        config_from_dict({"model": {"name": "tensornet", "reference_energies": "refit"}})


@pytest.mark.parametrize("name", ["mo", "ge", "li"])
def test_example_finetune_configs_name_a_bundled_start_and_the_bundled_recipe(name):
    """The README's fine-tuning configs load, start from a bundled potential and use the split, seed and loss of
    the element's bundled from-scratch potential (so the cards' comparisons are like for like)."""
    from matkit.training import load_config

    config = load_config(ROOT / "examples" / "finetune" / f"{name}.yaml")
    assert checkpoint_path(config.finetune.from_checkpoint).is_file()
    assert config.model.reference_energies is None and config.model.resolved(True)[0] == "refit"
    bundled = ROOT / "potentials" / f"tensornet-{name}"
    recipe = load_config(bundled / ("from_scratch.yaml" if (bundled / "from_scratch.yaml").exists() else "config.yaml"))
    assert config.data.train == recipe.data.train and config.data.seed == recipe.data.seed
    assert config.data.val_fraction == recipe.data.val_fraction
    assert (config.loss.energy_weight, config.loss.forces_weight, config.loss.stress_weight) == \
        (recipe.loss.energy_weight, recipe.loss.forces_weight, recipe.loss.stress_weight)
