"""Batched relaxation: matkit's BatchedRelaxer against torch-sim's batched FIRE, same model, same crystals.

Workload: the first ``--n`` MP-20 crystals of ``datasets/mp20_train.h5`` (1-20 atoms, 80+ elements), each given a
seeded random strain of up to ±3 % and a 0.05 Å rattle so that the relaxations have work to do. Model: a bundled
potential (default ``tensornet-matpes-pbe``), float64, exact radial MLPs on both sides.

* matkit: ``matkit.discovery.batched_relax.BatchedRelaxer`` (FIRE + Frechet cell filter with ASE's parameters,
  ``--fmax`` (0.05 eV/Å) on atoms and cell, at most ``--max-steps`` steps, in-flight pool of ``--max-atoms`` atoms);
* torch-sim (``torch-sim-atomistic==0.3.0``, the ``torchsim`` extra, driving the same model through
  :class:`matkit.torchsim.MatkitTorchSimModel`): ``ts.optimize`` with ``ts.frechet_cell_fire``, the force
  convergence function at ``--fmax`` including cell forces, an ``InFlightAutoBatcher`` with the same atom budget,
  ``max_steps`` = ``--max-steps`` x ``steps_between_swaps``.

Reported: wall time and structures per second of each side, the final energy of every structure from each side
(re-evaluated by the same model), and how many agree to 1e-4 eV/atom (FIRE trajectories differ in details, e.g.
torch-sim checks convergence every ``steps_between_swaps`` steps, so a few structures may settle in different
nearby minima). The sides run one after the other in this process, in the order given by ``--order``.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/relax_vs_torchsim.py --n 200
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def workload(n: int, seed: int = 0):
    from matkit.data.hdf5 import FrameFile

    rng = np.random.default_rng(seed)
    structures = []
    for k, frame in enumerate(FrameFile(ROOT / "datasets" / "mp20_train.h5")):
        if k == n:
            break
        atoms = frame.to_atoms()
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, size=(3, 3))
        atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = None
        structures.append(atoms)
    return structures


def run_matkit(model, structures, args):
    from matkit.discovery.batched_relax import BatchedRelaxer
    from matkit.discovery.relax import RelaxSettings

    relaxer = BatchedRelaxer(model, RelaxSettings(fmax=args.fmax, max_steps=args.max_steps), dtype="float64",
                             max_atoms=args.max_atoms)
    start = time.perf_counter()
    results = relaxer.relax(structures)
    wall = time.perf_counter() - start
    return [r.atoms for r in results], [bool(r.converged) for r in results], wall


def run_torchsim(model, structures, args):
    import torch_sim as ts
    from torch_sim.autobatching import InFlightAutoBatcher

    from matkit.torchsim import MatkitTorchSimModel

    wrapped = MatkitTorchSimModel(model, device="cpu", dtype=torch.float64)
    batcher = InFlightAutoBatcher(wrapped, memory_scales_with="n_atoms", max_memory_scaler=float(args.max_atoms))
    start = time.perf_counter()
    final = ts.optimize(structures, wrapped, optimizer=ts.frechet_cell_fire,
                        convergence_fn=ts.generate_force_convergence_fn(args.fmax, include_cell_forces=True),
                        autobatcher=batcher, max_steps=args.max_steps * args.steps_between_swaps,
                        steps_between_swaps=args.steps_between_swaps)
    wall = time.perf_counter() - start
    return final.to_atoms(), None, wall


def energies_per_atom(model, atoms_list):
    from matkit.calculator import MatkitCalculator

    calc = MatkitCalculator(model, dtype="float64", skin=0.0)
    out, fmax = [], []
    for atoms in atoms_list:
        atoms = atoms.copy()
        atoms.calc = calc
        out.append(atoms.get_potential_energy() / len(atoms))
        fmax.append(float(np.linalg.norm(atoms.get_forces(), axis=1).max()))
    return np.array(out), np.array(fmax)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--potential", default="tensornet-matpes-pbe")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å, atoms and cell, both sides")
    parser.add_argument("--max-atoms", type=int, default=1024)
    parser.add_argument("--steps-between-swaps", type=int, default=5)
    parser.add_argument("--order", default="matkit,torchsim")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from matkit.checkpoint import load_checkpoint
    from matkit.potentials import checkpoint_path

    model = load_checkpoint(checkpoint_path(args.potential)).double()
    structures = workload(args.n)
    sides = {"matkit": run_matkit, "torchsim": run_torchsim}
    report = {"n": len(structures), "atoms": int(sum(len(a) for a in structures)), "potential": args.potential,
              "max_atoms": args.max_atoms, "max_steps": args.max_steps, "fmax": args.fmax,
              "steps_between_swaps": args.steps_between_swaps, "threads": 1}
    finals = {}
    for side in args.order.split(","):
        final, converged, wall = sides[side](model, [a.copy() for a in structures], args)
        energies, fmax = energies_per_atom(model, final)
        finals[side] = energies
        report[side] = {"wall_s": round(wall, 2), "structures_per_s": round(len(structures) / wall, 3),
                        "final_max_atom_force_median": float(np.median(fmax)),
                        "converged": None if converged is None else int(sum(converged))}
        print(side, report[side], flush=True)
    diff = np.abs(finals["matkit"] - finals["torchsim"])
    report["energy_agreement"] = {"within_1e-4_eV_per_atom": int((diff < 1e-4).sum()),
                                  "median_abs_diff": float(np.median(diff)), "max_abs_diff": float(diff.max()),
                                  "matkit_lower": int((finals["matkit"] < finals["torchsim"] - 1e-4).sum()),
                                  "torchsim_lower": int((finals["torchsim"] < finals["matkit"] - 1e-4).sum())}
    report["throughput_ratio_matkit_over_torchsim"] = round(report["matkit"]["structures_per_s"]
                                                            / report["torchsim"]["structures_per_s"], 2)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
