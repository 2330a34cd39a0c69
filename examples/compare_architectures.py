"""Compare the four architectures trained on the same data: accuracy vs speed (table and plot).

    python examples/compare_architectures.py                 # the *-si potentials, 64-atom Si
    python examples/compare_architectures.py --data acac     # the *-acac potentials, acetylacetone

For each bundled potential ``<arch>-<data>`` (tensornet, escn, faenet, gaunt_mace) this evaluates the held-out
validation split again (float64; the same split the model card reports) and times energy+forces through the
ASE calculator (float32, 1 thread, median of repeats) on one structure, then writes a Markdown table and a plot
(force MAE vs time per call) to ``runs/compare_<data>/``. Potentials that are not bundled are skipped.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = ["tensornet", "escn", "faenet", "gaunt_mace"]
DATASETS = {"si": "datasets/mlearn_si.h5", "acac": "datasets/acetylacetone_300K.h5"}


def timing_structure(data):
    if data == "si":
        from ase.build import bulk

        return bulk("Si", "diamond", a=5.43, cubic=True).repeat(2), "64-atom diamond Si"
    from ase import Atoms

    from matkit.data.hdf5 import FrameFile

    frame = FrameFile(str(ROOT / DATASETS[data])).read_arrays(0)
    return Atoms(numbers=frame["atomic_numbers"], positions=frame["positions"]), "acetylacetone (15 atoms)"


def validation_errors(checkpoint, dataset):
    out = Path(checkpoint).with_name("val_errors.json")
    if not out.exists():
        subprocess.run([sys.executable, "-m", "matkit.cli", "evaluate", str(checkpoint), str(ROOT / dataset),
                        "--split", "val", "--dtype", "float64", "--json", str(out), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["metrics"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATASETS), default="si")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from timing import time_energy_forces

    from matkit.calculator import MatkitCalculator
    from matkit.potentials import checkpoint_path

    torch.set_num_threads(1)
    out = Path(args.out or ROOT / "runs" / f"compare_{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    atoms, label = timing_structure(args.data)
    rows = []
    for arch in ARCHITECTURES:
        name = f"{arch}-{args.data}"
        try:
            path = checkpoint_path(name)
        except FileNotFoundError:
            print(f"{name}: not bundled, skipped")
            continue
        calc = MatkitCalculator.from_checkpoint(path, dtype="float32")
        errors = validation_errors(path, DATASETS[args.data])
        seconds = time_energy_forces(calc, atoms, repeats=args.repeats)
        params = sum(p.numel() for p in calc.model.parameters())
        rows.append((name, params, errors["energy_mae"] * 1e3, errors["forces_mae"] * 1e3, seconds * 1e3))
        print(f"{name:20s} {params:>8d} params  E MAE {rows[-1][2]:7.2f} meV/atom  F MAE {rows[-1][3]:7.1f} meV/Å  "
              f"EF {rows[-1][4]:8.1f} ms")
    if not rows:
        print("no bundled potentials found for", args.data)
        return 1

    table = ["| potential | parameters | energy MAE (meV/atom) | force MAE (meV/Å) | energy+forces (ms) |",
             "|---|---|---|---|---|"]
    table += [f"| {n} | {p:,} | {e:.2f} | {f:.1f} | {t:.1f} |" for n, p, e, f, t in rows]
    note = (f"\nValidation split (held out, float64); timing: {label}, float32, 1 CPU thread, median of "
            f"{args.repeats} calls through MatkitCalculator.\n")
    (out / "comparison.md").write_text("\n".join(table) + "\n" + note)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, _, _, force_mae, ms in rows:
        ax.scatter(ms, force_mae, s=40)
        ax.annotate(name, (ms, force_mae), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"energy+forces time per call (ms), {label}, 1 thread")
    ax.set_ylabel("validation force MAE (meV/Å)")
    ax.set_title(f"accuracy vs speed: {DATASETS[args.data]}")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_speed.png", dpi=130)
    print("\n".join(table) + note + f"written: {out / 'comparison.md'}, {out / 'accuracy_vs_speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
