"""TensorNet speed: matkit vs torchmd-net 3.1.0 (warp CPU kernels), same hyperparameters, random weights.

Measures, one process per side, single-threaded:
* ASE calculator calls (``calc.calculate(atoms, props, all_changes)`` after moving atoms by ±1e-4 Å) for
  E+F and (matkit only; torchmd-net has no stress) E+F+S on rattled diamond Si 64 / 512 / 1728;
* Langevin MD (1 fs, 300 K) steps per second on 64-atom Si (matkit: MatkitCalculator with its default Verlet
  skin; torchmd-net: TMDNETCalculator, ``atoms.info["charge"] = 0``).

Both wall time and process CPU time are reported (medians): on a shared machine the CPU time is the stabler
measure of the work each implementation does; the peak RSS of each process is reported as well.

    PYTHONPATH=$PWD python benchmarks/tensornet_speed_vs_torchmdnet.py [--sizes 2,4,6] [--md-steps 50]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def si(n_cells):
    import numpy as np
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((n_cells,) * 3)
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    atoms.info["charge"] = 0
    return atoms


def median_times(calc, atoms, modes, repeats):
    """Median (wall, CPU) seconds per call for each mode in ``modes`` ({name: properties}).

    The modes are called in turn (EF, EFS, EF, EFS, ...), so allocator warm-up and machine-load drifts hit them
    alike and the stress overhead EFS/EF is not an artefact of the order of measurement.
    """
    import statistics

    from ase.calculators.calculator import all_changes

    for props in modes.values():
        calc.calculate(atoms, props, all_changes)
    wall = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    sign = 1.0
    for _ in range(repeats):
        for mode, props in modes.items():
            atoms.positions += sign * 1e-4
            sign = -sign
            t, c = time.perf_counter(), time.process_time()
            calc.calculate(atoms, props, all_changes)
            wall[mode].append(time.perf_counter() - t)
            cpu[mode].append(time.process_time() - c)
    return {m: (statistics.median(wall[m]), statistics.median(cpu[m])) for m in modes}


def worker(side: str, sizes, md_steps: int) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    from model_specs import tensornet as spec

    species = [1, 8, 14]
    if side == "ours":
        sys.path.insert(0, str(HERE.parent))
        import matkit
        from matkit.calculator import MatkitCalculator

        torch.manual_seed(0)
        model = matkit.build(spec.MODEL, species=species, **spec.ours_hparams())

        def make(skin):
            return MatkitCalculator(model, dtype="float32", skin=skin)
    else:
        calc = spec.make_peer_calculator(species)

        def make(skin):
            return calc
    for n in sizes:
        atoms = si(n)
        modes = {"EF": ["energy", "forces"]}
        if side == "ours":  # torchmd-net's calculator has no stress
            modes["EFS"] = ["energy", "forces", "stress"]
        repeats = 9 if len(atoms) <= 512 else 3
        for mode, (wall, cpu) in median_times(make(0.0), atoms, modes, repeats).items():
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print("RESULT " + json.dumps(dict(system=f"Si{len(atoms)}", mode=mode, wall=wall, cpu=cpu, rss=rss)),
                  flush=True)
    if md_steps:
        wall, cpu = md_seconds_per_step(make(0.5), md_steps)
        print("RESULT " + json.dumps(dict(system="Si64", mode="MD", wall=wall, cpu=cpu,
                                          rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)),
              flush=True)


def md_seconds_per_step(calc, md_steps: int):
    """(wall, CPU) seconds per ASE Langevin step (1 fs, 300 K) on 64-atom Si with ``calc``, after 5 warm-up steps."""
    import numpy as np
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = si(2)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=300, friction=0.01, rng=np.random.default_rng(1))
    dyn.run(5)
    t, c = time.perf_counter(), time.process_time()
    dyn.run(md_steps)
    return (time.perf_counter() - t) / md_steps, (time.process_time() - c) / md_steps


def run(side, python, sizes, md_steps):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    if side == "peer":
        env.pop("PYTHONPATH", None)
    cmd = [python, __file__, "--worker", side, "--sizes", ",".join(map(str, sizes)), "--md-steps", str(md_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0:
        print(f"[{side}] exit {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    return {(r["system"], r["mode"]): r for r in rows}


def average_rounds(rounds):
    """Mean over rounds of each (system, mode) row's wall / CPU medians; peak RSS is the maximum."""
    merged = {}
    for key in {k for r in rounds for k in r}:
        rows = [r[key] for r in rounds if key in r]
        merged[key] = dict(rows[0], wall=sum(r["wall"] for r in rows) / len(rows),
                           cpu=sum(r["cpu"] for r in rows) / len(rows), rss=max(r["rss"] for r in rows))
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="2,4,6", help="Si supercells n (8 n^3 atoms)")
    parser.add_argument("--md-steps", type=int, default=50)
    parser.add_argument("--peer-python", default=None,
                        help="python of the torchmd-net venv (default $MATKIT_TMD_PYTHON)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="ours and the peer run alternately this many times; per-round medians are averaged")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.worker:
        worker(args.worker, sizes, args.md_steps)
        return
    from model_specs import tensornet as spec

    peer_python = args.peer_python or spec.PEER_PYTHON
    if not peer_python:
        parser.error("give torchmd-net's python with --peer-python or $MATKIT_TMD_PYTHON")
    rounds = {"ours": [], "peer": []}
    for _ in range(max(1, args.rounds)):  # alternate the sides so a drift in machine load hits both
        rounds["ours"].append(run("ours", sys.executable, sizes, args.md_steps))
        rounds["peer"].append(run("peer", peer_python, sizes, args.md_steps))
    ours, peer = average_rounds(rounds["ours"]), average_rounds(rounds["peer"])
    print(f"matkit TensorNet vs {spec.PEER}; 1 thread; {args.rounds} alternating rounds; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')} (same for both sides); "
          f"ms per call (MD: per step); ratio = peer / ours")
    print("| system | mode | ours wall | peer wall | wall ratio | ours CPU | peer CPU | CPU ratio | "
          "ours MB | peer MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted(set(ours) | set(peer), key=lambda k: (int(k[0][2:]), k[1])):
        o, p = ours.get(key), peer.get(key)

        def cell(r, f):
            return f"{r[f] * 1e3:.1f}" if r else "-"

        ratio_w = f"{p['wall'] / o['wall']:.2f}" if o and p else "-"
        ratio_c = f"{p['cpu'] / o['cpu']:.2f}" if o and p else "-"
        print(f"| {key[0]} | {key[1]} | {cell(o, 'wall')} | {cell(p, 'wall')} | {ratio_w} | {cell(o, 'cpu')} | "
              f"{cell(p, 'cpu')} | {ratio_c} | {o['rss'] if o else 0:.0f} | {p['rss'] if p else 0:.0f} |")
    for system in {k[0] for k in ours}:
        ef, efs = ours.get((system, "EF")), ours.get((system, "EFS"))
        if ef and efs:
            print(f"{system}: stress overhead (EFS/EF - 1): wall {efs['wall'] / ef['wall'] - 1:+.0%}, "
                  f"CPU {efs['cpu'] / ef['cpu'] - 1:+.0%}")
    md_o, md_p = ours.get(("Si64", "MD")), peer.get(("Si64", "MD"))
    if md_o and md_p:
        print(f"MD Si64 Langevin 1 fs: ours {1 / md_o['wall']:.1f} steps/s, torchmd-net {1 / md_p['wall']:.1f} "
              f"steps/s (wall); CPU-time based: ours {1 / md_o['cpu']:.1f}, torchmd-net {1 / md_p['cpu']:.1f}")


if __name__ == "__main__":
    main()
