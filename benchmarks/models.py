"""Model step benchmark: matkit potentials against their named peers, measured in one run.

For every model spec in ``benchmarks/model_specs/<name>.py`` (see ``model_specs/README.md``) and every system
(diamond Si 64 / 512 / 1728 atoms rattled by 0.05 Å, a 192-atom water box) this times one ASE calculator call
``calc.calculate(atoms, props, all_changes)`` for energy+forces (EF) and energy+forces+stress (EFS), after moving
every position by ±1e-4 Å, so each call includes the neighbour list / graph build, forward and backward pass.
Every (side, model) runs in its own subprocess (peers live in their own venvs) with the same thread count and the
same allocator environment; reported numbers are medians of repeats after a warm-up, and the peak RSS of the
process (``ru_maxrss``; systems run smallest first, so each reading is the peak up to that system).

    python benchmarks/models.py                     # all specs, 1 thread
    python benchmarks/models.py --models tensornet --threads 2 --sizes 64,512
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPECS = HERE / "model_specs"


def si_crystal(n_cells: int):
    import numpy as np
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((n_cells,) * 3)
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def water_box():
    """64 H2O on a 4x4x4 grid with random orientations, 12.42 Å cubic box (1 g/cm^3), 192 atoms."""
    import numpy as np
    from ase import Atoms
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    box = 12.42
    oh, angle = 0.9572, np.deg2rad(104.52)
    local = np.array([[0, 0, 0], [oh, 0, 0], [oh * np.cos(angle), oh * np.sin(angle), 0]])
    positions, numbers = [], []
    grid = (np.arange(4) + 0.5) * box / 4
    for x in grid:
        for y in grid:
            for z in grid:
                rot = Rotation.random(random_state=rng.integers(1 << 31)).as_matrix()
                positions.extend(local @ rot.T + [x, y, z])
                numbers.extend([8, 1, 1])
    return Atoms(numbers=numbers, positions=positions, cell=[box] * 3, pbc=True)


SYSTEMS = {"Si64": lambda: si_crystal(2), "H2O192": water_box, "Si512": lambda: si_crystal(4),
           "Si1728": lambda: si_crystal(6)}
SPECIES = [1, 8, 14]


def time_calls(calc, atoms, props, min_repeats=5, budget_s=6.0):
    """Median seconds per calculator call; positions move by ±1e-4 Å between calls."""
    import statistics

    from ase.calculators.calculator import all_changes

    calc.calculate(atoms, props, all_changes)  # warm-up
    times, sign, start = [], 1.0, time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 50):
        atoms.positions += sign * 1e-4
        sign = -sign
        t0 = time.perf_counter()
        calc.calculate(atoms, props, all_changes)
        times.append(time.perf_counter() - t0)
        if times[-1] > 3.0 and len(times) >= 3:
            break
    return statistics.median(times), len(times)


def worker(spec_name: str, side: str, systems: list[str], threads: int, device: str) -> None:
    """Runs inside a subprocess: prints one JSON line per (system, mode)."""
    import resource

    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    spec = importlib.import_module(f"model_specs.{spec_name}")
    if side == "ours":
        sys.path.insert(0, str(ROOT))
        import matkit
        from matkit.calculator import MatkitCalculator

        model = matkit.build(spec.MODEL, species=SPECIES, **spec.ours_hparams())
        calc = MatkitCalculator(model, device=device, dtype="float32", skin=0.0)
        n_params = sum(p.numel() for p in model.parameters())
    else:
        calc = spec.make_peer_calculator(SPECIES)
        n_params = None
    can_stress = "stress" in getattr(calc, "implemented_properties", [])
    for name in systems:
        atoms = SYSTEMS[name]()
        atoms.info["charge"] = 0
        for mode, props in (("EF", ["energy", "forces"]), ("EFS", ["energy", "forces", "stress"])):
            if mode == "EFS" and not can_stress:
                continue
            try:
                seconds, n = time_calls(calc, atoms, props)
                row = {"system": name, "mode": mode, "seconds": seconds, "repeats": n}
            except Exception as err:  # report, e.g. out of memory or a peer's cutoff/box restriction
                row = {"system": name, "mode": mode, "error": f"{type(err).__name__}: {err}"[:200]}
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row["params"] = n_params
            print("RESULT " + json.dumps(row), flush=True)


def run_side(spec_name, side, python, systems, threads, device):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    cmd = [python, str(Path(__file__).resolve()), "--worker", spec_name, side, "--systems", ",".join(systems),
           "--threads", str(threads), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 and not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  [{spec_name}/{side}] failed: {' | '.join(tail)}")
    return {(r["system"], r["mode"]): r for r in rows}


def fmt_ms(row):
    if row is None:
        return "-"
    if "error" in row:
        return "error"
    return f"{row['seconds'] * 1e3:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated spec names (default: all)")
    parser.add_argument("--systems", default="Si64,H2O192,Si512,Si1728")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    if args.worker:
        worker(args.worker[0], args.worker[1], systems, args.threads, args.device)
        return
    names = (args.models.split(",") if args.models
             else sorted(p.stem for p in SPECS.glob("*.py") if p.stem != "__init__"))
    sys.path.insert(0, str(HERE))
    print(f"threads={args.threads} device={args.device} "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')} "
          f"(same for both sides); median ms per calculator call; peak RSS in MB")
    for name in names:
        spec = importlib.import_module(f"model_specs.{name}")
        ours = run_side(name, "ours", sys.executable, systems, args.threads, args.device)
        peer = {}
        if spec.PEER and not args.no_peers:
            python = spec.PEER_PYTHON
            if python and Path(python).exists():
                peer = run_side(name, "peer", python, systems, args.threads, args.device)
            else:
                print(f"  peer skipped: its venv's python ({python or 'unset'}) is not there; see "
                      "benchmarks/model_specs/README.md for the environment variable and how to create it")
        print(f"\n## {name} vs {spec.PEER or '(no peer)'}")
        print("| system | mode | ours ms | peer ms | speed-up | ours MB | peer MB | EFS/EF ours |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for system in systems:
            for mode in ("EF", "EFS"):
                o, p = ours.get((system, mode)), peer.get((system, mode))
                if o is None and p is None:
                    continue
                speed = (f"{p['seconds'] / o['seconds']:.2f}x" if o and p and "seconds" in o and "seconds" in p
                         else "-")
                ef = ours.get((system, "EF"))
                overhead = (f"{o['seconds'] / ef['seconds']:.2f}" if mode == "EFS" and o and ef and "seconds" in o
                            and "seconds" in ef else "")
                print(f"| {system} | {mode} | {fmt_ms(o)} | {fmt_ms(p)} | {speed} | "
                      f"{o['peak_rss_mb']:.0f} | " if o else f"| {system} | {mode} | - | {fmt_ms(p)} | - | - | ",
                      end="")
                print(f"{p['peak_rss_mb']:.0f} | {overhead} |" if p else f"- | {overhead} |")


if __name__ == "__main__":
    main()
