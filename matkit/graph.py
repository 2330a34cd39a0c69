"""Atomic graphs: ``ase.Atoms`` / pymatgen structures -> PyG ``Data`` with periodic edges.

Conventions (used by every model in matkit):

* ``edge_index[0]`` is the *source* (neighbour j), ``edge_index[1]`` the *target* (centre i);
  messages are aggregated at ``edge_index[1]`` (PyG "source_to_target" flow).
* ``shifts`` (E, 3) holds the integer cell shift of the neighbour (stored in the float dtype of ``pos``).
* the edge vector points from the centre to the neighbour::

      vec = pos[j] - pos[i] + shifts @ cell[batch[i]]          (Å)

  It is computed in torch from ``pos``, ``cell`` and ``shifts`` so that gradients flow to positions and to a
  strain applied to positions and cell (forces and stress by autograd).
* ``cell`` is stored as (1, 3, 3) per structure (rows are lattice vectors), so a PyG batch has (B, 3, 3);
  ``pbc`` is (1, 3) bool -> (B, 3). Non-periodic structures have a zero cell.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from .neighbors import neighbor_list

__all__ = ["AtomicGraph", "atoms_to_graph", "pymatgen_to_graph", "graph_from_pairs", "batch_graphs", "edge_vectors",
           "check_atoms", "check_pair_distances", "centred_positions", "MIN_PAIR_DISTANCE"]

#: atoms closer than this (Å) are refused: no physical structure has them (H2's bond is 0.74 Å), and at zero
#: distance the edge directions of every model are undefined (NaN energies)
MIN_PAIR_DISTANCE = 0.1


class AtomicGraph(Data):
    """A structure as a PyG graph.

    Attributes
    ----------
    pos : (N, 3) float   Cartesian positions, Å.
    atomic_numbers : (N,) int64
    cell : (1, 3, 3) float   lattice vectors as rows, Å (zeros for molecules).
    pbc : (1, 3) bool
    edge_index : (2, E) int64   [source = neighbour j, target = centre i].
    shifts : (E, 3) float   integer-valued cell shift of the neighbour.
    Optional labels: ``energy`` (1,) eV, ``forces`` (N, 3) eV/Å, ``stress`` (1, 6) eV/Å^3 (ASE Voigt order).
    """

    @property
    def num_atoms(self) -> int:
        return int(self.pos.shape[0])

    def __inc__(self, key, value, *args, **kwargs):
        # PyG offsets every attribute whose name contains "index" by the node count when batching; only
        # edge_index holds node indices here (frame_index is a dataset position and must stay as it is).
        if "index" in key and key != "edge_index":
            return 0
        return super().__inc__(key, value, *args, **kwargs)

    @classmethod
    def from_ase(cls, atoms, cutoff: float, dtype: torch.dtype | None = None, **labels) -> "AtomicGraph":
        return atoms_to_graph(atoms, cutoff, dtype=dtype, **labels)

    @classmethod
    def from_pymatgen(cls, structure, cutoff: float, dtype: torch.dtype | None = None, **labels) -> "AtomicGraph":
        return pymatgen_to_graph(structure, cutoff, dtype=dtype, **labels)


def check_atoms(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
    """Raise ``ValueError`` naming the problem for NaN/inf positions or a degenerate periodic cell."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), got {positions.shape}")
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        raise ValueError(f"positions contain NaN or inf (atoms {np.flatnonzero(bad)[:10].tolist()})")
    cell = np.asarray(cell, dtype=float)
    if not np.isfinite(cell).all():
        raise ValueError("cell contains NaN or inf")
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.any():
        vectors = cell[pbc]
        if np.linalg.matrix_rank(vectors, tol=1e-10) < len(vectors):
            raise ValueError(f"cell is singular along its periodic directions (pbc={pbc.tolist()}, "
                             f"cell={cell.tolist()}): zero-volume or degenerate lattice vectors")
        if pbc.all() and abs(np.linalg.det(cell)) < 1e-10:
            raise ValueError("cell has zero volume")


def check_pair_distances(positions, cell, i, j, S) -> None:
    """Raise ``ValueError`` naming the first pair ``(i, j, S)`` closer than :data:`MIN_PAIR_DISTANCE` (Å)."""
    if len(i) == 0:
        return
    vec = positions[j] - positions[i] + np.asarray(S, dtype=np.float64) @ np.asarray(cell, dtype=np.float64)
    d2 = np.einsum("ij,ij->i", vec, vec)
    close = np.flatnonzero(d2 < MIN_PAIR_DISTANCE ** 2)
    if close.size:
        k = close[0]
        raise ValueError(f"atoms {int(i[k])} and {int(j[k])} are {np.sqrt(d2[k]):.3f} Å apart (closer than "
                         f"{MIN_PAIR_DISTANCE} Å: coincident or overlapping atoms)")


