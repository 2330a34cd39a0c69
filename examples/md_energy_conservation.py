"""NVE molecular dynamics with a matkit potential and an energy-conservation plot.

    python examples/md_energy_conservation.py --potential tensornet-si --steps 2000 --dtype float64

Thermalises a 64-atom diamond Si cell with Langevin dynamics, switches to velocity Verlet and plots the total
energy per atom against time (``runs/examples/nve_energy_<potential>.png``) with the fitted drift in eV/atom/ps.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from ase import units
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from matkit.calculator import MatkitCalculator


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--potential", default="tensornet-si")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--nvt-steps", type=int, default=500, help="Langevin equilibration before NVE")
    parser.add_argument("--timestep-fs", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=600.0)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--out", default="runs/examples")
    args = parser.parse_args()

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.calc = MatkitCalculator.from_pretrained(args.potential, dtype=args.dtype, skin=1.0)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=np.random.default_rng(0))
    Langevin(atoms, args.timestep_fs * units.fs, temperature_K=args.temperature, friction=0.02, fixcm=False,
             rng=np.random.default_rng(1)).run(args.nvt_steps)
    dyn = VelocityVerlet(atoms, args.timestep_fs * units.fs)
    t, e, temp = [], [], []

    def record():
        t.append(dyn.nsteps * args.timestep_fs / 1000)
        e.append(atoms.get_total_energy() / len(atoms))
        temp.append(atoms.get_temperature())

    dyn.attach(record, interval=10)
    dyn.run(args.steps)
    drift = np.polyfit(t, e, 1)[0]
    print(f"NVE {args.steps} steps x {args.timestep_fs} fs ({args.dtype}): mean T = {np.mean(temp):.0f} K, "
          f"drift = {drift:+.2e} eV/atom/ps, std = {np.std(e):.2e} eV/atom")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt.plot(t, (np.array(e) - e[0]) * 1e3)
    plt.xlabel("time (ps)")
    plt.ylabel("E_total - E_0 (meV/atom)")
    plt.title(f"{args.potential}, NVE, drift {drift:+.1e} eV/atom/ps")
    trace = out / f"nve_energy_{args.potential}.csv"
    np.savetxt(trace, np.column_stack([t, e, temp]), delimiter=",", header="time_ps,total_energy_eV_per_atom,T_K",
               comments="")
    plot = out / f"nve_energy_{args.potential}.png"
    plt.savefig(plot, dpi=120)
    print(f"plot: {plot}; trace: {trace}")


if __name__ == "__main__":
    main()
