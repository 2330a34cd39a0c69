"""Structure relaxation with the Matbench Discovery protocol through any ASE calculator.

Protocol (``matbench_discovery`` ``RelaxationSettings`` defaults): FIRE on a ``FrechetCellFilter`` (positions and
the log-deformation of the cell relaxed together), ``fmax = 0.05`` eV/Å on the filter's generalised forces, at
most 500 FIRE steps. A structure that does not converge still reports its final energy (``converged=False``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["RelaxSettings", "RelaxResult", "relax_atoms", "atoms_to_dict", "atoms_from_dict"]


@dataclass(frozen=True)
class RelaxSettings:
    """Relaxation settings (defaults = the benchmark's protocol).

    fmax : convergence threshold on the largest row norm of the filter forces, eV/Å (strict ``<``, as ASE).
    max_steps : maximum number of FIRE steps (force evaluations = steps + 1).
    relax_cell : relax the cell with ``FrechetCellFilter``; False relaxes positions only.
    maxstep : FIRE's largest step (norm over all degrees of freedom of one structure), Å. ASE default 0.2.
    dt, dtmax, Nmin, finc, fdec, astart, fa : FIRE parameters (ASE defaults).
    """

    fmax: float = 0.05
    max_steps: int = 500
    relax_cell: bool = True
    maxstep: float = 0.2
    dt: float = 0.1
    dtmax: float = 1.0
    Nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99

    def __post_init__(self):
        if not (self.fmax > 0):
            raise ValueError(f"fmax must be positive, got {self.fmax}")
        if int(self.max_steps) != self.max_steps or self.max_steps < 0:
            raise ValueError(f"max_steps must be a non-negative integer, got {self.max_steps}")

    def fire_kwargs(self) -> Dict[str, float]:
        return dict(maxstep=self.maxstep, dt=self.dt, dtmax=self.dtmax, Nmin=self.Nmin, finc=self.finc,
                    fdec=self.fdec, astart=self.astart, fa=self.fa, a=self.astart)


@dataclass
class RelaxResult:
    """Outcome of relaxing one structure.

    energy : total energy of the final structure, eV.  n_steps : FIRE steps taken.
    converged : whether the filter forces dropped below fmax within max_steps.
    atoms : the final structure (``ase.Atoms``, no calculator attached).
    """

    energy: float
    n_steps: int
    converged: bool
    atoms: Any
    wall_time: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.atoms)

    def to_record(self) -> Dict[str, Any]:
        """JSON-serialisable dict (structure as :func:`atoms_to_dict`)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("atoms", "extra")}
        out["structure"] = atoms_to_dict(self.atoms)
        out.update(self.extra)
        return out


def relax_atoms(atoms, calculator, settings: Optional[RelaxSettings] = None) -> RelaxResult:
    """Relax a copy of ``atoms`` with ``calculator`` (any ASE calculator) using FIRE (+ FrechetCellFilter).

    The input is not modified. Energies in eV.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    settings = settings or RelaxSettings()
    if len(atoms) == 0:
        raise ValueError("cannot relax a structure with no atoms")
    if settings.relax_cell and not np.all(atoms.pbc):
        raise ValueError("cell relaxation needs a structure periodic in all three directions (pbc=True)")
    work = atoms.copy()
    work.calc = calculator
    start = time.perf_counter()
    target = FrechetCellFilter(work) if settings.relax_cell else work
    optimizer = FIRE(target, logfile=None, **settings.fire_kwargs())
    converged = bool(optimizer.run(fmax=settings.fmax, steps=int(settings.max_steps)))
    energy = float(work.get_potential_energy())
    final = work.copy()
    final.calc = None
    return RelaxResult(energy=energy, n_steps=int(optimizer.nsteps), converged=converged, atoms=final,
                       wall_time=time.perf_counter() - start)


def atoms_to_dict(atoms) -> Dict[str, Any]:
    """Plain-JSON structure: ``numbers``, ``positions`` (Å), ``cell`` (Å, rows), ``pbc``."""
    return {"numbers": [int(z) for z in atoms.numbers], "positions": np.asarray(atoms.positions).tolist(),
            "cell": np.asarray(atoms.cell.array).tolist(), "pbc": [bool(p) for p in atoms.pbc]}


def atoms_from_dict(data: Dict[str, Any]):
    """Inverse of :func:`atoms_to_dict`."""
    from ase import Atoms

    return Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"], pbc=data["pbc"])
