"""Stability evaluation of matkit's universal potentials on real Materials Project crystals, next to CHGNet.

Data: the MP-20 crystals in ``datasets/`` (CDVAE subset, 1-20 atoms, within 0.08 eV/atom of the MP hull):
``mp20_train.h5`` (847) and ``mp20_val.h5`` (123).

For ``tensornet-matpes-pbe`` and ``tensornet-matpes-r2scan`` (energies on MatPES's own DFT scales):

1. relax all train and val crystals (FIRE + FrechetCellFilter, fmax 0.05 eV/Å, <= 500 steps; matkit's batched
   relaxer, float64) with ``matkit.discovery.run`` (sharded, resumable: rerunning continues where it stopped);
2. fit per-element reference energies on the **train** crystals only, for each correction choice (``none``,
   ``mp2020``, ``fitted-u``: :mod:`matkit.discovery.references`) and loss (least squares ``l2``, least absolute
   deviations ``l1``), and pick the combination with the lowest 5-fold cross-validated formation-energy MAE on
   train (the val crystals play no part in the choice);
3. formation energies of the **val** crystals with those references, hull distances with the benchmark's formula
   (``e_hull_MP + e_form_pred - e_form_MP``), the benchmark's metrics (outlier mask and rounding as upstream),
   plots; and, for comparison, hull distances of the val crystals against the hull of the train crystals
   (``matkit.discovery.hull``: how a material without labels would be judged).

CHGNet 0.3.0 (MP2020-corrected energies: MP's references directly, no fit) relaxes the same val crystals through
its ASE calculator in the same run. Results go to ``examples/results/discovery_mp20/``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python examples/discovery_mp20.py [--workers 2] [--models ...]

Caveats: inputs are MP-*relaxed* structures, labels are near-hull only, CHGNet was trained on MPtrj (these
materials are in its training distribution) and MatPES contains MP ground states too. F1/DAF here are therefore
not comparable to the WBM leaderboard; the formation-energy MAE is the informative number.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from matkit.discovery.hull import hull_distances, read_hull_entries
from matkit.discovery.io import E_FORM_COL, E_HULL_COL, read_labels
from matkit.discovery.metrics import discovery_metrics
from matkit.discovery.references import (CORRECTIONS, LOSSES, cross_validated_formation_energies,
                                        fit_reference_energies)
from matkit.discovery.relax import atoms_from_dict
from matkit.discovery.report import metrics_table, write_report
from matkit.discovery.runner import merge_records, recompute_formation_energies, run

ROOT = Path(__file__).resolve().parent.parent
UNIVERSAL = ("tensornet-matpes-pbe", "tensornet-matpes-r2scan")


def relax(model: str, split: str, out: Path, args) -> tuple:
    """Relax one split with one model (resumable) -> (merged records, wall time spent relaxing, s).

    The wall time of every invocation that relaxed something is added up in ``<run>/relax_wall_time.json``, so a
    resumed run still reports the time its relaxations took."""
    folder = out / model / split
    start = time.perf_counter()
    counts = run(args.data / f"mp20_{split}.h5", folder, calculator=model, n_shards=args.n_shards,
                 workers=args.workers, batched=model != "chgnet", dtype="float64", progress=False)
    timing = folder / "relax_wall_time.json"
    spent = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
    if sum(c["done"] + c["errors"] for c in counts):
        spent += time.perf_counter() - start
        timing.write_text(json.dumps({"seconds": spent, "threads": 1, "workers": args.workers}))
    return merge_records(folder), round(spent, 1)


def choose_references(records: pd.DataFrame, labels: pd.DataFrame) -> tuple:
    """Fit references on the train records for every correction choice; pick the lowest 5-fold CV MAE."""
    ok = records[records["status"] == "ok"]
    structures = [atoms_from_dict(d) for d in ok["structure"]]
    energies, target = ok["energy"].astype(float).to_numpy(), labels.loc[ok.index, E_FORM_COL].to_numpy()
    cv = {}
    for corrections in CORRECTIONS:
        for loss in LOSSES:
            predicted = cross_validated_formation_energies(structures, energies, target, corrections=corrections,
                                                           loss=loss)
            good = np.isfinite(predicted)
            cv[f"{corrections}/{loss}"] = {"cv_mae": float(np.abs(predicted[good] - target[good]).mean()),
                                           "cv_missing": int((~good).sum())}
    best = min(cv, key=lambda c: cv[c]["cv_mae"])
    corrections, loss = best.split("/")
    fit = fit_reference_energies(structures, energies, target, corrections=corrections, loss=loss,
                                 fitted_on=f"{len(ok)} crystals of mp20_train.h5")
    return fit, cv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "datasets", help="folder with mp20_train/val.h5")
    parser.add_argument("--out", type=Path, default=Path("runs/discovery_mp20"))
    parser.add_argument("--results", type=Path, default=ROOT / "examples" / "results" / "discovery_mp20")
    parser.add_argument("--models", nargs="+", default=[*UNIVERSAL, "chgnet"])
    parser.add_argument("--n-shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    train_labels, val_labels = read_labels(args.data / "mp20_train.h5"), read_labels(args.data / "mp20_val.h5")
    train_hull = read_hull_entries(args.data / "mp20_train.h5")
    summary, tables, per_structure = {}, [], {}
    for model in args.models:
        info = {}
        if model in UNIVERSAL:
            train_records, info["relax_wall_s_train"] = relax(model, "train", args.out, args)
            fit, info["references_cv_on_train"] = choose_references(train_records, train_labels)
            fit.save(args.results / f"references_{model}.json")
            info["references"] = {"corrections": fit.corrections, "loss": fit.loss, "elements": len(fit.elements),
                                  "u_terms": len(fit.u_terms), "fit_mae_train": fit.fit_mae}
            val_records, info["relax_wall_s_val"] = relax(model, "val", args.out, args)
            preds = recompute_formation_energies(val_records, fit)
        else:
            val_records, info["relax_wall_s_val"] = relax(model, "val", args.out, args)
            preds = val_records["e_form_per_atom"]
        metrics = discovery_metrics(val_labels, preds)
        err = (preds - val_labels[E_FORM_COL]).dropna()
        hull = hull_distances(train_hull, val_labels["formula"], preds)
        hull_err = (hull["e_above_hull_pred"] - val_labels[E_HULL_COL]).dropna()
        info.update({
            "val_crystals": len(val_labels), "failed": int((val_records["status"] != "ok").sum()),
            "converged": int(val_records["converged"].fillna(False).astype(bool).sum()),
            "mean_fire_steps": float(val_records["n_steps"].mean()),
            "e_form_mae_vs_mp": float(err.abs().mean()), "e_form_mean_signed_error": float(err.mean()),
            "e_form_missing": int(len(val_labels) - len(err)),
            "hull_from_train_entries_mae": float(hull_err.abs().mean()),
            "metrics_full_set": {k: (float(v) if v == v else None) for k, v in metrics["full_test_set"].items()},
        })
        summary[model] = info
        write_report(val_labels, preds, args.results / model, metrics, title=f"{model} on MP-20 val (n=123)")
        tables.append(metrics_table(metrics).rename(index={"full_test_set": model}))
        per_structure[f"e_form_{model}"] = preds
        per_structure[f"e_hull_from_train_{model}"] = hull["e_above_hull_pred"]
        print(model, json.dumps(info, indent=1))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1))
    table = pd.concat(tables)
    table.insert(0, "e_form MAE", [summary[m]["e_form_mae_vs_mp"] for m in args.models])
    table.to_csv(args.results / "metrics.csv")
    records = val_labels.join(pd.DataFrame(per_structure))
    records.to_csv(args.results / "records.csv.gz")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
