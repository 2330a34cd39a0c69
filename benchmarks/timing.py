"""Timing helper shared by the benchmarks, the model cards (``potentials/publish.py``) and
``examples/compare_architectures.py``."""
from __future__ import annotations

import time

import numpy as np
from ase.calculators.calculator import Calculator

__all__ = ["time_energy_forces"]


def time_energy_forces(calc: Calculator, atoms, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time (s) of one energy+forces call of ``calc`` on a copy of ``atoms``.

    Every call follows a 1 mÅ random displacement (as in MD, so nothing is cached); the first ``warmup`` calls
    (compilation, allocator warm-up) are not counted. Set the thread count before calling.
    """
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    times = []
    for _ in range(warmup + repeats):
        atoms.positions += 0.001 * rng.normal(size=atoms.positions.shape)
        start = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - start)
    return float(np.median(times[warmup:]))
