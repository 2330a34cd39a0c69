"""``matkit discovery run`` (relax structures, resumable, sharded), ``fit-references`` (formation energies on a
model's own energy scale), ``metrics`` (the benchmark's metrics and plots) and ``hull`` (predicted hull distances
of materials without DFT labels, against a convex hull of known entries)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("discovery", help="Matbench Discovery-style evaluation (relax, metrics)",
                                   description="Matbench Discovery-style evaluation of a potential.")
    sub = parser.add_subparsers(dest="discovery_command", metavar="SUBCOMMAND")
    _add_run(sub)
    _add_fit_references(sub)
    _add_metrics(sub)
    _add_hull(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="relax structures and record energies / formation energies per shard",
                       description="Relax every structure (FIRE + FrechetCellFilter) and append one JSON record per "
                                   "structure to OUT/shard-*.jsonl. Rerunning resumes; --merge writes predictions.")
    p.add_argument("structures", type=Path, help="MP-20 CSV (cif column), WBM initial structures .json.bz2, "
                                                 ".extxyz, .extxyz.zip or a matkit .h5 dataset")
    p.add_argument("--calculator", "-c", required=True,
                   help="'chgnet', a matkit checkpoint path or a bundled potential's name (e.g. tensornet-matpes-pbe)")
    p.add_argument("--out", "-o", type=Path, required=True, help="run directory")
    p.add_argument("--n-shards", type=int, default=1)
    p.add_argument("--shards", type=str, default=None,
                   help="comma-separated shard indices to run (default all; e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--energy-scale", choices=["raw", "mp2020", "own"], default=None,
                   help="energy scale the model was trained on (default: chgnet -> mp2020, checkpoint metadata); "
                        "'own' (e.g. MatPES) needs --references for formation energies")
    p.add_argument("--references", type=Path, default=None,
                   help="fitted reference energies (JSON from 'matkit discovery fit-references'): formation energies "
                        "on the model's own scale instead of MP2020 corrections + MP's elemental references")
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


def _add_fit_references(sub) -> None:
    p = sub.add_parser("fit-references", help="fit per-element reference energies on a model's own energy scale",
                       description="Least-squares chemical potentials that make a model's formation energies of "
                                   "relaxed training crystals match known (MP) ones; see matkit.discovery.references.")
    p.add_argument("run_dir", type=Path, help="run directory of 'matkit discovery run' on the training crystals")
    p.add_argument("--labels", "-l", type=Path, required=True, help="their DFT labels (MP-20 .h5/.csv, WBM summary)")
    p.add_argument("--out", "-o", type=Path, required=True, help="JSON file to write")
    p.add_argument("--corrections", choices=["none", "mp2020", "fitted-u"], default="none")
    p.add_argument("--loss", choices=["l2", "l1"], default="l2",
                   help="least squares (l2) or least absolute deviations (l1, the benchmark's MAE)")
    p.add_argument("--regularization", type=float, default=1e-6, help="ridge weight toward MP's references")
    p.set_defaults(func=_cmd_fit_references)


def _add_hull(sub) -> None:
    p = sub.add_parser("hull", help="predicted hull distances against a convex hull of known entries",
                       description="Hull distance of each predicted formation energy against the convex hull of the "
                                   "given entries (for new materials without DFT labels). Entries: pymatgen "
                                   "ComputedEntry JSON (e.g. an MP export; energies on the MP2020-corrected scale) or "
                                   "a labels file with formation energies (MP-20 .h5/.csv).")
    p.add_argument("run_dir", type=Path, help="run directory of 'matkit discovery run' (its records hold the "
                                              "compositions and formation energies)")
    p.add_argument("--entries", "-e", type=Path, required=True)
    p.add_argument("--out", "-o", type=Path, required=True, help="CSV to write")
    p.add_argument("--references", type=Path, default=None, help="recompute the run's formation energies with these")
    p.set_defaults(func=_cmd_hull)


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
    p.add_argument("--references", type=Path, default=None,
                   help="recompute a run directory's formation energies with these fitted references")
    p.add_argument("--max-error", type=float, default=5.0,
                   help="outlier mask: |e_form_pred - e_form_dft| above this (eV/atom) counts as failed, as upstream")
    p.add_argument("--no-outlier-mask", action="store_true", help="keep predictions however far from DFT")
    p.add_argument("--no-rounding", action="store_true",
                   help="do not round labels and predictions to 3 decimals before classifying (upstream rounds)")
    p.set_defaults(func=_cmd_metrics)


def _cmd_run(args) -> int:
    import pandas as pd

    from .relax import RelaxSettings
    from .runner import merge_records, run

    RelaxSettings(fmax=args.fmax, max_steps=args.max_steps)  # validate early
    shards = [int(s) for s in args.shards.split(",")] if args.shards else None
    if args.references is not None:
        from .references import ReferenceFit

        ReferenceFit.load(args.references)  # validate early
    counts = run(args.structures, args.out, calculator=args.calculator, n_shards=args.n_shards,
                 workers=args.workers, backend=args.backend, shards=shards, progress=not args.no_progress,
                 settings={"fmax": args.fmax, "max_steps": args.max_steps}, energy_scale=args.energy_scale,
                 device=args.device, dtype=args.dtype, batched=not args.no_batch, max_atoms=args.max_atoms,
                 limit=args.limit, entries=str(args.entries) if args.entries else None,
                 references=str(args.references.resolve()) if args.references else None)
    done = sum(c["done"] for c in counts)
    errors = sum(c["errors"] for c in counts)
    skipped = sum(c["skipped"] for c in counts)
    print(f"relaxed {done}, failed {errors}, already done {skipped} (shards {[c['shard'] for c in counts]})")
    if args.merge:
        from .io import write_predictions

        records = merge_records(args.out)
        path = write_predictions(args.merge, records["e_form_per_atom"], args.model_name,
                                 energy=records.get("energy"), flags=records.get("flags"))
        flagged = records.get("flags", pd.Series(dtype=object)).fillna("").astype(bool).sum()
        print(f"wrote {len(records)} predictions to {path} ({flagged} flagged: see its {args.model_name}_flags "
              "column)")
    return 0


def _cmd_metrics(args) -> int:
    import pandas as pd

    from .io import read_labels
    from .metrics import discovery_metrics
    from .report import metrics_table, write_report

    labels = read_labels(args.labels)
    preds = _predictions(args.predictions, args.column, args.references)
    max_error = None if args.no_outlier_mask else args.max_error
    metrics = discovery_metrics(labels, preds, most_stable=args.most_stable, max_error=max_error,
                                decimals=None if args.no_rounding else 3)
    masked = metrics["full_test_set"]["masked_outliers"]
    print(f"hull distances: e_hull_dft + e_form_pred - e_form_dft (the benchmark's); outlier mask "
          f"{'off' if max_error is None else f'{max_error} eV/atom: {masked} masked'}; "
          f"rounding {'off' if args.no_rounding else 'to 3 decimals'}")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(metrics_table(metrics).to_string(float_format=lambda v: f"{v:.4f}"))
    if args.out:
        paths = write_report(labels, preds, args.out, metrics, title=args.title)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _predictions(source: Path, column=None, references=None):
    """Predicted formation energies from a run directory (optionally recomputed with references) or a CSV."""
    from .io import read_predictions

    if source.is_dir():
        from .runner import merge_records

        return _record_predictions(merge_records(source), references)
    if references is not None:
        raise ValueError("--references needs a run directory (the records hold the energies and structures)")
    return read_predictions(source, column)


def _record_predictions(records, references=None):
    """The formation energies of merged run records, recomputed with fitted references if given."""
    if references is None:
        return records["e_form_per_atom"]
    from .references import ReferenceFit
    from .runner import recompute_formation_energies

    return recompute_formation_energies(records, ReferenceFit.load(references))


def _cmd_fit_references(args) -> int:
    import numpy as np

    from .io import E_FORM_COL, read_labels
    from .references import fit_reference_energies
    from .relax import atoms_from_dict
    from .runner import merge_records

    records = merge_records(args.run_dir)
    ok = records[records["status"] == "ok"]
    labels = read_labels(args.labels)
    unknown = ok.index.difference(labels.index)
    if len(unknown):
        raise SystemExit(f"error: {len(unknown)} relaxed materials have no label in {args.labels}, e.g. "
                         f"{list(unknown[:5])}")
    structures = [atoms_from_dict(d) for d in ok["structure"]]
    fit = fit_reference_energies(structures, ok["energy"].astype(float).to_numpy(),
                                 labels.loc[ok.index, E_FORM_COL].to_numpy(), corrections=args.corrections,
                                 regularization=args.regularization, loss=args.loss,
                                 fitted_on=f"{len(ok)} crystals of {args.labels.name}")
    fit.save(args.out)
    print(f"fitted {len(fit.elements)} element references"
          f"{' and ' + str(len(fit.u_terms)) + ' U terms' if fit.u_terms else ''} "
          f"({fit.corrections}, {fit.loss}) on {fit.n_fit} crystals "
          f"({len(records) - len(ok)} failed relaxations left out): "
          f"training MAE {fit.fit_mae:.4f} eV/atom; wrote {args.out}")
    if not np.isfinite(fit.fit_mae):
        return 1
    return 0


def _cmd_hull(args) -> int:
    from .hull import hull_distances, read_hull_entries

    from .runner import merge_records

    records = merge_records(args.run_dir)
    entries = read_hull_entries(args.entries)
    out = hull_distances(entries, records["formula"], _record_predictions(records, args.references))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out)
    n_ok = int(out["e_above_hull_pred"].notna().sum())
    print(f"predicted hull distances of {n_ok} of {len(out)} materials against the hull of {len(entries)} "
          f"entries from {args.entries.name} ({int((out['e_above_hull_pred'] <= 0).sum())} on or below it); "
          f"wrote {args.out}")
    return 0
