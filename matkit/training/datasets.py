"""Datasets for training: the trainer accepts any ``torch.utils.data.Dataset`` whose items are
:class:`~matkit.graph.AtomicGraph` objects carrying labels (``energy`` (1,) eV, ``forces`` (N, 3) eV/Å,
optional ``stress`` (1, 6) Voigt or (1, 3, 3) eV/Å^3, optional ``has_*`` masks).

:func:`load_dataset` opens a file: ``.h5``/``.hdf5`` through :class:`matkit.data.HDF5Dataset`; anything ASE
can read (extxyz, ASE db, traj...) into an in-memory :class:`GraphListDataset` with labels from the attached
single-point calculator (``energy``, ``forces``, ``stress``).

:func:`dataset_fingerprint` verifies and identifies a dataset file (recorded in checkpoints, checked on resume);
:func:`scan_labels` finds the frames whose labels the loss ignores (NaN/inf, or none for the weighted terms), so
that the trainer can say so instead of dropping them silently.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..graph import AtomicGraph, atoms_to_graph

__all__ = ["GraphListDataset", "graphs_from_atoms", "load_dataset", "structure_sizes", "dataset_species",
           "Subset", "StructureWeights", "structure_groups", "dataset_fingerprint", "LabelScan", "scan_labels"]


class GraphListDataset(Dataset):
    """A list of graphs held in memory; ``groups``: optional configuration type of each graph (see
    :func:`structure_groups`)."""

    def __init__(self, graphs: Sequence[AtomicGraph], groups: Optional[Sequence[str]] = None):
        self.graphs = list(graphs)
        self.num_atoms = np.array([g.num_nodes for g in self.graphs], dtype=np.int64)
        if groups is not None and len(groups) != len(self.graphs):
            raise ValueError(f"{len(groups)} group labels for {len(self.graphs)} graphs")
        self.groups = None if groups is None else [str(g) for g in groups]

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


class StructureWeights(Dataset):
    """``dataset`` whose items carry a loss weight: ``loss_weight`` (1,) float64 = ``weights[index]``, read by
    :func:`matkit.training.losses.batch_targets`. Items are shallow copies: the parent's graphs are left as they
    are (an in-memory dataset may hand out the same graph to validation)."""

    def __init__(self, dataset, weights: Sequence[float]):
        if len(weights) != len(dataset):
            raise ValueError(f"{len(weights)} loss weights for {len(dataset)} structures")
        self.dataset = dataset
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        graph = copy.copy(self.dataset[index])
        graph.loss_weight = self.weights[int(index)].reshape(1)
        return graph


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
    return GraphListDataset(graphs_from_atoms(images, cutoff, dtype),
                            groups=[str(atoms.info.get("config_type", "")) for atoms in images])


def structure_groups(dataset) -> List[str]:
    """The configuration type of every structure of ``dataset`` ('' where it has none), e.g. mlearn's
    ``AIMD-NVT`` / ``Elastic`` / ``Surface`` / ``Vacancy``: ``frames/groups`` of matkit HDF5 files
    (:class:`matkit.data.HDF5Dataset`), ``atoms.info["config_type"]`` of ASE-readable files (the extxyz convention
    of MACE and others). Raises ValueError for a dataset that records none."""
    groups = getattr(dataset, "groups", None)
    if groups is None:
        raise ValueError(f"{type(dataset).__name__} records no configuration types (groups)")
    return list(groups)


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


def dataset_fingerprint(path) -> str:
    """sha256 (hex) identifying a dataset file's content. A matkit HDF5 file is verified first
    (:func:`matkit.data.hdf5.verify_file`: structure, and the stored content hash recomputed; raises on a
    mismatch) and its content hash is returned; any other file is hashed byte for byte."""
    path = Path(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        from ..data.hdf5 import verify_file

        return verify_file(str(path))
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


LABELS = ("energy", "forces", "stress")


@dataclass
class LabelScan:
    """Labels of ``indices`` of a dataset that the loss cannot use. ``non_finite[label]``: frames whose label is
    marked present but holds NaN/inf (the loss ignores it; for forces, the affected atoms). ``unusable``: frames
    without a usable label for any positively weighted loss term (they contribute nothing: dropped).
    ``labelled[label]``: how many frames hold a usable value of that label, weighted or not (``run.select_by`` needs
    one in the validation split)."""

    frames: int
    weighted: List[str]
    non_finite: Dict[str, List[int]] = field(default_factory=dict)
    unusable: List[int] = field(default_factory=list)
    labelled: Dict[str, int] = field(default_factory=dict)

    def summary(self, dataset=None, examples: int = 4) -> Optional[str]:
        """One line with the counts and a few frame indices (and ids, when the dataset has them); None when every
        frame is fully usable."""
        def some(indices):
            shown = ", ".join(_frame_name(dataset, i) for i in indices[:examples])
            return shown + (", ..." if len(indices) > examples else "")

        parts = []
        bad = sorted({i for frames in self.non_finite.values() for i in frames})
        if bad:
            details = "; ".join(f"{label} in {len(frames)} (frames {some(frames)})"
                                for label, frames in self.non_finite.items() if frames)
            parts.append(f"{len(bad)} of {self.frames} frames have NaN/inf labels that the loss ignores: {details}")
        if self.unusable:
            parts.append(f"{len(self.unusable)} of {self.frames} frames have no usable label for the weighted loss "
                         f"terms ({', '.join(self.weighted)}) and are dropped (frames {some(self.unusable)})")
        return "; ".join(parts) or None


def _frame_name(dataset, index: int) -> str:
    name = getattr(dataset[int(index)], "frame_id", None) if dataset is not None else None
    return f"{index} {name!r}" if name else str(index)


def _label_arrays(dataset, index: int) -> Dict[str, Optional[np.ndarray]]:
    """``{label: values}`` of one frame, None where the label is absent or marked missing (``has_*`` false).
    Reads raw arrays (no neighbour list) when the dataset offers ``read_arrays`` (:class:`matkit.data.HDF5Dataset`)."""
    out = {}
    if hasattr(dataset, "read_arrays"):
        arrays = dataset.read_arrays(int(index))
        for label in LABELS:
            present = bool(arrays.get(f"has_{label}", True)) and arrays.get(label) is not None
            out[label] = np.asarray(arrays[label], dtype=np.float64) if present else None
        return out
    graph = dataset[int(index)]
    for label in LABELS:
        value = getattr(graph, label, None)
        flag = getattr(graph, f"has_{label}", None)
        present = value is not None and (flag is None or bool(torch.as_tensor(flag).reshape(-1)[0]))
        out[label] = value.detach().cpu().to(torch.float64).numpy() if present else None
    return out


def scan_labels(dataset, indices: Sequence[int], weights: Dict[str, float]) -> LabelScan:
    """Find the frames of ``dataset[indices]`` whose labels the loss ignores (see :class:`LabelScan`); ``weights``
    are the loss weights by label. Reported indices are dataset indices."""
    weighted = [label for label in LABELS if weights.get(label, 0.0) > 0]
    scan = LabelScan(len(indices), weighted, {label: [] for label in LABELS}, labelled={label: 0 for label in LABELS})
    for i in indices:
        usable = False
        for label, values in _label_arrays(dataset, i).items():
            if values is None:
                continue
            finite = np.isfinite(values)
            if not finite.all():
                scan.non_finite[label].append(int(i))
            # the loss keeps the finite force rows of a frame; energy and stress must be finite as a whole
            ok = finite.reshape(len(values), -1).all(axis=1).any() if label == "forces" and values.ndim == 2 \
                else bool(finite.all())
            scan.labelled[label] += int(ok)
            usable = usable or (ok and label in weighted)
        if not usable:
            scan.unusable.append(int(i))
    return scan
