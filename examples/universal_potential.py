"""Relax any crystal (positions and cell) and run MD on it with the universal potential ``tensornet-matpes-pbe``.

    python examples/universal_potential.py                         # Ba2LaCu3O7 (mp-622210) from datasets/mp20_val.h5
    python examples/universal_potential.py --structure my.cif       # any file ASE reads (CIF, POSCAR, extxyz, ...)
    python examples/universal_potential.py --mp20-id mp-758018 --md-steps 2000 --temperature 600

The structure is strained by 3 % and rattled by 0.05 Å first, so that the relaxation has work to do. Relaxation:
FIRE + FrechetCellFilter in float64 to fmax 0.02 eV/Å. MD: Langevin in float32 (the fast default), 1 fs steps.
"""
import argparse
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.optimize import FIRE

from matkit.calculator import MatkitCalculator

ROOT = Path(__file__).resolve().parent.parent


def load_structure(args):
    if args.structure:
        from ase.io import read

        return read(args.structure)
    from matkit.data.hdf5 import FrameFile

    for frame in FrameFile(ROOT / "datasets" / "mp20_val.h5"):
        if frame.id == args.mp20_id:
            return frame.to_atoms()
    raise SystemExit(f"{args.mp20_id} is not in datasets/mp20_val.h5")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structure", help="structure file (anything ase.io.read reads)")
    parser.add_argument("--mp20-id", default="mp-622210", help="an MP-20 crystal from datasets/mp20_val.h5")
    parser.add_argument("--potential", default="tensornet-matpes-pbe")
    parser.add_argument("--md-steps", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    args = parser.parse_args()

    atoms = load_structure(args)
    atoms.calc = None
    atoms.set_cell(atoms.cell.array * 1.03, scale_atoms=True)
    atoms.rattle(0.05, seed=0)
    print(f"{atoms.get_chemical_formula()}: {len(atoms)} atoms, start volume {atoms.get_volume():.2f} Å^3")

    atoms.calc = MatkitCalculator.from_pretrained(args.potential, dtype="float64")
    e0 = atoms.get_potential_energy() / len(atoms)
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    t0 = time.perf_counter()
    opt.run(fmax=0.02, steps=1000)
    pressure = -np.trace(atoms.get_stress(voigt=False)) / 3 / units.GPa
    print(f"relaxed in {opt.nsteps} FIRE steps ({time.perf_counter() - t0:.1f} s): E {e0:.4f} -> "
          f"{atoms.get_potential_energy() / len(atoms):.4f} eV/atom, volume {atoms.get_volume():.2f} Å^3, "
          f"max |F| {np.abs(atoms.get_forces()).max():.3f} eV/Å, pressure {pressure:+.3f} GPa")

    atoms.calc = MatkitCalculator.from_pretrained(args.potential, dtype="float32")
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=np.random.default_rng(0))
    md = Langevin(atoms, 1.0 * units.fs, temperature_K=args.temperature, friction=0.01 / units.fs, fixcm=False,
                  rng=np.random.default_rng(1))
    temps = []
    md.attach(lambda: temps.append(atoms.get_temperature()), interval=10)
    t0 = time.perf_counter()
    md.run(args.md_steps)
    wall = time.perf_counter() - t0
    print(f"MD: {args.md_steps} Langevin steps of 1 fs at {args.temperature:.0f} K in {wall:.1f} s "
          f"({args.md_steps / wall:.1f} steps/s); mean T over the last half {np.mean(temps[len(temps) // 2:]):.1f} K, "
          f"E_pot {atoms.get_potential_energy() / len(atoms):.4f} eV/atom")


if __name__ == "__main__":
    main()
