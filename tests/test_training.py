"""Training: configuration validation, losses, data statistics, the force-loss gradient, a real training
run on mlearn Si DFT data (errors fall, logs, checkpoints, parity plots), fine-tuning with frozen modules,
and the ``matkit train`` / ``matkit evaluate`` commands checked against an independent ASE computation."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase.stress import voigt_6_to_full_3x3_stress

from matkit.calculator import MatkitCalculator
from matkit.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from matkit.cli import main as matkit_main
from matkit.graph import batch_graphs
from matkit.models import build
from matkit.training import ConfigError, GraphListDataset, Trainer, config_from_dict, load_config, train
from matkit.training.evaluate import bootstrap_intervals, collate, evaluate_model, prepare_batch
from matkit.training.losses import batch_targets, loss_counts, loss_terms, voigt_to_matrix
from matkit.training.stats import DatasetStatistics, fit_reference_energies, refit_reference_energies
from test_training_support import config_with, mlearn_si_atoms, mlearn_si_graphs

ROOT = Path(__file__).resolve().parents[1]


def _base(out_dir, **sections):
    cfg = {
        "model": {"name": "test_pair_mlp", "hparams": {"cutoff": 3.5, "hidden": 8}},
        "data": {"batch_size": 4, "val_fraction": 0.25, "seed": 0},
        "loss": {"energy_weight": 1.0, "forces_weight": 1.0, "stress_weight": 1.0},
        "optim": {"lr": 2e-2, "epochs": 2, "warmup_steps": 2},
        "run": {"out_dir": str(out_dir), "seed": 0, "parity_plots": False},
    }
    return config_with(cfg, **sections)


# ---- configuration ----------------------------------------------------------------------------------------------
def test_example_config_loads_with_overrides():
    config = load_config(ROOT / "examples/train_config.yaml", ["optim.lr=5e-4", "data.batch_size=3",
                                                              "finetune.freeze=[embedding]"])
    assert config.optim.lr == 5e-4 and config.data.batch_size == 3 and config.finetune.freeze == ["embedding"]
    assert config.model.name == "tensornet" and config.loss.forces_weight == 10.0
    assert config.optim.betas == [0.9, 0.999] and config.run.dtype == "float32"


@pytest.mark.parametrize("data, message", [
    ({"optim": {"lrr": 1e-3}}, "unknown config key 'optim.lrr'; did you mean 'lr'?"),
    ({"modle": {"name": "x"}}, "unknown config key 'modle'; did you mean 'model'?"),
    ({"optim": {"lr": "fast"}}, "config key 'optim.lr' must be a number, got str 'fast'"),
    ({"run": {"deterministic": "yes"}}, "config key 'run.deterministic' must be true or false"),
    ({"data": {"batch_size": 2.5}}, "config key 'data.batch_size' must be an integer, got float 2.5"),
    ({"optim": {"schedule": "linear"}}, "config key 'optim.schedule' must be one of 'cosine', 'plateau', 'constant'"),
    ({"finetune": {"freeze": "embedding"}}, "config key 'finetune.freeze' must be list of str"),
    ({"optim": {"lr": -1.0}}, "config key 'optim.lr' must be > 0"),
    ({"loss": {"energy_weight": 0, "forces_weight": 0}}, "config key 'loss' at least one of"),
    ({"model": {"name": "test_pair_mlp", "scale": "rms"}}, "config key 'model.scale' must be a number or one of"),
    ({"optim": 3}, "config key 'optim' must be a mapping"),
])
def test_config_errors_name_the_key(data, message):
    data = {"model": {"name": "test_pair_mlp"}, **data} if "modle" not in data else data
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(ROOT / "examples/train_config.yaml", ["optim.lr"])
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.yaml")


# ---- losses -----------------------------------------------------------------------------------------------------
def test_voigt_conversion_matches_ase():
    voigt = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64)
    np.testing.assert_array_equal(voigt_to_matrix(voigt)[0].numpy(), voigt_6_to_full_3x3_stress(voigt[0].numpy()))


def _perturbed_labels(targets, seed: int):
    """Stand-in predictions for a 3-structure batch: its labels plus seeded Gaussian noise (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return {"energy": targets.energy + torch.randn(3, generator=gen, dtype=torch.float64),
            "forces": targets.forces + torch.randn(targets.forces.shape, generator=gen, dtype=torch.float64),
            "stress": targets.stress + 1e-3 * torch.randn(3, 3, 3, generator=gen, dtype=torch.float64)}


def test_loss_terms_match_a_hand_computation_with_masks():
    graphs = mlearn_si_graphs(3, dtype=torch.float64)
    for k, graph in enumerate(graphs):                  # stress label of structure 1 not available
        graph.has_stress = torch.tensor([k != 1])
    graphs[2].forces = graphs[2].forces.clone()
    graphs[2].forces[0, 1] = float("nan")               # one atom without a force label
    batch = batch_graphs(graphs)
    targets = batch_targets(batch)
    pred = _perturbed_labels(targets, seed=0)
    counts = loss_counts(targets)
    assert (counts.energy, counts.forces, counts.stress) == (3, 3 * (sum(g.num_nodes for g in graphs) - 1), 18)
    weights = {"energy": 2.0, "forces": 3.0, "stress": 5.0}
    terms = loss_terms(pred, targets, counts, weights)

    natoms = np.array([g.num_nodes for g in graphs])
    e_ref = np.array([float(g.energy) for g in graphs])
    e_term = np.mean(((pred["energy"].numpy() - e_ref) / natoms) ** 2)
    f_ref = np.concatenate([g.forces.numpy() for g in graphs])
    f_diff = pred["forces"].numpy() - f_ref
    f_diff_atom = f_diff[graphs[0].num_nodes + graphs[1].num_nodes]
    f_term = (np.nansum(f_diff ** 2) - np.nansum(f_diff_atom ** 2)) / (f_diff.size - 3)  # NaN atom dropped
    s_ref = [voigt_6_to_full_3x3_stress(g.stress[0].numpy()) for g in graphs]
    s_term = sum(np.sum((pred["stress"][k].numpy() - s_ref[k]) ** 2) for k in (0, 2)) / 18
    assert float(terms["energy"]) == pytest.approx(e_term, rel=1e-12)
    assert float(terms["forces"]) == pytest.approx(f_term, rel=1e-12)
    assert float(terms["stress"]) == pytest.approx(s_term, rel=1e-12)
    assert float(terms["total"]) == pytest.approx(2 * e_term + 3 * f_term + 5 * s_term, rel=1e-12)
    # global normalisation: the halves of a batch, each divided by the whole batch's counts, add up
    halves = [batch_graphs(graphs[:1]), batch_graphs(graphs[1:])]
    pieces = []
    for part, sl in zip(halves, (slice(0, 1), slice(1, 3))):
        t = batch_targets(part)
        atoms = slice(0, graphs[0].num_nodes) if sl.start == 0 else slice(graphs[0].num_nodes, None)
        p = {"energy": pred["energy"][sl], "forces": pred["forces"][atoms], "stress": pred["stress"][sl]}
        pieces.append(float(loss_terms(p, t, counts, weights)["total"]))
    assert sum(pieces) == pytest.approx(float(terms["total"]), rel=1e-12)
    huber = loss_terms(pred, targets, counts, weights, kind="huber", huber_delta=0.01)
    assert 0 < float(huber["total"]) < float(terms["total"])


def test_force_loss_gradient_trains_the_weights():
    """The force term's gradient w.r.t. a weight (through create_graph) equals a finite difference."""
    torch.manual_seed(0)
    model = build("test_pair_mlp", species=[14], cutoff=3.5, hidden=8).double()
    batch = batch_graphs(mlearn_si_graphs(2, dtype=torch.float64))
    targets = batch_targets(batch)
    counts = loss_counts(targets)
    weights = {"energy": 0.0, "forces": 1.0, "stress": 0.0}

    def force_loss():
        return loss_terms(model(batch, forces=True, training=True), targets, counts, weights)["total"]

    loss = force_loss()
    loss.backward()
    param = model.radial[0].weight
    grad = float(param.grad[3, 2])
    assert abs(grad) > 1e-6
    h = 1e-6
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            param[3, 2] += sign * h
            with torch.enable_grad():
                values.append(float(force_loss()))
            param[3, 2] -= sign * h
    assert grad == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-5)


