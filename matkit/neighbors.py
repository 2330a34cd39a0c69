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
