"""Neighbour lists (PLACEHOLDER: replaced by the Numba cell-list implementation).

Public API (fixed; other modules rely on it):

    neighbor_list(positions, cell, pbc, cutoff, self_interaction=False) -> (i, j, S)

i, j: int64 arrays (n_pairs,), S: int64 array (n_pairs, 3). Same meaning as
``ase.neighborlist.neighbor_list("ijS")``: |positions[j] + S @ cell - positions[i]| < cutoff.
Full list (both directions), sorted by (i, j, S).
"""
from __future__ import annotations

import numpy as np


def neighbor_list(positions, cell, pbc, cutoff, self_interaction=False):
    from ase.neighborlist import primitive_neighbor_list

    i, j, S = primitive_neighbor_list(
        "ijS", np.asarray(pbc, bool), np.asarray(cell, float), np.asarray(positions, float), float(cutoff),
        self_interaction=self_interaction, use_scaled_positions=False,
    )
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64), S[order].astype(np.int64)


class VerletNeighborList:
    """Neighbour list with a Verlet skin, for MD (placeholder version over :func:`neighbor_list`).

    ``update(positions, cell, pbc)`` returns exactly the pairs closer than ``cutoff``; the underlying list is
    built with ``cutoff + skin`` and rebuilt only when an atom moved more than ``skin / 2`` since the last
    build, or the cell, pbc or number of atoms changed.
    """

    def __init__(self, cutoff: float, skin: float = 0.0):
        self.cutoff, self.skin = float(cutoff), float(skin)
        self.n_builds = 0
        self._ref = None

    def _needs_rebuild(self, positions, cell, pbc) -> bool:
        if self._ref is None:
            return True
        ref_pos, ref_cell, ref_pbc = self._ref
        if ref_pos.shape != positions.shape or not np.array_equal(ref_cell, cell) or not np.array_equal(ref_pbc, pbc):
            return True
        if self.skin <= 0:
            return True
        moved2 = ((positions - ref_pos) ** 2).sum(axis=1).max(initial=0.0)
        return moved2 > (0.5 * self.skin) ** 2

    def update(self, positions, cell, pbc):
        positions = np.asarray(positions, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.float64)
        pbc = np.asarray(pbc, dtype=bool)
        if self._needs_rebuild(positions, cell, pbc):
            self._pairs = neighbor_list(positions, cell, pbc, self.cutoff + max(self.skin, 0.0))
            self._ref = (positions.copy(), cell.copy(), pbc.copy())
            self.n_builds += 1
        i, j, S = self._pairs
        if self.skin <= 0:
            return i, j, S
        d = positions[j] - positions[i] + S @ cell
        keep = (d * d).sum(axis=1) < self.cutoff ** 2
        return i[keep], j[keep], S[keep]
