"""Put the universal potential on the Materials Project's energy scale by fine-tuning, then evaluate stability.

``examples/discovery_mp20.py`` maps ``tensornet-matpes-pbe`` (MatPES PBE, no Hubbard U) onto MP's mixed
GGA/GGA+U + MP2020 scale with fitted per-element references: a linear map in the composition, which leaves
0.059 eV/atom on the held-out crystals. Here the model itself learns MP's scale instead:

1. training data: the 847 MP-relaxed crystals of ``datasets/mp20_train.h5`` with total energies on MP's
   MP2020-corrected scale, ``E = N e_form + sum_el n_el mu_el`` (``e_form`` MP's formation energy, ``mu_el`` MP's
   2023-02-07 elemental references, the ones Matbench Discovery uses); energies only (MP-20 has no forces);
2. ``matkit train`` machinery: ``finetune.from_checkpoint: tensornet-matpes-pbe``, reference energies refitted
   first (the default), Huber loss on the energy per atom; 10 % of the train crystals (seed 0) held out to pick
   the variant and the epoch. The val crystals play no part in any choice. Variants (``VARIANTS``): only the
   output MLP trains (``head``), everything trains (``all``), or everything trains with the start model's own
   forces and stress on one rattled, strained copy of each training crystal as extra targets (``distilled``:
   MP-20 has no forces, and energies of relaxed crystals alone let the forces drift);
3. relax the 123 val crystals with the fine-tuned model (batched FIRE + FrechetCellFilter, float64) and compute
   formation energies with MP's references directly (``energy_scale="mp2020"``, as for CHGNet), then the
   benchmark's metrics;
4. what the fine-tuning cost elsewhere: energy and force errors of the start and the fine-tuned model against the 21
   MPtrj frames of ``datasets/mptrj_frames.h5`` (MP relaxation-trajectory frames with DFT forces and MP2020-corrected
   energies, none of them in MP-20).

    PYTHONPATH=. OMP_NUM_THREADS=1 python examples/discovery_mp20_finetuned.py [--variants head,all]

Results: ``examples/results/discovery_mp20/finetuned/``. Caveat as in ``discovery_mp20.py``: MP-relaxed inputs,
near-hull labels; the fine-tuned model was trained on 762 crystals of the same distribution.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from matkit.checkpoint import read_checkpoint, save_checkpoint, load_checkpoint
from matkit.data.hdf5 import FrameFile
from matkit.discovery.energies import elemental_reference_energies
from matkit.discovery.io import E_FORM_COL, read_labels
from matkit.discovery.metrics import discovery_metrics
from matkit.discovery.report import metrics_table, write_report
from matkit.discovery.runner import merge_records, run
from matkit.graph import atoms_to_graph
from matkit.training import GraphListDataset, config_from_dict, train
from matkit.training.prepare import random_split

ROOT = Path(__file__).resolve().parent.parent
START = "tensornet-matpes-pbe"
#: which parameters train: "head" = the output MLP and the per-element references only; "all" = everything;
#: "distilled" = everything, with the start model's forces and stress on rattled copies as extra targets
VARIANTS = {"head": ["embedding", "layers", "out_norm", "out_linear"], "all": [], "distilled": []}


def mp_scale_graphs(path: Path, cutoff: float):
    """Graphs of the crystals in ``path`` with total energies (eV) on MP's MP2020-corrected scale."""
    mu = elemental_reference_energies()
    graphs = []
    for frame in FrameFile(path):
        atoms = frame.to_atoms()
        e_form = float(frame.properties["formation_energy_per_atom"])
        energy = len(atoms) * e_form + sum(mu[s] for s in atoms.get_chemical_symbols())
        graphs.append(atoms_to_graph(  # no force or stress labels (NaN, flagged absent)
            atoms, cutoff, dtype=torch.float32, energy=torch.tensor([energy], dtype=torch.float64),
            forces=torch.full((len(atoms), 3), float("nan")), stress=torch.full((1, 6), float("nan")),
            has_energy=torch.tensor([True]), has_forces=torch.tensor([False]), has_stress=torch.tensor([False])))
    return graphs


def teacher_graphs(path: Path, cutoff: float, indices, copies: int = 1, seed: int = 0):
    """Rattled (0.05 Å) and strained (up to ±2 %) copies of the crystals in ``path`` labelled with the *start*
    model's forces and stress (float64) and no energy: targets that keep the fine-tuned forces where they were."""
    from matkit.calculator import MatkitCalculator

    calc = MatkitCalculator.from_pretrained(START, dtype="float64")
    rng = np.random.default_rng(seed)
    graphs = []
    frames = FrameFile(path)
    for index in indices:
        frame = frames[int(index)]
        for _ in range(copies):
            atoms = frame.to_atoms()
            strain = np.eye(3) + rng.uniform(-0.02, 0.02, size=(3, 3))
            atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
            atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
            atoms.calc = calc
            forces, stress = atoms.get_forces(), atoms.get_stress()
            graphs.append(atoms_to_graph(
                atoms, cutoff, dtype=torch.float32, energy=torch.tensor([float("nan")], dtype=torch.float64),
                forces=torch.as_tensor(forces, dtype=torch.float32),
                stress=torch.as_tensor(stress, dtype=torch.float32).reshape(1, 6),
                has_energy=torch.tensor([False]), has_forces=torch.tensor([True]), has_stress=torch.tensor([True])))
    return graphs