# ---- statistics --------------------------------------------------------------------------------------------------
def test_reference_energy_fit_recovers_known_values():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 6, size=(30, 4)).astype(float)
    counts[:, 3] = 0                                  # element 3 never appears
    counts[counts.sum(axis=1) == 0, 0] = 1
    e0 = np.array([-3.2, -7.9, -1.5, 0.0])
    stats = DatasetStatistics(counts, counts @ e0, 0.0, 0)
    np.testing.assert_allclose(fit_reference_energies(stats), e0, atol=1e-10)


def test_refit_reference_energies_removes_the_energy_offset_and_keeps_forces():
    """The refit moves only the per-element energy zero: the least-squares optimum on the split, checked against
    energies and forces from the ASE calculator before and after (an independent path through the model)."""
    torch.manual_seed(0)
    images = mlearn_si_atoms(12)
    model = build("test_pair_mlp", species=[14], cutoff=3.5, hidden=8).float()
    model.shift.fill_(3.0)                             # eV/atom: mlearn Si is near -5.4, so a large offset
    split = [0, 2, 3, 5, 7, 8, 11]

    def predict():
        calc = MatkitCalculator(model, dtype="float64", skin=0.0)
        out = []
        for atoms in images:
            atoms = atoms.copy()
            atoms.calc = calc
            out.append((atoms.get_potential_energy(), atoms.get_forces()))
        return out

    before = predict()
    n = np.array([len(images[i]) for i in split], dtype=float)
    residual = np.array([images[i].get_potential_energy() - before[i][0] for i in split])
    expected = float(n @ residual / (n @ n))           # one element: dE0 = sum n r / sum n^2
    delta = refit_reference_energies(model, GraphListDataset(mlearn_si_graphs(12, dtype=torch.float32)), split)
    assert delta.shape == (1,) and abs(expected) > 1.0
    assert float(delta[0]) == pytest.approx(expected, rel=1e-9)
    after = predict()
    for (e0, f0), (e1, f1), atoms in zip(before, after, images):
        assert e1 - e0 == pytest.approx(len(atoms) * expected, rel=1e-9)
        np.testing.assert_array_equal(f1, f0)
    new_residual = np.array([images[i].get_potential_energy() - after[i][0] for i in split])
    assert abs(n @ new_residual) < 1e-6 * np.abs(n @ residual)   # normal equation of the fit holds