def centred_positions(positions, cell, pbc, shifts, i, j):
    """Positions moved next to the origin without changing any pair vector, for a safe cast to float32.

    Periodic directions: every atom is wrapped into the cell (integer cell offsets ``n`` per atom, shifts of
    the pairs ``(i, j, S)`` corrected to ``S + n_j - n_i``); then all atoms are translated together so that
    their mean lies at the origin. Energies, forces and stress are unchanged; float32 keeps ~1e-6 Å resolution
    instead of losing it for atoms far from the origin. Returns ``(positions, shifts)`` in float64.
    """
    positions = np.asarray(positions, dtype=np.float64)
    shifts = np.asarray(shifts, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.any() and len(positions):
        cell = np.asarray(cell, dtype=np.float64)
        frac = np.linalg.solve(cell.T, positions.T).T if pbc.all() else _fractional_partial(positions, cell, pbc)
        n = np.where(pbc, np.floor(frac), 0.0)
        positions = positions - n @ cell
        if len(i):
            shifts = shifts + n[j] - n[i]
    if len(positions):
        positions = positions - positions.mean(axis=0)
    return positions, shifts


def _fractional_partial(positions, cell, pbc):
    """Fractional coordinates along the periodic cell vectors when only some directions are periodic."""
    vectors = cell[pbc]
    coeffs, *_ = np.linalg.lstsq(vectors.T, positions.T, rcond=None)
    frac = np.zeros_like(positions)
    frac[:, pbc] = coeffs.T
    return frac


def _graph_from_arrays(positions, numbers, cell, pbc, cutoff, dtype, labels) -> AtomicGraph:
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    dtype = dtype or torch.get_default_dtype()
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    check_atoms(positions, cell, pbc)
    i, j, S = neighbor_list(positions, cell, pbc, cutoff)
    graph = graph_from_pairs(positions, numbers, cell, pbc, i, j, S, dtype)
    for key, value in labels.items():
        if value is not None:
            setattr(graph, key, value)
    return graph


def graph_from_pairs(positions, numbers, cell, pbc, i, j, S, dtype: torch.dtype, device=None) -> AtomicGraph:
    """The one place an :class:`AtomicGraph` is assembled: positions (N, 3) Å, atomic numbers (N,), cell (3, 3) Å,
    pbc (3,), and the pairs ``(i, j, S)`` of a neighbour list (centre i, neighbour j, integer cell shift S of j)."""
    graph = AtomicGraph(
        pos=torch.as_tensor(np.asarray(positions), dtype=dtype, device=device),
        atomic_numbers=torch.as_tensor(np.asarray(numbers), dtype=torch.long, device=device),
        cell=torch.as_tensor(np.asarray(cell, dtype=np.float64), dtype=dtype, device=device).reshape(1, 3, 3),
        pbc=torch.as_tensor(np.asarray(pbc, dtype=bool), device=device).reshape(1, 3),
        edge_index=torch.stack([torch.as_tensor(j), torch.as_tensor(i)]).long().to(device),
        shifts=torch.as_tensor(S, dtype=dtype, device=device),
    )
    graph.num_nodes = len(positions)
    return graph


def atoms_to_graph(atoms, cutoff: float, dtype: torch.dtype | None = None, **labels) -> AtomicGraph:
    """Build an :class:`AtomicGraph` from ``ase.Atoms`` with all pairs closer than ``cutoff`` (Å)."""
    return _graph_from_arrays(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, cutoff, dtype, labels)


def pymatgen_to_graph(structure, cutoff: float, dtype: torch.dtype | None = None, **labels) -> AtomicGraph:
    """Build an :class:`AtomicGraph` from a pymatgen ``Structure`` (periodic) or ``Molecule`` (no pbc)."""
    from pymatgen.core import Molecule

    numbers = [site.specie.Z for site in structure]
    if isinstance(structure, Molecule):
        return _graph_from_arrays(structure.cart_coords, numbers, np.zeros((3, 3)), [False] * 3, cutoff, dtype,
                                  labels)
    pbc = getattr(structure.lattice, "pbc", (True, True, True))
    return _graph_from_arrays(structure.cart_coords, numbers, structure.lattice.matrix, pbc, cutoff, dtype, labels)


def batch_graphs(graphs: Sequence[AtomicGraph]) -> Batch:
    """Collate graphs into one PyG ``Batch`` (``batch`` vector maps atoms to structures)."""
    return Batch.from_data_list(list(graphs))


def graph_batch_vector(graph) -> torch.Tensor:
    """(N,) structure index of every atom (zeros for a single graph)."""
    batch = getattr(graph, "batch", None)
    if batch is None:
        return torch.zeros(graph.pos.shape[0], dtype=torch.long, device=graph.pos.device)
    return batch


def num_graphs(graph) -> int:
    n = getattr(graph, "num_graphs", None)
    return int(n) if n is not None else 1


def edge_vectors(pos: torch.Tensor, cell: torch.Tensor, edge_index: torch.Tensor, shifts: torch.Tensor,
                 batch: torch.Tensor) -> torch.Tensor:
    """Edge vectors (E, 3) in Å from centre (``edge_index[1]``) to neighbour (``edge_index[0]``) image.

    ``cell`` is (B, 3, 3); ``batch`` (N,) maps atoms to structures.
    """
    src, dst = edge_index[0], edge_index[1]
    vec = pos[src] - pos[dst]
    if shifts.numel():
        cell_of_edge = cell[batch[dst]]  # (E, 3, 3)
        vec = vec + torch.einsum("ek,ekl->el", shifts.to(pos.dtype), cell_of_edge)
    return vec
