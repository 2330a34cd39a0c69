"""Lennard-Jones pair potential written as a matkit potential: the analytic oracle of the pipeline.

``u(r) = 4 epsilon [(sigma/r)^12 - (sigma/r)^6]`` for ``r < rc``; each atom gets half of each pair energy.
Two cutoff treatments, identical to ``ase.calculators.lj.LennardJones``:

* ``smooth=False``: ``u(r) - u(rc)`` (energy continuous, forces jump at rc);
* ``smooth=True``: ``u(r) * fc(r)`` with the C^1 switch of ASE/JAX-MD between ``ro`` and ``rc``:
  ``fc = (rc^2 - r^2)^2 (rc^2 + 2 r^2 - 3 ro^2) / (rc^2 - ro^2)^3``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import Potential, register


@register("lj")
class LennardJones(Potential):
    """Lennard-Jones potential (sigma in Å, epsilon in eV) for any elements listed in ``species``."""

    def __init__(self, species: Sequence[int] = tuple(range(1, 119)), sigma: float = 1.0, epsilon: float = 1.0,
                 rc: Optional[float] = None, ro: Optional[float] = None, smooth: bool = False):
        rc = 3.0 * sigma if rc is None else float(rc)
        super().__init__(species=species, cutoff=rc)
        self.sigma, self.epsilon, self.smooth = float(sigma), float(epsilon), bool(smooth)
        self.rc = rc
        self.ro = 0.66 * rc if ro is None else float(ro)

    def pair_energy(self, r2: torch.Tensor) -> torch.Tensor:
        """Pair energies (E,) in eV from squared distances (E,) in Å^2 (all below rc^2)."""
        c6 = (self.sigma ** 2 / r2) ** 3
        u = 4.0 * self.epsilon * (c6 * c6 - c6)
        if self.smooth:
            rc2, ro2 = self.rc ** 2, self.ro ** 2
            switch = (rc2 - r2) ** 2 * (rc2 + 2.0 * r2 - 3.0 * ro2) / (rc2 - ro2) ** 3
            return u * torch.where(r2 < ro2, torch.ones_like(r2), switch)
        src6 = (self.sigma / self.rc) ** 6
        return u - 4.0 * self.epsilon * (src6 * src6 - src6)

    def raw_atomic_energies(self, graph, species, edge_vec):
        r2 = (edge_vec * edge_vec).sum(-1)
        inside = r2 < self.rc ** 2
        pair = torch.where(inside, self.pair_energy(torch.where(inside, r2, torch.ones_like(r2))),
                           torch.zeros_like(r2))
        centre = graph.edge_index[1]
        out = torch.zeros(graph.pos.shape[0], dtype=edge_vec.dtype, device=edge_vec.device)
        return out.index_add(0, centre, 0.5 * pair)