def test_loss_terms_weigh_each_structure_by_its_loss_weight():
    """``loss_weight`` (B,) multiplies a structure's energy, force and stress penalties; the denominators stay the
    label counts (hand computation with numpy); weights of 1 give the unweighted loss."""
    graphs = mlearn_si_graphs(3, dtype=torch.float64)
    w = np.array([2.0, 0.0, 0.5])
    batch = batch_graphs(graphs)
    plain = batch_targets(batch)
    batch.loss_weight = torch.tensor(w)
    targets = batch_targets(batch)
    pred = _perturbed_labels(targets, seed=1)
    counts = loss_counts(targets)
    weights = {"energy": 2.0, "forces": 3.0, "stress": 5.0}
    terms = loss_terms(pred, targets, counts, weights)

    natoms = np.array([g.num_nodes for g in graphs])
    de = (pred["energy"].numpy() - np.array([float(g.energy) for g in graphs])) / natoms
    df = pred["forces"].numpy() - np.concatenate([g.forces.numpy() for g in graphs])
    w_atom = np.repeat(w, natoms)
    ds = [pred["stress"][k].numpy() - voigt_6_to_full_3x3_stress(g.stress[0].numpy()) for k, g in enumerate(graphs)]
    assert float(terms["energy"]) == pytest.approx(np.sum(w * de ** 2) / 3, rel=1e-12)
    assert float(terms["forces"]) == pytest.approx(np.sum(w_atom[:, None] * df ** 2) / df.size, rel=1e-12)
    assert float(terms["stress"]) == pytest.approx(sum(w[k] * np.sum(ds[k] ** 2) for k in range(3)) / 27,
                                                   rel=1e-12)
    batch.loss_weight = torch.ones(3)
    ones = loss_terms(pred, batch_targets(batch), counts, weights)
    unweighted = loss_terms(pred, plain, counts, weights)
    assert float(ones["total"]) == pytest.approx(float(unweighted["total"]), rel=1e-15)
    assert float(terms["total"]) != pytest.approx(float(unweighted["total"]), rel=1e-3)


def test_config_type_weights_reach_the_training_step(tmp_path):
    """``loss.config_type_weights`` gives every training structure of a type its weight (others 1) without
    touching the dataset's own graphs, and the loss of a training step is the weighted one (recomputed by hand
    from the model's prediction before the step); a type absent from the training split, or a dataset without
    types, is a one-line ConfigError naming the key."""
    graphs = mlearn_si_graphs(12, dtype=torch.float32)
    groups = ["AIMD-NVT", "Elastic", "Vacancy"] * 4
    config = _base(tmp_path, loss={"config_type_weights": {"Elastic": 3.0, "Vacancy": 0.0}},
                   optim={"ema_decay": 0.0})
    trainer = Trainer(config, train_dataset=GraphListDataset(graphs, groups=groups))
    try:
        expected = {"AIMD-NVT": 1.0, "Elastic": 3.0, "Vacancy": 0.0}
        for i in trainer.train_indices:
            assert float(trainer.train_source[i].loss_weight) == expected[groups[i]]
            assert getattr(trainer.train_full[i], "loss_weight", None) is None
        indices = trainer.train_indices[:6]
        batch = prepare_batch(collate([trainer.train_source[i] for i in indices]), trainer.device, trainer.dtype)
        pred = trainer.model(batch, forces=True, stress=True, training=True)
        targets = batch_targets(batch)
        assert targets.weight is not None
        counts = loss_counts(targets)
        w = torch.tensor([expected[groups[i]] for i in indices], dtype=torch.float64)
        diffs = {"energy": (pred["energy"] - targets.energy) / targets.natoms,
                 "forces": pred["forces"] - targets.forces, "stress": pred["stress"] - targets.stress}
        by_hand = {}
        for name, diff in diffs.items():
            w_rows = w[targets.batch] if name == "forces" else w
            sq = diff.detach().double() ** 2 * w_rows.reshape(-1, *([1] * (diff.dim() - 1)))
            by_hand[name] = float(sq.sum()) / float(getattr(counts, name))
        result = trainer.train_step(batch)
        for name in ("energy", "forces", "stress"):
            assert result[f"loss_{name}"] == pytest.approx(by_hand[name], rel=1e-5)
    finally:
        trainer.close()

    with pytest.raises(ConfigError, match=r"loss.config_type_weights.*'Surface'.*\['AIMD-NVT', 'Elastic', "
                                          r"'Vacancy'\]"):
        Trainer(_base(tmp_path, loss={"config_type_weights": {"Surface": 2.0}}),
                train_dataset=GraphListDataset(graphs, groups=groups))
    with pytest.raises(ConfigError, match="loss.config_type_weights.*records no configuration types"):
        Trainer(_base(tmp_path, loss={"config_type_weights": {"Elastic": 2.0}}),
                train_dataset=GraphListDataset(graphs))
    with pytest.raises(ConfigError, match=r"loss.config_type_weights.Elastic' must be a finite number >= 0"):
        _base(tmp_path, loss={"config_type_weights": {"Elastic": -1.0}})


def test_trainer_fits_reference_energy_scale_and_shift_on_the_training_split(tmp_path):
    images = mlearn_si_atoms(16)
    graphs = mlearn_si_graphs(16, dtype=torch.float32)
    trainer = Trainer(_base(tmp_path), train_dataset=GraphListDataset(graphs))
    try:
        train_idx, val_idx = trainer.train_indices, trainer.val_indices
        assert len(val_idx) == 4 and not set(train_idx) & set(val_idx)
        n = np.array([len(images[i]) for i in train_idx], dtype=float)
        e = np.array([images[i].get_potential_energy() for i in train_idx])
        e0 = float(n @ e / (n @ n))                  # least squares for one element
        shift = float(np.mean((e - n * e0) / n))
        forces = np.concatenate([images[i].get_forces() for i in train_idx])
        scale = float(np.sqrt(np.mean(forces ** 2)))
        assert float(trainer.model.atomic_reference_energies[0]) == pytest.approx(e0, rel=1e-12)
        assert float(trainer.model.shift) == pytest.approx(shift, rel=1e-9, abs=1e-12)
        assert float(trainer.model.scale) == pytest.approx(scale, rel=1e-6)
    finally:
        trainer.close()