def finetune(variant: str, train_graphs, val_graphs, out: Path, epochs: int) -> tuple:
    """Fine-tune one variant -> (best checkpoint with energy_scale "mp2020", held-out E MAE eV/atom, CPU s)."""
    config = config_from_dict({
        "finetune": {"from_checkpoint": START, "freeze": VARIANTS[variant]},
        "data": {"seed": 0, "batch_size": 16},
        "loss": {"energy_weight": 1.0, "forces_weight": 1.0 if variant == "distilled" else 0.0,
                 "stress_weight": 1.0 if variant == "distilled" else 0.0, "kind": "huber", "huber_delta": 0.02},
        "optim": {"lr": 1e-3 if variant == "head" else 3e-4, "schedule": "cosine", "warmup_steps": 20,
                  "min_lr_ratio": 0.01, "ema_decay": 0.99, "grad_clip": 10.0, "epochs": epochs},
        "run": {"out_dir": str(out / variant), "seed": 0, "dtype": "float32", "progress": "off",
                "parity_plots": False, "log_every": 50}})
    best, timing = out / variant / "best.pt", out / variant / "finetune_cpu_s.json"
    if not best.exists():
        start = time.process_time()
        train(config, train_dataset=GraphListDataset(train_graphs), val_dataset=GraphListDataset(val_graphs))
        timing.write_text(json.dumps(time.process_time() - start))
    cpu = json.loads(timing.read_text()) if timing.exists() else float("nan")
    payload = read_checkpoint(best)
    mae = float(payload["metadata"]["val_metrics"]["energy_mae"])
    model = load_checkpoint(best)
    tagged = save_checkpoint(model, out / f"{variant}_mp2020.pt",
                             metadata={**payload["metadata"], "energy_scale": "mp2020",
                                       "fine_tuned_from": START, "variant": variant})
    return tagged, mae, cpu


def mptrj_errors(checkpoint) -> dict:
    """MAE of energy (eV/atom) and forces (eV/Å) against ``datasets/mptrj_frames.h5``, float64."""
    from matkit.potentials import checkpoint_path
    from matkit.training.datasets import load_dataset
    from matkit.training.evaluate import evaluate_model

    path = checkpoint if Path(checkpoint).exists() else checkpoint_path(checkpoint)
    model = load_checkpoint(path).double()
    metrics = evaluate_model(model, load_dataset(str(ROOT / "datasets" / "mptrj_frames.h5"), model.cutoff),
                             dtype=torch.float64).metrics()
    return {k: metrics[k] for k in ("energy_mae", "forces_mae")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "datasets")
    parser.add_argument("--out", type=Path, default=Path("runs/discovery_mp20_finetuned"))
    parser.add_argument("--results", type=Path,
                        default=ROOT / "examples" / "results" / "discovery_mp20" / "finetuned")
    parser.add_argument("--variants", default="head,all,distilled")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--n-shards", type=int, default=4)
    args = parser.parse_args(argv)

    graphs = mp_scale_graphs(args.data / "mp20_train.h5", 5.0)
    fit, held_out = random_split(len(graphs), 0.1, 0)  # the same 10 % of train held out for every variant
    summary = {}
    for variant in args.variants.split(","):
        data = [graphs[i] for i in fit]
        if variant == "distilled" and not (args.out / variant / "best.pt").exists():
            data = data + teacher_graphs(args.data / "mp20_train.h5", 5.0, fit)
        checkpoint, mae, cpu = finetune(variant, data, [graphs[i] for i in held_out], args.out, args.epochs)
        summary[variant] = {"held_out_train_e_mae": mae, "finetune_cpu_s": round(cpu, 1), "checkpoint": str(checkpoint)}
        print(variant, summary[variant])
    chosen = min(summary, key=lambda v: summary[v]["held_out_train_e_mae"])

    labels = read_labels(args.data / "mp20_val.h5")
    folder = args.out / f"val_{chosen}"
    start = time.perf_counter()
    run(args.data / "mp20_val.h5", folder, calculator=summary[chosen]["checkpoint"], n_shards=args.n_shards,
        batched=True, dtype="float64", energy_scale="mp2020", progress=False)
    wall = time.perf_counter() - start
    records = merge_records(folder)
    preds = records["e_form_per_atom"]
    err = (preds - labels[E_FORM_COL]).dropna()
    metrics = discovery_metrics(labels, preds)
    summary["chosen"] = chosen
    summary["val"] = {"e_form_mae_vs_mp": float(err.abs().mean()), "e_form_mean_signed_error": float(err.mean()),
                      "e_form_missing": int(len(labels) - len(err)),
                      "converged": int(records["converged"].fillna(False).astype(bool).sum()),
                      "mean_fire_steps": float(records["n_steps"].mean()), "relax_wall_s": round(wall, 1),
                      "metrics_full_set": {k: (float(v) if v == v else None)
                                           for k, v in metrics["full_test_set"].items()}}
    args.results.mkdir(parents=True, exist_ok=True)
    write_report(labels, preds, args.results, metrics, title=f"{START} fine-tuned on MP-20 train ({chosen}), "
                                                             f"MP-20 val (n={len(labels)})")
    metrics_table(metrics).to_csv(args.results / "metrics.csv")
    labels.join(preds.rename("e_form_finetuned")).to_csv(args.results / "records.csv.gz")
    summary["mptrj_frames"] = {name: mptrj_errors(path) for name, path in
                               (("start", START), ("fine-tuned", summary[chosen]["checkpoint"]))}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
