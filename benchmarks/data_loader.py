"""Data loader throughput against the time of a training step, on the bundled HDF5 datasets.

For every dataset (default ``datasets/mlearn_si.h5``, ``datasets/water_deepmd.h5``,
``datasets/acetylacetone_300K.h5``; a fixed random subset of ``--max-frames`` frames, default 160, keeps a run at
minutes) this reads the frames in random order through the training loader
(:class:`matkit.data.HDF5Dataset`, graphs built on the fly with a 5 Å cutoff in float32, batches of at most
``--max-atoms`` atoms from :func:`matkit.data.atom_batched_loader`) with ``num_workers`` = 0, 1, 2 (persistent
workers): one warm-up epoch (worker start-up, file opening) is excluded, then the median of ``--passes`` epochs,
each a new random order, gives frames/s and batches/s.

It then times one training step (the :class:`matkit.training.Trainer` step: energy + forces by autograd with the
graph kept, energy and force MSE loss, backward, AdamW step) of each model on the first ``--steps`` batches of an
epoch (median per batch after a warm-up step) and prints the ratio loader time per batch / step time per batch.
With ``num_workers > 0`` loading overlaps the step, so a ratio below 1 means the loader is not the bottleneck;
with 0 workers the ratio is the fraction the loading adds to every step. Models: TensorNet
(``hidden_channels=64``) and FAENet (defaults), both with ``cutoff=5.0`` to match the graphs.

The loader is measured alone (the main process only iterates), while in training the workers share the CPU
cores with the step; on a machine with fewer free cores than workers + 1 the ratios are optimistic. Wall-clock
numbers on a busy machine are inflated by other processes, so a second table compares CPU times (``process_time``)
of loading without workers and of the step: with ``w`` workers on free cores the loader keeps up when that ratio
is below ``w``.

    python benchmarks/data_loader.py
    python benchmarks/data_loader.py --datasets mlearn_si --max-frames 24 --workers 0,1 --passes 1 --steps 1  # smoke
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MODELS = {"tensornet": {"hidden_channels": 64, "cutoff": 5.0}, "faenet": {"cutoff": 5.0}}
DEFAULT_DATASETS = "mlearn_si,water_deepmd,acetylacetone_300K"


def time_epochs(loader, passes: int) -> tuple:
    """(median wall seconds per epoch, median CPU seconds of this process per epoch, batches per epoch, frames per
    epoch); epoch 0 is a warm-up. The CPU time is the whole loading cost only without workers."""
    times, cpu_times, n_batches, n_frames = [], [], 0, 0
    for epoch in range(passes + 1):
        loader.batch_sampler.set_epoch(epoch)
        n_batches = n_frames = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in loader:
            n_batches += 1
            n_frames += int(batch.num_graphs)
        if epoch > 0:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu_times), n_batches, n_frames


def step_times(model_name: str, species, batches, repeats_warmup: int = 1) -> tuple:
    """Wall and CPU seconds of one training step on each batch (after a warm-up step on the first)."""
    import torch

    import matkit
    from matkit.training.losses import batch_targets, loss_counts, loss_terms

    torch.manual_seed(0)
    model = matkit.build(model_name, species=species, **MODELS[model_name])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = {"energy": 1.0, "forces": 10.0}

    def step(batch):
        pred = model(batch, forces=True, stress=False, training=True)
        targets = batch_targets(batch)
        loss = loss_terms(pred, targets, loss_counts(targets), weights, "mse")["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(repeats_warmup):
        step(batches[0])
    times, cpu_times = [], []
    for batch in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return times, cpu_times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=DEFAULT_DATASETS, help="names in datasets/ (without .h5) or paths")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--max-atoms", type=int, default=512, help="atoms per batch (MaxAtomsBatchSampler)")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--passes", type=int, default=3, help="timed epochs per setting (after one warm-up)")
    parser.add_argument("--max-frames", type=int, default=160,
                        help="use a random subset of this many frames (0: all); keeps a run at minutes")
    parser.add_argument("--steps", type=int, default=6, help="batches on which the training step is timed")
    parser.add_argument("--models", default="tensornet,faenet")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from matkit.data import HDF5Dataset, atom_batched_loader
    from matkit.training.datasets import dataset_species

    torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    models = [m for m in args.models.split(",") if m]
    print(f"cutoff {args.cutoff} Å, float32, batches of <= {args.max_atoms} atoms, random order; loader: median of "
          f"{args.passes} epochs after a warm-up epoch; step: {', '.join(models)} energy+forces training step "
          f"({args.threads} thread(s)), median over {args.steps} batches; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    for name in args.datasets.split(","):
        path = Path(name) if name.endswith(".h5") else ROOT / "datasets" / f"{name}.h5"
        full = HDF5Dataset(str(path), cutoff=args.cutoff, dtype=torch.float32)
        indices = None
        if args.max_frames and args.max_frames < len(full):
            indices = np.sort(np.random.default_rng(0).choice(len(full), args.max_frames, replace=False))
        dataset = HDF5Dataset(str(path), cutoff=args.cutoff, dtype=torch.float32, indices=indices)
        full.close()
        loader_rows = {}
        for w in workers:
            loader = atom_batched_loader(dataset, args.max_atoms, shuffle=True, seed=0, num_workers=w)
            seconds, cpu_seconds, n_batches, n_frames = time_epochs(loader, args.passes)
            del loader  # stops persistent workers
            loader_rows[w] = dict(seconds=seconds, cpu_seconds=cpu_seconds, batches=n_batches, frames=n_frames)
            print(f"  {path.stem}: {w} workers: {n_frames / seconds:.0f} frames/s, {n_batches / seconds:.1f} "
                  f"batches/s", flush=True)
        # the same kind of batches for the step: the first `steps` batches of an epoch, loaded once
        loader = atom_batched_loader(dataset, args.max_atoms, shuffle=True, seed=0, num_workers=0)
        loader.batch_sampler.set_epoch(1)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) >= args.steps:
                break
        atoms = statistics.mean(int(b.num_nodes) for b in batches)
        edges = statistics.mean(int(b.edge_index.shape[1]) for b in batches)
        species = dataset_species(dataset)
        steps, step_cpu = {}, {}
        for model_name in models:
            wall, cpu = step_times(model_name, species, batches)
            steps[model_name], step_cpu[model_name] = statistics.median(wall), statistics.median(cpu)
            print(f"  {path.stem}: {model_name} step {steps[model_name] * 1e3:.0f} ms/batch "
                  f"(CPU {step_cpu[model_name] * 1e3:.0f} ms)", flush=True)
        rows.append(dict(dataset=path.stem, frames=len(dataset), atoms=atoms, edges=edges, loader=loader_rows,
                         steps=steps, step_cpu=step_cpu))
        dataset.close()

    print("\n| dataset | frames | batches/epoch | atoms/batch | edges/batch | workers | frames/s | batches/s | "
          "loader ms/batch | " + " | ".join(f"{m} step ms | loader/step {m}" for m in models) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(models))
    for row in rows:
        for w, r in row["loader"].items():
            per_batch = r["seconds"] / r["batches"]
            cells = " | ".join(f"{row['steps'][m] * 1e3:.0f} | {per_batch / row['steps'][m]:.2g}" for m in models)
            print(f"| {row['dataset']} | {row['frames']} | {r['batches']} | {row['atoms']:.0f} | {row['edges']:.0f} "
                  f"| {w} | {r['frames'] / r['seconds']:.1f} | {r['batches'] / r['seconds']:.1f} | "
                  f"{per_batch * 1e3:.1f} | {cells} |")
    # contention-free view: CPU time of loading (0 workers, all in this process) against CPU time of a step
    print("\nCPU time (process_time; not inflated by other processes): loading without workers vs one step\n")
    print("| dataset | load CPU ms/frame | load CPU ms/batch | " + " | ".join(
        f"{m} step CPU ms | load/step {m}" for m in models) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(models))
    for row in rows:
        r = row["loader"].get(0)
        if r is None:
            continue
        per_batch = r["cpu_seconds"] / r["batches"]
        cells = " | ".join(f"{row['step_cpu'][m] * 1e3:.0f} | {per_batch / row['step_cpu'][m]:.2g}" for m in models)
        print(f"| {row['dataset']} | {r['cpu_seconds'] / r['frames'] * 1e3:.1f} | {per_batch * 1e3:.1f} | {cells} |")
    return rows


if __name__ == "__main__":
    main()
