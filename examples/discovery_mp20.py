"""Matbench Discovery-style evaluation of CHGNet 0.3.0 on real Materials Project crystals (MP-20 subset).

Pipeline: MP-20 structures (CIF) -> FIRE + FrechetCellFilter relaxation (fmax 0.05 eV/Å, <= 500 steps) with
CHGNet's ASE calculator -> total energy (CHGNet predicts MP2020-corrected energies: no correction applied) ->
formation energy from the MP elemental references -> hull distance against the fixed MP hull
(``e_hull_MP + e_form_pred - e_form_MP``) -> metrics, tables and plots.

The run is sharded and resumable: rerunning the script continues where it stopped.

    PYTHONPATH=. OMP_NUM_THREADS=1 python examples/discovery_mp20.py --n-train 450 --workers 1

Caveats (see shared/data/cdvae_mp20_subset/PROVENANCE.md): inputs are MP-*relaxed* structures, labels are
near-hull only (e_above_hull <= 0.08 eV/atom), and CHGNet was trained on MPtrj (these materials are in its
training distribution). F1/DAF here are therefore not comparable to the WBM leaderboard.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from matkit.discovery.io import read_labels
from matkit.discovery.metrics import discovery_metrics
from matkit.discovery.report import write_report
from matkit.discovery.runner import merge_records, run

# the offline copy of the CDVAE MP-20 CSVs next to the repository (../shared/data); pass --data elsewhere
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cdvae_mp20_subset"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with MP-20 train.csv / val.csv")
    parser.add_argument("--n-train", type=int, default=450, help="rows of train.csv to add to all of val.csv")
    parser.add_argument("--out", type=Path, default=Path("runs/discovery_mp20"))
    parser.add_argument("--results", type=Path, default=Path("examples/results/discovery_mp20"))
    parser.add_argument("--n-shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    structures = args.out / "structures.csv"
    if not structures.exists():
        val = pd.read_csv(args.data / "val.csv", index_col=0)
        train = pd.read_csv(args.data / "train.csv", index_col=0).iloc[:args.n_train]
        pd.concat([val, train]).to_csv(structures)
    start = time.perf_counter()
    run(structures, args.out / "relax", calculator="chgnet", n_shards=args.n_shards, workers=args.workers,
        batched=False)
    wall = time.perf_counter() - start
    records = merge_records(args.out / "relax")
    labels = read_labels(structures)
    preds = records["e_form_per_atom"]
    metrics = discovery_metrics(labels, preds)
    args.results.mkdir(parents=True, exist_ok=True)
    write_report(labels, preds, args.results, metrics, title=f"CHGNet 0.3.0 on MP-20 (n={len(labels)})")
    summary = {
        "model": "CHGNet 0.3.0 (chgnet 0.4.2 wheel weights), energies on the MP2020-corrected scale",
        "structures": f"{len(labels)} MP-20 crystals: all {len(pd.read_csv(args.data / 'val.csv'))} of val.csv "
                      f"+ the first {len(labels) - len(pd.read_csv(args.data / 'val.csv'))} of train.csv",
        "relaxation": "FIRE + FrechetCellFilter, fmax 0.05 eV/A, max 500 steps",
        "e_form_MAE_eV_per_atom": float((preds - labels["e_form_per_atom_mp2020_corrected"]).abs().mean()),
        "converged": int(records["converged"].fillna(False).astype(bool).sum()),
        "errors": int((records["status"] != "ok").sum()),
        "mean_steps": float(records["n_steps"].mean()),
        "relax_wall_time_s_this_invocation": round(wall, 1),
        "sum_relax_time_s": round(float(records["wall_time"].sum()), 1),
        "metrics_full_set": {k: (float(v) if v == v else None) for k, v in metrics["full_test_set"].items()},
    }
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1))
    records.drop(columns=["structure", "traceback"], errors="ignore").to_csv(args.results / "records.csv.gz")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
