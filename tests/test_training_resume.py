"""Exact resume: a run stopped mid-epoch and resumed from ``latest.pt`` equals the uninterrupted run bit for
bit (CPU, deterministic mode): weights, optimiser state, EMA, best checkpoint and logged losses."""
from __future__ import annotations

import csv

import pytest
import torch

from matkit.checkpoint import read_checkpoint
from matkit.training import GraphListDataset, config_from_dict, train
from test_training_support import mlearn_si_graphs


class SimulatedKill(RuntimeError):
    pass


def _config(out_dir, dtype="float64"):
    return config_from_dict({
        "model": {"name": "test_pair_mlp", "hparams": {"cutoff": 3.5, "hidden": 8}},
        "data": {"batch_size": 3, "val_fraction": 0.25, "seed": 3},
        "loss": {"energy_weight": 1.0, "forces_weight": 10.0, "stress_weight": 1.0},
        "optim": {"lr": 5e-3, "epochs": 3, "schedule": "cosine", "warmup_steps": 2, "ema_decay": 0.9,
                  "grad_clip": 1.0, "weight_decay": 1e-4},
        "run": {"out_dir": str(out_dir), "seed": 11, "deterministic": True, "dtype": dtype,
                "checkpoint_every_steps": 2, "parity_plots": False},
    })


def _step_rows(path):
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_resume_mid_epoch_is_bitwise_identical(tmp_path, dtype):
    graphs = mlearn_si_graphs(12, dtype=getattr(torch, dtype))
    data = GraphListDataset(graphs)
    # 9 training structures, batches of 3: 3 steps per epoch, 9 steps in all
    full = train(_config(tmp_path / "full", dtype), train_dataset=data)
    assert full["steps"] == 9

    def kill_after_step_5(trainer):  # latest.pt was written at step 4 (epoch 2, 1 step into it)
        if trainer.step == 5:
            raise SimulatedKill

    with pytest.raises(SimulatedKill):
        train(_config(tmp_path / "killed", dtype), train_dataset=data, callbacks=[kill_after_step_5])
    state = read_checkpoint(tmp_path / "killed/latest.pt")["training_state"]  # weights_only=True load
    assert (int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])) == (4, 1, 1)
    resumed = train(_config(tmp_path / "killed", dtype), train_dataset=data,
                    resume=str(tmp_path / "killed/latest.pt"))
    assert resumed["steps"] == 9

    a = read_checkpoint(tmp_path / "full/latest.pt")
    b = read_checkpoint(tmp_path / "killed/latest.pt")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    sa, sb = a["training_state"], b["training_state"]
    for key, value in sa["ema"]["shadow"].items():
        assert torch.equal(value, sb["ema"]["shadow"][key]), f"ema {key}"
    for pid, pstate in sa["optimizer"]["state"].items():
        for name, tensor in pstate.items():
            assert torch.equal(tensor, sb["optimizer"]["state"][pid][name]), f"optimizer {pid} {name}"
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    assert sa["best_val_loss"] == sb["best_val_loss"]
    best_a = read_checkpoint(tmp_path / "full/best.pt")["state_dict"]
    best_b = read_checkpoint(tmp_path / "killed/best.pt")["state_dict"]
    for key, value in best_a.items():
        assert torch.equal(value, best_b[key]), f"best {key}"
    # the log of the resumed run holds the same rows (losses bitwise equal as printed), none duplicated
    rows_a = [{k: v for k, v in r.items() if k != "time_s"} for r in _step_rows(tmp_path / "full/metrics.csv")]
    rows_b = [{k: v for k, v in r.items() if k != "time_s"} for r in _step_rows(tmp_path / "killed/metrics.csv")]
    assert rows_a == rows_b
    assert [int(r["step"]) for r in rows_a if r["kind"] == "step"] == list(range(1, 10))
    # the weights did train: the final weights differ from the first checkpoint's
    assert resumed["best_val_loss"] < full["history"][0]["val_loss"]