# ---- a training run -----------------------------------------------------------------------------------------------
def test_training_reduces_validation_errors_and_writes_outputs(tmp_path):
    graphs = mlearn_si_graphs(24, dtype=torch.float32)
    config = _base(tmp_path, optim={"epochs": 10, "ema_decay": 0.8}, run={"parity_plots": True, "log_every": 2})
    trainer = Trainer(config, train_dataset=GraphListDataset(graphs))
    initial_loss, initial = trainer.validate()
    summary = trainer.fit()
    best = summary["best_val_metrics"]
    # 18 training cells, 50 steps: the validation force and energy errors must fall clearly
    assert best["forces_mae"] < 0.7 * initial["forces_mae"], (initial, best)
    assert best["energy_mae"] < initial["energy_mae"]
    assert summary["best_val_loss"] < 0.5 * initial_loss

    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["kind"] for r in rows].count("step") == 25 and [r["kind"] for r in rows].count("epoch") == 10
    assert all(float(r["lr"]) > 0 for r in rows)
    for name in ("parity_energy.png", "parity_forces.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held out of the training data and never trained on" in (tmp_path / "train.log").read_text()

    # best.pt holds the EMA weights that were validated: re-evaluating them gives the logged metrics
    model, payload = load_checkpoint(tmp_path / "best.pt", return_payload=True)
    assert payload["metadata"]["val_loss"] == summary["best_val_loss"]
    again = evaluate_model(model, GraphListDataset(graphs), indices=payload["metadata"]["val_indices"],
                           batch_size=4, dtype=torch.float32).metrics()
    for key, value in payload["metadata"]["val_metrics"].items():
        assert again[key] == pytest.approx(value, rel=1e-6), key
    latest = read_checkpoint(tmp_path / "latest.pt")
    ema = latest["training_state"]["ema"]["shadow"]
    raw = latest["state_dict"]
    assert not torch.equal(ema["radial.0.weight"], raw["radial.0.weight"])  # the EMA is a different average


def test_finetune_keeps_frozen_modules_and_output_transform(tmp_path):
    torch.manual_seed(1)
    start = build("test_pair_mlp", species=[14], cutoff=3.5, hidden=8)
    with torch.no_grad():
        start.atomic_reference_energies.fill_(-5.2)
        start.scale.fill_(0.7)
        start.shift.fill_(0.01)
    save_checkpoint(start, tmp_path / "start.pt")
    graphs = mlearn_si_graphs(12, dtype=torch.float32)
    config = config_from_dict({
        "finetune": {"from_checkpoint": str(tmp_path / "start.pt"), "freeze": ["embedding", "radial.0"]},
        "model": {"reference_energies": "keep"},  # the default, refit, is tested in test_finetune.py
        "data": {"batch_size": 4}, "optim": {"lr": 1e-2, "epochs": 1},
        "run": {"out_dir": str(tmp_path / "ft"), "parity_plots": False}})
    train(config, train_dataset=GraphListDataset(graphs))
    before = start.state_dict()
    after = read_checkpoint(tmp_path / "ft/latest.pt")["state_dict"]
    for key in ("embedding.weight", "radial.0.weight", "radial.0.bias", "atomic_reference_energies", "scale",
                "shift"):
        assert torch.equal(before[key], after[key]), key
    for key in ("radial.2.weight", "readout.0.weight", "readout.2.bias"):
        assert not torch.equal(before[key], after[key]), key

    bad = config_from_dict({"finetune": {"from_checkpoint": str(tmp_path / "start.pt"), "freeze": ["embeding"]},
                            "run": {"out_dir": str(tmp_path / "bad")}})
    with pytest.raises(ConfigError, match=r"'finetune.freeze': 'embeding' matches no parameter.*'embedding'"):
        train(bad, train_dataset=GraphListDataset(graphs))


# ---- command line ------------------------------------------------------------------------------------------------
def test_cli_train_and_evaluate_agree_with_ase(tmp_path, capsys):
    images = mlearn_si_atoms(12)
    data = tmp_path / "si.extxyz"
    ase.io.write(data, images, format="extxyz")
    cfg = {"model": {"name": "test_pair_mlp", "module": "test_training_support", "hparams": {"cutoff": 3.5}},
           "data": {"train": str(data), "batch_size": 4, "val_fraction": 0.25},
           "optim": {"lr": 1e-2, "epochs": 1}, "loss": {"stress_weight": 1.0},
           "run": {"out_dir": str(tmp_path / "run"), "parity_plots": False, "progress": "off"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert matkit_main(["train", str(tmp_path / "c.yaml"), "optim.max_steps=2"]) == 0
    assert "validation split, best model" in capsys.readouterr().out
    assert int(read_checkpoint(tmp_path / "run/latest.pt")["training_state"]["step"]) == 2

    out_json = tmp_path / "errors.json"
    assert matkit_main(["evaluate", str(tmp_path / "run/best.pt"), str(data), "--json", str(out_json),
                        "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "forces" in table and "meV/atom" in table
    metrics = json.loads(out_json.read_text())["metrics"]
    calc = MatkitCalculator(tmp_path / "run/best.pt", dtype="float32", skin=0.0)
    de, df, ds = [], [], []
    for atoms in images:
        ref_e, ref_f, ref_s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        copy = atoms.copy()
        copy.calc = calc
        de.append((copy.get_potential_energy() - ref_e) / len(atoms))
        df.append((copy.get_forces() - ref_f).ravel())
        ds.append((copy.get_stress(voigt=False) - ref_s).ravel())
    de, df, ds = np.array(de), np.concatenate(df), np.concatenate(ds)
    assert metrics["energy_mae"] == pytest.approx(np.abs(de).mean(), rel=1e-4)
    assert metrics["energy_rmse"] == pytest.approx(np.sqrt((de ** 2).mean()), rel=1e-4)
    assert metrics["forces_mae"] == pytest.approx(np.abs(df).mean(), rel=1e-4)
    assert metrics["stress_mae"] == pytest.approx(np.abs(ds).mean(), rel=1e-3)

    assert matkit_main(["evaluate", str(tmp_path / "run/best.pt"), str(data), "--split", "val",
                        "--no-progress", "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "(3 structures)" in out and "parity_forces.png" in out
    for name in ("parity_energy.png", "parity_forces.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # --resume continues from run.out_dir/latest.pt
    assert matkit_main(["train", str(tmp_path / "c.yaml"), "optim.max_steps=3", "--resume"]) == 0
    assert int(read_checkpoint(tmp_path / "run/latest.pt")["training_state"]["step"]) == 3
    assert "resumed from" in (tmp_path / "run/train.log").read_text()
    assert matkit_main(["train", str(tmp_path / "c.yaml"), "optim.lr=fast"]) == 2
    assert "config key 'optim.lr' must be a number" in capsys.readouterr().err


def test_cli_evaluate_per_element_force_errors(tmp_path, capsys):
    """`matkit evaluate --per-element` splits the force errors by element; reference: the calculator, atom by atom."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from matkit.data.hdf5 import FrameFile

    frames = FrameFile(str(ROOT / "datasets/acetylacetone_300K.h5"))
    images = []
    for k in range(0, 60, 10):  # six C5H8O2 molecules
        a = frames.read_arrays(k)
        atoms = Atoms(numbers=a["atomic_numbers"], positions=a["positions"])
        atoms.calc = SinglePointCalculator(atoms, energy=float(a["energy"]), forces=a["forces"])
        images.append(atoms)
    data = tmp_path / "acac.extxyz"
    ase.io.write(data, images, format="extxyz")
    model = ROOT / "potentials/tensornet-acac/model.pt"
    out_json = tmp_path / "errors.json"
    assert matkit_main(["evaluate", str(model), str(data), "--dtype", "float64", "--per-element", "--json",
                        str(out_json), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "forces of" in table and "\nC " in table
    report = json.loads(out_json.read_text())
    by_element = report["forces_by_element"]
    assert sorted(by_element) == ["C", "H", "O"]

    calc = MatkitCalculator(model, dtype="float64", skin=0.0)
    diffs = {"H": [], "C": [], "O": []}
    for atoms in images:
        ref = atoms.get_forces()
        copy = atoms.copy()
        copy.calc = calc
        for symbol, d in zip(copy.get_chemical_symbols(), copy.get_forces() - ref):
            diffs[symbol].append(d)
    for symbol, rows in diffs.items():
        d = np.concatenate(rows)
        assert by_element[symbol]["components"] == d.size == 3 * len(rows)
        assert by_element[symbol]["mae"] == pytest.approx(np.abs(d).mean(), rel=1e-9)
        assert by_element[symbol]["rmse"] == pytest.approx(np.sqrt((d ** 2).mean()), rel=1e-9)
    # the element rows recombine to the overall force MAE
    total = sum(row["mae"] * row["components"] for row in by_element.values()) / 270
    assert report["metrics"]["forces_mae"] == pytest.approx(total, rel=1e-12)


def test_cli_evaluate_per_group_errors(tmp_path, capsys):
    """`matkit evaluate --per-group` splits energy and force errors by configuration type: HDF5 ``frames/groups``
    (mlearn Li, validation split) and extxyz ``config_type`` (none -> ''); reference: the calculator, structure by
    structure, with the labels read by h5py / ASE."""
    import h5py
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    model = ROOT / "potentials/tensornet-li/model.pt"
    data = ROOT / "datasets/mlearn_li.h5"
    out_json = tmp_path / "errors.json"
    other = ROOT / "potentials/gaunt_mace-li/model.pt"
    assert matkit_main(["evaluate", str(model), str(data), "--split", "val", "--dtype", "float64", "--per-group",
                        "--bootstrap", "500", "--baseline", str(other), "--json", str(out_json), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "AIMD-NVT" in out and "95 % intervals from 500 resamplings" in out
    report = json.loads(out_json.read_text())
    val = [int(i) for i in read_checkpoint(model)["metadata"]["val_indices"]]
    calc = MatkitCalculator(model, dtype="float64", skin=0.0)
    other_calc = MatkitCalculator(other, dtype="float64", skin=0.0)
    with h5py.File(data) as h5:
        group = h5["frames/groups"].asstr()[:]
        offsets, n_atoms = h5["frames/offsets"][:], h5["frames/n_atoms"][:]
        numbers, positions, forces = (h5[f"atoms/{k}"][:] for k in ("atomic_numbers", "positions", "forces"))
        cells, energies = h5["frames/cell"][:], h5["frames/energy"][:]
    expected, in_order, other_order = {}, {"e": [], "f": []}, {"e": [], "f": []}
    for i in val:
        atoms = Atoms(numbers=numbers[offsets[i]:offsets[i] + n_atoms[i]],
                      positions=positions[offsets[i]:offsets[i] + n_atoms[i]], cell=cells[i], pbc=True)
        atoms.calc = calc
        rows = expected.setdefault(group[i], {"e": [], "f": []})
        for r in (rows, in_order):
            r["e"].append((atoms.get_potential_energy() - energies[i]) / len(atoms))
            r["f"].append((atoms.get_forces() - forces[offsets[i]:offsets[i] + n_atoms[i]]).ravel())
        atoms.calc = other_calc
        other_order["e"].append((atoms.get_potential_energy() - energies[i]) / len(atoms))
        other_order["f"].append((atoms.get_forces() - forces[offsets[i]:offsets[i] + n_atoms[i]]).ravel())
    assert len(expected) > 1 and sorted(report["by_group"]) == sorted(expected)
    for name, rows in expected.items():
        got, de, df = report["by_group"][name], np.array(rows["e"]), np.concatenate(rows["f"])
        assert got["structures"] == len(de)
        assert got["energy_mae"] == pytest.approx(np.abs(de).mean(), rel=1e-6)
        assert got["energy_rmse"] == pytest.approx(np.sqrt((de ** 2).mean()), rel=1e-6)
        assert got["forces_mae"] == pytest.approx(np.abs(df).mean(), rel=1e-6)
        assert got["forces_rmse"] == pytest.approx(np.sqrt((df ** 2).mean()), rel=1e-6)
    # --bootstrap: the intervals of the calculator's errors, structure by structure in split order (same seed, so
    # the same draws), and each holds the split's own error; --baseline: gaunt_mace-li on the same structures
    structure = np.arange(len(val))

    def as_arrays(errors):
        sizes = [f.size for f in errors["f"]]
        return {"energy_pred": np.array(errors["e"]), "energy_ref": np.zeros(len(val)), "energy_structure": structure,
                "forces_pred": np.concatenate(errors["f"]), "forces_ref": np.zeros(sum(sizes)),
                "forces_structure": np.repeat(structure, sizes)}

    reference = bootstrap_intervals(as_arrays(in_order), resamples=500, baseline=as_arrays(other_order))
    assert report["bootstrap"]["resamples"] == 500 and report["bootstrap"]["level"] == 0.95
    assert sorted(report["bootstrap"]) == sorted([*reference, "resamples", "level", "seed"])
    for key, (low, high) in reference.items():
        assert report["bootstrap"][key] == pytest.approx([low, high], rel=1e-6, abs=1e-9), key
        if key.endswith("_difference"):   # the split's own difference of the two potentials' errors
            name = key.removesuffix("_difference")
            assert low < report["metrics"][name] - report["baseline"]["metrics"][name] < high
        else:
            assert low < report["metrics"][key] < high
    assert report["baseline"]["metrics"]["forces_mae"] == pytest.approx(np.abs(np.concatenate(other_order["f"])).mean(),
                                                                        rel=1e-6)

    # extxyz: config_type in atoms.info; a structure without one is the group ''
    frames = [Atoms("Li2", positions=[[0, 0, 0], [1.4, 1.5, 1.6]], cell=np.eye(3) * 3.45, pbc=True)
              for _ in range(3)]
    for k, (atoms, kind) in enumerate(zip(frames, ("hot", "", "hot"))):
        atoms.positions[1] += 0.1 * k
        if kind:
            atoms.info["config_type"] = kind
        atoms.calc = SinglePointCalculator(atoms, energy=-3.8 + 0.01 * k, forces=np.full((2, 3), 0.05 * k))
    path = tmp_path / "li.extxyz"
    ase.io.write(path, frames, format="extxyz")
    assert matkit_main(["evaluate", str(model), str(path), "--dtype", "float64", "--per-group", "--json",
                        str(out_json), "--no-progress"]) == 0
    assert "(none)" in capsys.readouterr().out
    by_group = json.loads(out_json.read_text())["by_group"]
    assert {name: row["structures"] for name, row in by_group.items()} == {"": 1, "hot": 2}
    de = []
    for atoms in ase.io.read(path, index=":"):
        ref = atoms.get_potential_energy()
        atoms.calc = calc
        de.append(abs(atoms.get_potential_energy() - ref) / 2)
    assert by_group["hot"]["energy_mae"] == pytest.approx((de[0] + de[2]) / 2, rel=1e-6)
    assert by_group[""]["energy_mae"] == pytest.approx(de[1], rel=1e-6)


def test_cli_evaluate_baseline_at_its_own_cutoff(tmp_path):
    """`--baseline` with a larger cutoff than the first checkpoint's (the 89-element tensornet-mo at 5 Å, then
    tensornet-li at 6 Å, on four mlearn Li structures written to extxyz) builds the baseline's graphs at its own
    cutoff: its errors equal tensornet-li's calculator's (graphs at 5 Å would drop its 5-6 Å neighbours)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from matkit.data.hdf5 import FrameFile

    first, other = ROOT / "potentials/tensornet-mo/model.pt", ROOT / "potentials/tensornet-li/model.pt"
    frames = FrameFile(ROOT / "datasets/mlearn_li.h5")
    images = []
    for i in (0, 60, 120, 180):
        f = frames[i]
        atoms = Atoms(numbers=f.atomic_numbers, positions=f.positions, cell=f.cell, pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=f.energy, forces=f.forces)
        images.append(atoms)
    data, out_json = tmp_path / "li.extxyz", tmp_path / "errors.json"
    ase.io.write(data, images, format="extxyz")
    assert matkit_main(["evaluate", str(first), str(data), "--dtype", "float64", "--bootstrap", "50",
                        "--baseline", str(other), "--json", str(out_json), "--no-progress"]) == 0
    baseline = json.loads(out_json.read_text())["baseline"]["metrics"]
    calc = MatkitCalculator(other, dtype="float64", skin=0.0)
    de, df = [], []
    for atoms in images:
        ref_e, ref_f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = calc
        de.append((atoms.get_potential_energy() - ref_e) / len(atoms))
        df.append((atoms.get_forces() - ref_f).ravel())
    assert baseline["energy_mae"] == pytest.approx(np.abs(de).mean(), rel=1e-6)
    assert baseline["forces_mae"] == pytest.approx(np.abs(np.concatenate(df)).mean(), rel=1e-6)


def test_bootstrap_intervals_match_scipy():
    """The percentile intervals of :func:`bootstrap_intervals` against ``scipy.stats.bootstrap`` resampling the
    same structures (energy MAE: a mean over structures; force MAE / RMSE: ratios of per-structure sums, structures
    of 2-40 atoms); the draws differ, so the endpoints agree to the Monte-Carlo error (20000 resamples: ~0.5 % of
    the width). Constant errors give a point; a kind without labels gets no interval."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(7)
    n = 30
    atoms = rng.integers(2, 41, n)
    e_err = rng.standard_t(3, n) * 0.002                              # eV/atom, heavy-tailed
    f_err = [rng.normal(0, 0.02 + 0.1 * rng.random(), 3 * k) for k in atoms]   # eV/Å, per-structure scale
    structure = np.arange(n)
    arrays = {"energy_pred": e_err, "energy_ref": np.zeros(n), "energy_structure": structure,
              "forces_pred": np.concatenate(f_err), "forces_ref": np.zeros(3 * atoms.sum()),
              "forces_structure": np.repeat(structure, 3 * atoms)}
    got = bootstrap_intervals(arrays, resamples=20000, seed=1)
    abs_sum = np.array([np.abs(f).sum() for f in f_err])
    sq_sum = np.array([(f ** 2).sum() for f in f_err])
    count = 3.0 * atoms
    kw = dict(n_resamples=20000, method="percentile", confidence_level=0.95, vectorized=True, random_state=2)
    ref = {
        "energy_mae": bootstrap((np.abs(e_err),), np.mean, **kw),
        "energy_rmse": bootstrap((e_err ** 2,), lambda x, axis: np.sqrt(np.mean(x, axis=axis)), **kw),
        "forces_mae": bootstrap((abs_sum, count), lambda a, c, axis: a.sum(axis) / c.sum(axis), paired=True, **kw),
        "forces_rmse": bootstrap((sq_sum, count), lambda a, c, axis: np.sqrt(a.sum(axis) / c.sum(axis)),
                                 paired=True, **kw),
    }
    assert sorted(got) == sorted(ref)
    for key, result in ref.items():
        low, high = result.confidence_interval
        assert got[key] == pytest.approx([low, high], abs=0.03 * (high - low)), key
    # paired: a second model erring on the same structures (its errors = these + independent noise); scipy's paired
    # bootstrap of the difference of the two statistics
    e_b = e_err + rng.normal(0, 0.001, n)
    f_b = [f + rng.normal(0, 0.01, f.size) for f in f_err]
    other = dict(arrays, energy_pred=e_b, forces_pred=np.concatenate(f_b))
    paired = bootstrap_intervals(arrays, resamples=20000, seed=1, baseline=other)
    assert {k: paired[k] for k in got} == got   # the same draws: the unpaired intervals are unchanged
    b_abs = np.array([np.abs(f).sum() for f in f_b])
    diff_ref = {
        "energy_mae_difference": bootstrap((np.abs(e_err), np.abs(e_b)), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                                           paired=True, **kw),
        "forces_mae_difference": bootstrap((abs_sum, b_abs, count),
                                           lambda a, b, c, axis: (a.sum(axis) - b.sum(axis)) / c.sum(axis),
                                           paired=True, **kw),
    }
    for key, result in diff_ref.items():
        low, high = result.confidence_interval
        assert paired[key] == pytest.approx([low, high], abs=0.03 * (high - low)), key
    # much narrower than the difference of the unpaired intervals would suggest
    assert np.diff(paired["forces_mae_difference"])[0] < 0.5 * np.diff(got["forces_mae"])[0]
    with pytest.raises(ValueError, match="baseline's forces labels"):
        bootstrap_intervals(arrays, resamples=10, baseline=dict(other, forces_ref=other["forces_ref"] + 1.0))

    # the force MAE interval is not the naive one over independent components (here 3x too narrow)
    assert got["forces_mae"][1] - got["forces_mae"][0] > 2 * 3.92 * np.abs(arrays["forces_pred"]).std() / np.sqrt(
        count.sum())

    # constant errors: the interval is the point, also where some structures lack one kind of label
    const = {"energy_pred": np.full(3, 0.004), "energy_ref": np.zeros(3), "energy_structure": np.array([0, 2, 3]),
             "forces_pred": np.full(12, -0.05), "forces_ref": np.zeros(12), "forces_structure": np.repeat([0, 1], 6)}
    for key, (low, high) in bootstrap_intervals(const, resamples=200).items():
        expected = 0.004 if key.startswith("energy") else 0.05
        assert low == pytest.approx(expected, rel=1e-12) and high == pytest.approx(expected, rel=1e-12), key
    empty = dict(const, forces_pred=np.zeros(0), forces_ref=np.zeros(0), forces_structure=np.zeros(0, np.int64))
    assert sorted(bootstrap_intervals(empty, resamples=50)) == ["energy_mae", "energy_rmse"]


def test_lr_schedules():
    from matkit.training.schedule import LRSchedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = LRSchedule(opt, 1e-2, "cosine", total_steps=12, warmup_steps=2, min_ratio=0.1)
    assert cosine.lr_at(0) == pytest.approx(1e-2 / 3) and cosine.lr_at(1) == pytest.approx(2e-2 / 3)
    assert cosine.lr_at(2) == pytest.approx(1e-2)
    assert cosine.lr_at(7) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))        # half-way through the decay
    assert cosine.lr_at(12) == pytest.approx(1e-3) and cosine.lr_at(50) == pytest.approx(1e-3)
    assert cosine.apply(7) == opt.param_groups[0]["lr"]
    plateau = LRSchedule(opt, 1e-2, "plateau", total_steps=100, factor=0.5, patience=2)
    for loss in (1.0, 0.9, 0.95, 0.95, 0.91):        # 3 epochs without improvement > patience 2
        plateau.observe_validation(loss)
    assert plateau.lr_at(10) == pytest.approx(5e-3)
    restored = LRSchedule(opt, 1e-2, "plateau", total_steps=100, factor=0.5, patience=2)
    restored.load_state_dict(plateau.state_dict())
    assert restored.lr_at(10) == plateau.lr_at(10) and restored.best == 0.9


def test_tensorboard_request_without_the_package_is_a_clear_error(tmp_path):
    pytest.importorskip("matplotlib")
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    graphs = mlearn_si_graphs(8, dtype=torch.float32)
    with pytest.raises(ConfigError, match="'run.tensorboard' is true but the tensorboard package is not installed"):
        Trainer(_base(tmp_path, run={"tensorboard": True}), train_dataset=GraphListDataset(graphs))


def test_stress_loss_on_crystals_batched_with_a_molecule_has_finite_gradients():
    """A molecule (no volume, no stress label) in a batch with stress-labelled crystals must not turn the
    gradients NaN (the stress of a zero-volume structure is NaN and masked)."""
    from ase.build import molecule

    from matkit.graph import atoms_to_graph

    torch.manual_seed(0)
    model = build("test_pair_mlp", species=[1, 6, 8, 14], cutoff=3.5, hidden=8).double()
    crystal = mlearn_si_graphs(1, dtype=torch.float64)[0]
    crystal.has_stress = torch.tensor([True])
    mol = atoms_to_graph(molecule("CH3OH"), 3.5, dtype=torch.float64, energy=torch.tensor([-30.0], dtype=torch.float64),
                         forces=torch.zeros(6, 3, dtype=torch.float64),
                         stress=torch.full((1, 6), float("nan"), dtype=torch.float64))
    mol.has_stress = torch.tensor([False])
    batch = batch_graphs([crystal, mol])
    targets = batch_targets(batch)
    pred = model(batch, forces=True, stress=True, training=True)
    assert torch.isnan(pred["stress"][1]).all() and torch.isfinite(pred["stress"][0]).all()
    loss = loss_terms(pred, targets, loss_counts(targets), {"energy": 1.0, "forces": 1.0, "stress": 1.0})["total"]
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.radial[0].weight.grad.abs().sum() > 0


def test_helpers_moved_out_of_the_trainer_stay_importable_from_it():
    from matkit.training import prepare, run_log, state, trainer

    for module, names in ((prepare, ["random_split", "freeze_parameters", "check_hparams"]),
                          (state, ["rng_state", "set_rng_state", "TRAINING_STATE_VERSION"]),
                          (run_log, ["CSV_COLUMNS"])):
        for name in names:
            assert getattr(trainer, name) is getattr(module, name), name
            assert name in trainer.__all__


def test_training_split_is_the_data_packages_split():
    """Scripts that rebuild a card's validation split with matkit.data.random_split_indices get the trainer's."""
    from matkit.data import random_split_indices
    from matkit.training.prepare import random_split

    for n, fraction, seed in ((194, 0.1, 0), (228, 0.1, 0), (3, 0.01, 1), (10, 0.0, 0)):
        train, val = random_split(n, fraction, seed)
        expected = random_split_indices(n, fraction, seed)
        assert train == expected[0].tolist() and val == expected[1].tolist()
    assert len(random_split(3, 0.01, 1)[1]) == 1
    with pytest.raises(ConfigError, match="data.val_fraction"):
        random_split(1, 0.1, 0)


def test_select_by_picks_best_checkpoint_by_the_named_validation_error(tmp_path):
    """run.select_by: best.pt is the epoch with the lowest validation energy MAE, not the lowest validation loss
    (here the loss is forces only, so the two epochs differ)."""
    graphs = mlearn_si_graphs(24, dtype=torch.float32)
    config = _base(tmp_path, loss={"energy_weight": 0.0, "forces_weight": 1.0, "stress_weight": 0.0},
                   optim={"epochs": 8, "ema_decay": 0.0}, run={"select_by": "energy_mae"})
    trainer = Trainer(config, train_dataset=GraphListDataset(graphs))
    summary = trainer.fit()
    rows = [r for r in summary["history"] if r["val_loss"] is not None]
    by_energy = min(rows, key=lambda r: r["val_energy_mae"])
    by_loss = min(rows, key=lambda r: r["val_loss"])
    assert by_energy["epoch"] != by_loss["epoch"]          # otherwise this test could not tell the two apart
    payload = read_checkpoint(tmp_path / "best.pt")
    assert payload["metadata"]["epoch"] == by_energy["epoch"]
    assert payload["metadata"]["val_metrics"]["energy_mae"] == by_energy["val_energy_mae"]
    assert summary["best_val_loss"] == by_energy["val_loss"]
    assert read_checkpoint(tmp_path / "latest.pt")["training_state"]["best_score"] == by_energy["val_energy_mae"]


def test_select_by_rejects_unknown_and_unlabelled_numbers(tmp_path):
    with pytest.raises(ConfigError, match="run.select_by"):
        _base(tmp_path, run={"select_by": "force_mae"})
    graphs = mlearn_si_graphs(8, dtype=torch.float32)
    for g in graphs:
        del g.stress
    config = _base(tmp_path, loss={"stress_weight": 0.0}, optim={"epochs": 1}, run={"select_by": "stress_mae"})
    with pytest.raises(ConfigError, match="run.select_by.*stress labels.*validation split"):
        Trainer(config, train_dataset=GraphListDataset(graphs))         # before the first step, not after an epoch
