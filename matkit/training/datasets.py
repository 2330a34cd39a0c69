"""Datasets for training: the trainer accepts any ``torch.utils.data.Dataset`` whose items are
:class:`~matkit.graph.AtomicGraph` objects carrying labels (``energy`` (1,) eV, ``forces`` (N, 3) eV/Å,
optional ``stress`` (1, 6) Voigt or (1, 3, 3) eV/Å^3, optional ``has_*`` masks).

:func:`load_dataset` opens a file: ``.h5``/``.hdf5`` through :class:`matkit.data.HDF5Dataset`; anything ASE
can read (extxyz, ASE db, traj...) into an in-memory :class:`GraphListDataset` with labels from the attached
single-point calculator (``energy``, ``forces``, ``stress``).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..graph import AtomicGraph, atoms_to_graph

__all__ = ["GraphListDataset", "graphs_from_atoms", "load_dataset", "structure_sizes", "dataset_species",
           "Subset"]


class GraphListDataset(Dataset):
    """A list of graphs held in memory."""

    def __init__(self, graphs: Sequence[AtomicGraph]):
        self.graphs = list(graphs)
        self.num_atoms = np.array([g.num_nodes for g in self.graphs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> AtomicGraph:
        return self.graphs[index]


class Subset(Dataset):
    """``dataset`` restricted to ``indices`` (keeps ``num_atoms`` when the parent has it)."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        parent = getattr(dataset, "num_atoms", None)
        if parent is not None and not callable(parent):
            self.num_atoms = np.asarray(parent)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def graphs_from_atoms(images, cutoff: float, dtype: Optional[torch.dtype] = None) -> List[AtomicGraph]:
    """Graphs with labels from ``atoms.calc`` results (energy, forces, stress when present)."""
    graphs = []
    for k, atoms in enumerate(images):
        results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        labels = {}
        if "energy" in results:
            labels["energy"] = torch.tensor([float(results["energy"])], dtype=torch.float64)
        if "forces" in results:
            labels["forces"] = torch.as_tensor(np.asarray(results["forces"]), dtype=dtype or torch.get_default_dtype())
        if "stress" in results:
            stress = np.asarray(results["stress"], dtype=float)
            if stress.shape == (3, 3):
                stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            labels["stress"] = torch.as_tensor(stress.reshape(1, 6), dtype=dtype or torch.get_default_dtype())
        if not labels:
            raise ValueError(f"structure {k} has no energy/forces/stress labels (nothing to train on)")
        graphs.append(atoms_to_graph(atoms, cutoff, dtype=dtype, **labels))
    return graphs


def load_dataset(path, cutoff: float, dtype: Optional[torch.dtype] = None) -> Dataset:
    """Open a training/validation dataset file (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.suffix.lower() in (".h5", ".hdf5"):
        from ..data.dataset import HDF5Dataset  # the HDF5 loader of matkit.data

        return HDF5Dataset(str(path), cutoff=cutoff, dtype=dtype)
    import ase.io

    images = ase.io.read(str(path), index=":")
    return GraphListDataset(graphs_from_atoms(images, cutoff, dtype))


def structure_sizes(dataset) -> np.ndarray:
    """Atoms per structure (int64 array), from ``dataset.num_atoms`` / ``dataset.n_atoms`` when available
    (:class:`matkit.data.HDF5Dataset` reads them from the file index), else by reading every item."""
    for name in ("num_atoms", "n_atoms"):
        sizes = getattr(dataset, name, None)
        if sizes is not None and not callable(sizes):
            sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
            if len(sizes) == len(dataset):
                return sizes
    return np.array([int(dataset[i].num_nodes) for i in range(len(dataset))], dtype=np.int64)


def dataset_species(dataset, indices: Optional[Sequence[int]] = None) -> List[int]:
    """Sorted atomic numbers present in the dataset (or in ``indices`` of it)."""
    indices = range(len(dataset)) if indices is None else indices
    present = set()
    for i in indices:
        present.update(torch.unique(dataset[int(i)].atomic_numbers).tolist())
    return sorted(int(z) for z in present)
