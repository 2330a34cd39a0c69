"""``matkit discovery run`` (relax structures, resumable, sharded) and ``matkit discovery metrics``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("discovery", help="Matbench Discovery-style evaluation (relax, metrics)",
                                   description="Matbench Discovery-style evaluation of a potential.")
    sub = parser.add_subparsers(dest="discovery_command", metavar="SUBCOMMAND")
    _add_run(sub)
    _add_metrics(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="relax structures and record energies / formation energies per shard",
                       description="Relax every structure (FIRE + FrechetCellFilter) and append one JSON record per "
                                   "structure to OUT/shard-*.jsonl. Rerunning resumes; --merge writes predictions.")
    p.add_argument("structures", type=Path, help="MP-20 CSV (cif column), WBM initial structures .json.bz2, "
                                                 ".extxyz or .extxyz.zip")
    p.add_argument("--calculator", "-c", required=True, help="'chgnet' or a matkit checkpoint path")
    p.add_argument("--out", "-o", type=Path, required=True, help="run directory")
    p.add_argument("--n-shards", type=int, default=1)
    p.add_argument("--shards", type=str, default=None,
                   help="comma-separated shard indices to run (default all; e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--energy-scale", choices=["raw", "mp2020"], default=None,
                   help="energy scale the model was trained on (default: chgnet -> mp2020, checkpoint metadata)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--no-batch", action="store_true", help="matkit models: relax one by one through ASE")
    p.add_argument("--max-atoms", type=int, default=4096, help="atom budget of the batched relaxer's pool")
    p.add_argument("--limit", type=int, default=None, help="only the first N structures")
    p.add_argument("--entries", type=Path, default=None,
                   help="WBM computed-structure-entries .json.bz2 (VASP parameters for the MP2020 corrections)")
    p.add_argument("--merge", type=Path, default=None, metavar="CSV",
                   help="after the run, merge (strict) and write the prediction CSV here")
    p.add_argument("--model-name", default="model", help="column suffix in the prediction CSV")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_run)


def _add_metrics(sub) -> None:
    p = sub.add_parser("metrics", help="metrics, tables and plots from predictions and labels",
                       description="Compute Matbench Discovery metrics from a predictions CSV (or a run directory) "
                                   "and DFT labels (WBM summary CSV or MP-20 CSV).")
    p.add_argument("predictions", type=Path, help="prediction CSV (material_id, e_form_per_atom_*) or run directory")
    p.add_argument("--labels", "-l", type=Path, required=True)
    p.add_argument("--column", default=None, help="formation-energy column of the predictions CSV")
    p.add_argument("--out", "-o", type=Path, default=None, help="write metrics.md/.csv and PNG plots here")
    p.add_argument("--most-stable", type=int, default=None, help="also the k most stable predictions subset")
    p.add_argument("--title", default="")
    p.set_defaults(func=_cmd_metrics)


def _cmd_run(args) -> int:
    from .relax import RelaxSettings
    from .runner import merge_records, run

    RelaxSettings(fmax=args.fmax, max_steps=args.max_steps)  # validate early
    shards = [int(s) for s in args.shards.split(",")] if args.shards else None
    counts = run(args.structures, args.out, calculator=args.calculator, n_shards=args.n_shards,
                 workers=args.workers, backend=args.backend, shards=shards, progress=not args.no_progress,
                 settings={"fmax": args.fmax, "max_steps": args.max_steps}, energy_scale=args.energy_scale,
                 device=args.device, dtype=args.dtype, batched=not args.no_batch, max_atoms=args.max_atoms,
                 limit=args.limit, entries=str(args.entries) if args.entries else None)
    done = sum(c["done"] for c in counts)
    errors = sum(c["errors"] for c in counts)
    skipped = sum(c["skipped"] for c in counts)
    print(f"relaxed {done}, failed {errors}, already done {skipped} (shards {[c['shard'] for c in counts]})")
    if args.merge:
        from .io import write_predictions

        records = merge_records(args.out)
        path = write_predictions(args.merge, records["e_form_per_atom"], args.model_name,
                                 energy=records.get("energy"))
        print(f"wrote {len(records)} predictions to {path}")
    return 0


def _cmd_metrics(args) -> int:
    import pandas as pd

    from .io import read_labels, read_predictions
    from .metrics import discovery_metrics
    from .report import metrics_table, write_report

    labels = read_labels(args.labels)
    if args.predictions.is_dir():
        from .runner import merge_records

        preds = merge_records(args.predictions)["e_form_per_atom"]
    else:
        preds = read_predictions(args.predictions, args.column)
    metrics = discovery_metrics(labels, preds, most_stable=args.most_stable)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(metrics_table(metrics).to_string(float_format=lambda v: f"{v:.4f}"))
    if args.out:
        paths = write_report(labels, preds, args.out, metrics, title=args.title)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
