"""Batched FIRE/Frechet relaxer vs the ASE path (FIRE(FrechetCellFilter) + MatkitCalculator), same model, CPU.

Default model: Lennard-Jones with a smooth cutoff (sigma 2 Å, epsilon 0.05 eV, rc 5 Å) for every element (no bundled
potential covers these elements; LJ is exact and smooth, so both paths must reach the same minima). (LJ is not a
physical model of these oxides/intermetallics; the relaxations are long, 30-150 FIRE steps, which is what a
throughput test needs.) Structures: the first N MP-20 crystals of datasets/mp20_val.h5 then datasets/mp20_train.h5.

    PYTHONPATH=. OMP_NUM_THREADS=1 python examples/discovery_batched_benchmark.py --n 100

With ``--potential NAME`` the model is a bundled Si potential instead (e.g. ``tensornet-si``) and the structures are
small strained and rattled diamond-Si cells (2-16 atoms, Matbench-like sizes; see ``potential_workload``):

    PYTHONPATH=. OMP_NUM_THREADS=1 python examples/discovery_batched_benchmark.py --n 100 --potential tensornet-si \
        --out examples/results/discovery_batched_benchmark_tensornet_si.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import matkit
from matkit.calculator import MatkitCalculator
from matkit.discovery.batched_relax import BatchedRelaxer
from matkit.discovery.io import read_structures
from matkit.discovery.relax import relax_atoms

DATA = Path(__file__).resolve().parent.parent / "datasets"


def potential_workload(name: str, n: int, seed: int = 0):
    """``n`` small Si cells and the bundled Si potential ``name``.

    Matbench-like sizes (2-16 atoms): diamond Si as the 2-atom primitive cell, the 8-atom cubic cell or 2x1x1 /
    2x2x1 supercells of the primitive cell, each with a random strain of up to ±3 % and a 0.05 Å rattle (seeded).
    """
    from ase.build import bulk

    from matkit.checkpoint import load_checkpoint
    from matkit.potentials import checkpoint_path

    model = load_checkpoint(checkpoint_path(name))
    if 14 not in model.species:
        raise SystemExit(f"--potential {name}: this workload is silicon; the potential covers {model.species}")
    rng = np.random.default_rng(seed)
    shapes = [("primitive", (1, 1, 1)), ("cubic", (1, 1, 1)), ("primitive", (2, 1, 1)), ("primitive", (2, 2, 1)),
              ("primitive", (2, 2, 2))]
    atoms = []
    for k in range(n):
        kind, repeat = shapes[k % len(shapes)]
        a = bulk("Si", "diamond", a=5.43, cubic=kind == "cubic").repeat(repeat)
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, size=(3, 3))
        a.set_cell(a.cell.array @ (strain + strain.T) / 2, scale_atoms=True)
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        atoms.append(a)
    return atoms, model, f"{name} (bundled potential), {n} strained and rattled diamond-Si cells of 2-16 atoms"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--potential", default=None, help="bundled potential (default: the LJ model on MP-20)")
    parser.add_argument("--out", type=Path, default=Path("examples/results/discovery_batched_benchmark.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.potential:
        atoms, model, model_name = potential_workload(args.potential, args.n)
    else:
        pairs = read_structures(DATA / "mp20_val.h5") + read_structures(DATA / "mp20_train.h5",
                                                                         limit=max(0, args.n - 123))
        atoms = [a for _, a in pairs[:args.n]]
        model = matkit.build("lj", sigma=2.0, epsilon=0.05, rc=5.0, smooth=True)
        model_name = "LJ smooth cutoff sigma=2.0 epsilon=0.05 rc=5.0 (all elements)"

    calc = MatkitCalculator(model, dtype=args.dtype)
    start = time.perf_counter()
    ref = [relax_atoms(a, calc) for a in atoms]
    t_ase = time.perf_counter() - start

    relaxer = BatchedRelaxer(model, dtype=args.dtype)
    start = time.perf_counter()
    res = relaxer.relax(atoms)
    t_batched = time.perf_counter() - start

    relaxer0 = BatchedRelaxer(model, dtype=args.dtype, skin=0.0)  # fresh neighbour lists every step, as ASE
    start = time.perf_counter()
    res0 = relaxer0.relax(atoms)
    t_batched_no_skin = time.perf_counter() - start

    n_atoms = np.array([len(a) for a in atoms])
    de = np.abs(np.array([r.energy for r in ref]) - np.array([r.energy for r in res])) / n_atoms
    steps_ref = np.array([r.n_steps for r in ref])
    steps_res = np.array([r.n_steps for r in res])
    summary = {
        "structures": len(atoms), "atoms_total": int(n_atoms.sum()), "dtype": args.dtype,
        "model": model_name,
        "ase_path_s": round(t_ase, 2), "batched_s": round(t_batched, 2), "speedup": round(t_ase / t_batched, 2),
        "batched_skin0_s": round(t_batched_no_skin, 2), "speedup_skin0": round(t_ase / t_batched_no_skin, 2),
        "max_abs_energy_diff_eV_per_atom": float(de.max()),
        "max_abs_energy_diff_skin0_eV_per_atom": float(max(abs(a.energy - b.energy) / len(c)
                                                            for a, b, c in zip(ref, res0, atoms))),
        "max_abs_energy_diff_first20_eV_per_atom": float(de[:20].max()),
        "identical_step_counts": int((steps_ref == steps_res).sum()),
        "converged_ase": int(sum(r.converged for r in ref)), "converged_batched": int(sum(r.converged for r in res)),
        "mean_fire_steps": float(steps_ref.mean()), "batched_model_calls": relaxer.n_model_calls,
        "batched_neighbor_list_builds": relaxer.n_neighbor_builds,
        "ase_path_neighbor_list_builds": int(steps_ref.sum() + len(atoms)),
        "machine": f"{platform.processor() or platform.machine()}, 1 torch thread, shared 2-core box",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
