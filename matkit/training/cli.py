"""``matkit train`` and ``matkit evaluate`` sub-commands.

::

    matkit train config.yaml [optim.lr=1e-3 run.out_dir=runs/x ...] [--resume [latest.pt]]
    torchrun --nproc_per_node=4 $(which matkit) train config.yaml      # data-parallel (also srun)
    matkit evaluate runs/x/best.pt datasets/si.h5 [--json errors.json] [--split val] [--per-element] [--per-group]
                    [--bootstrap 2000 [--baseline other.pt]]

Errors are one line naming the key or file (:func:`matkit.cli.main`; ``--debug`` shows the traceback).
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["register", "run_train", "run_evaluate"]


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train a potential from a YAML configuration",
        description="Train a potential. Overrides are dotted keys, e.g. optim.lr=1e-3 data.batch_size=4. "
                    "For several processes launch with torchrun (or srun): each rank gets part of each batch.")
    train.add_argument("config", help="YAML training configuration (see examples/train_config.yaml)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                       help="continue a run exactly from CHECKPOINT (default: <run.out_dir>/latest.pt)")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="errors of a checkpoint on a labelled dataset",
        description="MAE and RMSE of energy per atom, force components and stress components.")
    evaluate.add_argument("checkpoint", help="matkit checkpoint (.pt)")
    evaluate.add_argument("dataset", help="labelled dataset (.h5 matkit HDF5, or extxyz / ASE-readable)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--dtype", choices=["float32", "float64"], default=None,
                          help="default: the checkpoint's parameter dtype")
    evaluate.add_argument("--split", choices=["all", "val", "train"], default="all",
                          help="with a checkpoint from `matkit train`: evaluate only its validation or training "
                               "split of the same dataset file")
    evaluate.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    evaluate.add_argument("--plots", metavar="DIR", help="also write parity plots (parity_energy.png, "
                                                          "parity_forces.png, ...) into DIR")
    evaluate.add_argument("--per-element", action="store_true",
                          help="also print (and with --json write) the force errors split by element")
    evaluate.add_argument("--per-group", action="store_true",
                          help="also print (and with --json write) the energy and force errors split by "
                               "configuration type (frames/groups of a matkit HDF5 file, config_type of extxyz)")
    evaluate.add_argument("--bootstrap", type=int, default=0, metavar="N",
                          help="also print (and with --json write) 95 %% intervals of the energy and force MAE and "
                               "RMSE from N resamplings of the evaluated structures (e.g. 2000): how far a small "
                               "validation split's errors could move with another draw of structures")
    evaluate.add_argument("--baseline", metavar="CHECKPOINT",
                          help="with --bootstrap: also evaluate CHECKPOINT on the same structures and print "
                               "intervals of the differences of the errors (this minus baseline) on the same draws, "
                               "a paired comparison of two potentials")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=run_evaluate)


def run_train(args) -> int:
    """``matkit train``. Problems with the configuration, the data or a checkpoint raise one-line
    :class:`~matkit.training.config.ConfigError` / :class:`~matkit.checkpoint.CheckpointError` messages naming the
    key or file; :func:`matkit.cli.main` prints them as one line (the traceback with ``--debug``)."""
    from .config import ConfigError, load_config
    from .trainer import train

    config = load_config(args.config, args.overrides)
    resume = args.resume
    if resume == "auto":
        resume = str(Path(config.run.out_dir) / "latest.pt")
        if not Path(resume).exists():
            raise ConfigError(f"--resume: {resume} does not exist")
    summary = train(config, resume=resume)
    best = summary.get("best_val_metrics") or {}
    if best:
        from .evaluate import format_metrics_table

        print("validation split, best model (EMA weights):")
        print(format_metrics_table(best))
    return 0


def run_evaluate(args) -> int:
    import torch

    from ..checkpoint import CheckpointError, load_checkpoint
    from .datasets import load_dataset, structure_groups
    from .evaluate import (bootstrap_intervals, errors_by_group, evaluate_model, force_errors_by_element,
                           format_element_table, format_group_table, format_interval_table, format_metrics_table,
                           metrics_json)

    if args.bootstrap < 0:
        print(f"matkit evaluate: --bootstrap must be >= 0, got {args.bootstrap}", file=sys.stderr)
        return 2
    if args.baseline and not args.bootstrap:
        print("matkit evaluate: --baseline needs --bootstrap N (e.g. --bootstrap 2000)", file=sys.stderr)
        return 2
    try:
        model, payload = load_checkpoint(args.checkpoint, return_payload=True)
    except CheckpointError as err:
        print(f"matkit evaluate: {err}", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(args.dtype) if args.dtype else None
    if dtype is not None:
        model = model.to(dtype)
    try:
        dataset = load_dataset(args.dataset, model.cutoff, dtype=dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"matkit evaluate: {err}", file=sys.stderr)
        return 2
    indices = None
    if args.split != "all":
        state = payload.get("training_state")
        meta_split = (payload.get("metadata") or {}).get(f"{args.split}_indices")
        if state is not None:
            indices = state[f"{args.split}_indices"].tolist()
        elif meta_split is not None:
            indices = list(meta_split)
        else:
            print(f"matkit evaluate: --split {args.split}: the checkpoint records no split", file=sys.stderr)
            return 2
    groups = None
    if args.per_group:
        try:
            groups = structure_groups(dataset)
        except ValueError as err:
            print(f"matkit evaluate: --per-group: {args.dataset}: {err}", file=sys.stderr)
            return 2
        groups = groups if indices is None else [groups[i] for i in indices]
    progress = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        progress = lambda it: tqdm(it, desc="evaluate")  # noqa: E731
    collect = bool(args.plots or args.per_element or args.per_group or args.bootstrap)
    result = evaluate_model(model, dataset, batch_size=args.batch_size, device=args.device, dtype=dtype,
                            indices=indices, collect=collect, progress=progress)
    n = len(dataset) if indices is None else len(indices)
    metrics = result.metrics()
    print(f"{payload['model']} checkpoint {args.checkpoint} on {args.dataset} ({args.split}):")
    print(format_metrics_table(metrics, n))
    extra = {}
    if args.per_element:
        extra["forces_by_element"] = force_errors_by_element(result.predictions.arrays())
        print(format_element_table(extra["forces_by_element"]))
    if groups is not None:
        extra["by_group"] = errors_by_group(result.predictions.arrays(), groups)
        print(format_group_table(extra["by_group"]))
    baseline = None
    if args.baseline:
        try:
            other = load_checkpoint(args.baseline)
        except CheckpointError as err:
            print(f"matkit evaluate: --baseline: {err}", file=sys.stderr)
            return 2
        # the same structures, labels and dtype; graphs at the baseline's own cutoff (read again only if it differs)
        same_dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
        other = other.to(same_dtype)
        other_data = dataset if other.cutoff == model.cutoff else load_dataset(args.dataset, other.cutoff, dtype=dtype)
        other_result = evaluate_model(other, other_data, batch_size=args.batch_size, device=args.device,
                                      dtype=same_dtype, indices=indices, collect=True, progress=progress)
        baseline = other_result.predictions.arrays()
        extra["baseline"] = {"checkpoint": str(args.baseline), "metrics": other_result.metrics()}
        print(f"baseline {args.baseline}:")
        print(format_metrics_table(other_result.metrics(), n))
    if args.bootstrap:
        intervals = bootstrap_intervals(result.predictions.arrays(), resamples=args.bootstrap, baseline=baseline)
        extra["bootstrap"] = {"resamples": args.bootstrap, "level": 0.95, "seed": 0, **intervals}
        print(format_interval_table(intervals, args.bootstrap, n))
    if args.json:
        Path(args.json).write_text(metrics_json(metrics, checkpoint=str(args.checkpoint), dataset=str(args.dataset),
                                                split=args.split, structures=n, **extra) + "\n")
    if args.plots:
        from .plots import write_parity_plots

        Path(args.plots).mkdir(parents=True, exist_ok=True)
        label = "validation split" if args.split == "val" else f"{args.split} split"
        for path in write_parity_plots(result.predictions.arrays(), args.plots, label):
            print(f"wrote {path}")
    return 0
