"""Speed of the universal ``tensornet-matpes-pbe`` potential: matkit vs matgl's own ``PESCalculator``.

The same weights (matgl's ``TensorNet-MatPES-PBE-v2025.1-PES`` folder; matkit's bundled conversion), each through
its ASE calculator as a user would run it, float32, one thread, one process per side (matgl in its own venv):

* calculator calls for energy + forces + stress on rattled diamond Si 64 / 512 / 1728 (``calc.calculate(atoms,
  props, all_changes)`` after moving the atoms by ±1e-4 Å; matkit's calculator with its default Verlet skin,
  matgl's ``PESCalculator(pot, stress_unit="eV/A3")``, which computes stress on every call anyway);
* ASE Langevin MD on Si64 (1 fs, 300 K): steps per second, in a fresh process of its own (as a user's MD run;
  after the large calls glibc's adaptive mmap threshold has grown and every later step page-faults less, which
  flattered matgl's MD by ~25 % in a first version of this script);
* the peak resident memory of each process (``ru_maxrss``; sizes run smallest first).

Both sides run with the same environment (threads, ``MALLOC_*`` variables): set allocator variables for both by
exporting them before running this script.

Sides alternate for ``--rounds`` rounds so that a drift in machine load hits both; per-round medians are
averaged. The matgl folder and venvs::

    python benchmarks/tensornet_speed_vs_matgl.py --peer-python PEERS/matgl/bin/python [--peer-python ...]

``--peer-python`` (repeatable; default ``$MATKIT_MATGL_PYTHON``) is the python of a venv with matgl (see
``benchmarks/tensornet_vs_matgl.py`` for how to create it); ``--matgl-dir`` defaults to ``$MATKIT_MATGL_MODELS``,
else ``../shared/data/matgl_tensornet_matpes`` next to the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tensornet_speed_vs_torchmdnet import average_rounds, md_seconds_per_step, median_times, si  # noqa: E402
from tensornet_vs_matgl import MODELS, default_matgl_dir  # noqa: E402

POTENTIAL = "tensornet-matpes-pbe"


def worker(side: str, folder: str, sizes, md_steps: int) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    if side == "matkit":
        sys.path.insert(0, str(HERE.parent))
        from matkit.calculator import MatkitCalculator

        calc, version = MatkitCalculator.from_pretrained(POTENTIAL, dtype="float32"), "matkit"
    else:
        import warnings

        import matgl
        from matgl.ext.ase import PESCalculator

        warnings.filterwarnings("ignore")
        calc, version = PESCalculator(matgl.load_model(folder), stress_unit="eV/A3"), f"matgl {matgl.__version__}"
    for n in sizes:
        atoms = si(n)
        repeats = 9 if len(atoms) <= 512 else 3
        modes = {"EFS": ["energy", "forces", "stress"]}
        for mode, (wall, cpu) in median_times(calc, atoms, modes, repeats).items():
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print("RESULT " + json.dumps(dict(side=version, system=f"Si{len(atoms)}", mode=mode, wall=wall, cpu=cpu,
                                              rss=rss)), flush=True)
    if md_steps:
        wall, cpu = md_seconds_per_step(calc, md_steps)
        print("RESULT " + json.dumps(dict(side=version, system="Si64", mode="MD", wall=wall, cpu=cpu,
                                          rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)), flush=True)


def run(side, python, folder, sizes, md_steps):
    """Calls (sizes, smallest first) in one process, then MD in a fresh one -> {(system, mode): row}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    if side != "matkit":
        env.pop("PYTHONPATH", None)
    rows = []
    for part_sizes, part_md in ((sizes, 0), ([], md_steps)):
        if not part_sizes and not part_md:
            continue
        cmd = [python, __file__, "--worker", side, "--folder", folder, "--sizes", ",".join(map(str, part_sizes)),
               "--md-steps", str(part_md)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rows += [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0:
            print(f"[{side}] exit {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    return {(r["system"], r["mode"]): r for r in rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--peer-python", action="append", default=None,
                        help="python of a matgl venv (repeatable; default $MATKIT_MATGL_PYTHON)")
    parser.add_argument("--matgl-dir", type=Path, default=None)
    parser.add_argument("--sizes", default="2,4,6", help="Si supercells n (8 n^3 atoms)")
    parser.add_argument("--md-steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.worker:
        worker(args.worker, args.folder, sizes, args.md_steps)
        return 0
    peers = args.peer_python or ([os.environ["MATKIT_MATGL_PYTHON"]] if os.environ.get("MATKIT_MATGL_PYTHON") else [])
    if not peers:
        parser.error("give matgl's python with --peer-python or $MATKIT_MATGL_PYTHON")
    folder = str((args.matgl_dir or default_matgl_dir()) / MODELS[POTENTIAL])
    sides = [("matkit", sys.executable)] + [(f"peer{k}", p) for k, p in enumerate(peers)]
    rounds = {side: [] for side, _ in sides}
    for _ in range(max(1, args.rounds)):
        for side, python in sides:
            rounds[side].append(run(side, python, folder, sizes, args.md_steps))
    merged = {side: average_rounds(r) for side, r in rounds.items()}
    ours = merged["matkit"]
    print(f"{POTENTIAL}: matkit vs matgl PESCalculator, same weights, float32, 1 thread, {args.rounds} alternating "
          f"rounds, MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')} for all; ms per call "
          "(MD: per step); ratio = peer / matkit")
    print("| peer | system | mode | matkit wall | peer wall | wall ratio | matkit CPU | peer CPU | CPU ratio | "
          "matkit MB | peer MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for side, _ in sides[1:]:
        peer = merged[side]
        for key in sorted(set(ours) & set(peer), key=lambda k: (k[1] == "MD", int(k[0][2:]))):
            o, p = ours[key], peer[key]
            print(f"| {p['side']} | {key[0]} | {key[1]} | {o['wall'] * 1e3:.1f} | {p['wall'] * 1e3:.1f} | "
                  f"{p['wall'] / o['wall']:.2f} | {o['cpu'] * 1e3:.1f} | {p['cpu'] * 1e3:.1f} | "
                  f"{p['cpu'] / o['cpu']:.2f} | {o['rss']:.0f} | {p['rss']:.0f} |")
        md_o, md_p = ours.get(("Si64", "MD")), peer.get(("Si64", "MD"))
        if md_o and md_p:
            print(f"MD Si64 Langevin 1 fs, steps/s (wall): matkit {1 / md_o['wall']:.1f}, {md_p['side']} "
                  f"{1 / md_p['wall']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
