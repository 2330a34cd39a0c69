"""Relax a crystal (positions and cell) with a bundled matkit potential and compare with the DFT lattice.

    python examples/relax_crystal.py                    # tensornet-si on diamond Si
    python examples/relax_crystal.py --potential NAME --element Ge --structure diamond --a 5.76
"""
import argparse

import numpy as np
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from ase.units import GPa

from matkit.calculator import MatkitCalculator


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--potential", default="tensornet-si")
    parser.add_argument("--element", default="Si")
    parser.add_argument("--structure", default="diamond")
    parser.add_argument("--a", type=float, default=5.60, help="starting lattice constant (Å), deliberately off")
    args = parser.parse_args()

    atoms = bulk(args.element, args.structure, a=args.a, cubic=True)
    atoms.rattle(0.02, seed=0)
    atoms.calc = MatkitCalculator.from_pretrained(args.potential, dtype="float64")
    print(f"start: a = {args.a:.3f} Å, E = {atoms.get_potential_energy() / len(atoms):.4f} eV/atom, "
          f"pressure = {-np.trace(atoms.get_stress(voigt=False)) / 3 / GPa:.2f} GPa")
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    opt.run(fmax=1e-3, steps=1000)
    a = np.cbrt(atoms.get_volume())
    print(f"relaxed in {opt.nsteps} FIRE steps: a = {a:.4f} Å, E = {atoms.get_potential_energy() / len(atoms):.4f} "
          f"eV/atom, max |F| = {np.abs(atoms.get_forces()).max():.1e} eV/Å, "
          f"max |stress| = {np.abs(atoms.get_stress()).max() / GPa:.1e} GPa")


if __name__ == "__main__":
    main()
