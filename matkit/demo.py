"""``matkit demo``: relax a crystal with a vacancy (positions and cell), run NVT then NVE MD, report.

With a universal potential (one that covers Sr, Ti and O, e.g. ``tensornet-matpes-pbe``) the system is a 2x2x2
SrTiO3 perovskite supercell with one oxygen vacancy; with a single-element potential (e.g. ``tensornet-si``) a
2x2x2 supercell of that element's crystal with one vacancy. Without any bundled potential, the analytic
Lennard-Jones argon potential runs the same workflow on fcc Ar.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="relax a crystal with a vacancy and run NVT + NVE MD")
    p.add_argument("--potential", default=None, help="bundled potential name (default: tensornet-matpes-pbe "
                                                      "if bundled, else Lennard-Jones argon)")
    p.add_argument("--nvt-steps", type=int, default=400)
    p.add_argument("--nve-steps", type=int, default=1000)
    p.add_argument("--timestep-fs", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--out", default="runs/demo", help="output folder for the log and plot")
    p.set_defaults(func=run_demo)


def _system(potential_name):
    from ase.build import bulk

    import matkit
    from matkit.potentials import DEFAULT_POTENTIAL, checkpoint_path, list_potentials

    name = potential_name or (DEFAULT_POTENTIAL if DEFAULT_POTENTIAL in list_potentials() else None)
    if name is not None:
        model = matkit.load_checkpoint(checkpoint_path(name))
        species = model.species
        label = f"bundled potential {name!r}"
        if {8, 22, 38} <= set(species):  # a universal potential: a multi-element oxide
            atoms = perovskite("SrTiO3", 3.905).repeat((2, 2, 2))
            del atoms[[a.index for a in atoms if a.symbol == "O"][0]]  # an oxygen vacancy
            return model, atoms, label
        element = ("Si" if 14 in species
                   else __import__("ase.data", fromlist=["chemical_symbols"]).chemical_symbols[species[0]])
        lattice = {"Si": ("diamond", 5.43), "Ge": ("diamond", 5.76), "Mo": ("bcc", 3.16), "Li": ("bcc", 3.44)}
        structure, a = lattice.get(element, ("diamond", 5.43))
        atoms = bulk(element, structure, a=a, cubic=True).repeat((2, 2, 2))
    else:
        model = matkit.build("lj", species=[18], sigma=3.405, epsilon=0.0104, rc=8.5, smooth=True)
        atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
        label = "analytic Lennard-Jones argon (no trained potential bundled)"
    del atoms[0]  # the vacancy
    return model, atoms, label


def perovskite(formula: str, a: float):
    """Cubic ABO3 perovskite (A at the corner, B at the body centre, O at the face centres), lattice constant a (Å)."""
    from ase import Atoms

    return Atoms(formula, cell=[a, a, a], pbc=True,
                 scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def run_demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase import units
    from ase.filters import FrechetCellFilter
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import FIRE

    from matkit.calculator import MatkitCalculator

    # scipy's matrix logarithm inside FrechetCellFilter reports ~1e-13 "inaccuracy" on every step: noise
    warnings.filterwarnings("ignore", message="logm result may be inaccurate")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, atoms, label = _system(args.potential)
    n_cells = 2
    print(f"matkit demo: {label}; {len(atoms)} atoms ({atoms.get_chemical_formula()}), float64")
    atoms.calc = MatkitCalculator(model, dtype="float64", skin=1.0)
    e0 = atoms.get_potential_energy()
    relax = FIRE(FrechetCellFilter(atoms), logfile=None)
    relax.run(fmax=0.01, steps=500)
    e_relaxed = atoms.get_potential_energy()
    lattice_constant = np.cbrt(atoms.get_volume() * (len(atoms) + 1) / len(atoms)) / n_cells
    print(f"relaxation: {relax.nsteps} FIRE steps, E {e0:.4f} -> {e_relaxed:.4f} eV, "
          f"max force {np.abs(atoms.get_forces()).max():.4f} eV/Å, "
          f"stress max {np.abs(atoms.get_stress()).max() / units.GPa:.4f} GPa")
    print(f"lattice constant (vacancy cell, per conventional cell): {lattice_constant:.4f} Å")

    dt = args.timestep_fs * units.fs
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=np.random.default_rng(0),
                       exact_temperature=True)
    # friction 0.01 / fs: the thermostat equilibrates within ~100 fs
    nvt = Langevin(atoms, dt, temperature_K=args.temperature, friction=0.01 / units.fs, fixcm=False,
                   rng=np.random.default_rng(1))
    temps = []
    nvt.attach(lambda: temps.append(atoms.get_temperature()), interval=10)
    nvt.run(args.nvt_steps)
    print(f"NVT (Langevin, {args.temperature:.0f} K, {args.nvt_steps} steps of {args.timestep_fs} fs): "
          f"mean T over the last half {np.mean(temps[len(temps) // 2:]):.1f} K")

    nve = VelocityVerlet(atoms, dt)
    record = []
    nve.attach(lambda: record.append((nve.nsteps * args.timestep_fs * 1e-3, atoms.get_total_energy() / len(atoms),
                                      atoms.get_temperature())), interval=10)
    nve.run(args.nve_steps)
    t_ps, e_tot, temp = np.array(record).T
    drift = np.polyfit(t_ps, e_tot, 1)[0]
    print(f"NVE ({args.nve_steps} steps): mean T {temp.mean():.1f} K, total-energy drift {drift:+.2e} eV/atom/ps, "
          f"fluctuation (std) {e_tot.std():.2e} eV/atom; neighbour list rebuilt {atoms.calc.neighbors.n_builds} times")

    fig, ax = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    ax[0].plot(t_ps, (e_tot - e_tot[0]) * 1e3)
    ax[0].set_ylabel("E_total - E_0 (meV/atom)")
    ax[0].set_title(f"NVE energy conservation, drift {drift:+.1e} eV/atom/ps")
    ax[1].plot(t_ps, temp)
    ax[1].set_ylabel("T (K)")
    ax[1].set_xlabel("time (ps)")
    fig.tight_layout()
    fig.savefig(out / "demo_nve.png", dpi=120)
    print(f"plot: {out / 'demo_nve.png'}; total time {time.perf_counter() - t0:.1f} s")
    return 0
