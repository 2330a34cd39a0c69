"""Training-side loading: :class:`HDF5Dataset` (graphs from matkit HDF5 files), :class:`MaxAtomsBatchSampler`
(batches bounded by a total atom or edge count, deterministic and rank-partitioned) and
:func:`random_split_indices` (validation hold-out).

Typical use::

    train_idx, val_idx = random_split_indices(len(HDF5Dataset("si.h5", cutoff=5.0)), val_fraction=0.1, seed=0)
    train = HDF5Dataset("si.h5", cutoff=5.0, indices=train_idx)
    loader = atom_batched_loader(train, max_atoms=2000, shuffle=True, seed=0, num_workers=2)
    for epoch in range(n_epochs):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader: ...
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .hdf5 import FrameFile

__all__ = ["HDF5Dataset", "MaxAtomsBatchSampler", "random_split_indices", "atom_batched_loader", "collate_graphs"]


def _to_graph(arrays: dict, cutoff: float, dtype: torch.dtype, properties: Sequence[str],
              atom_properties: Sequence[str], index: int, frame_id: str):
    """Raw frame arrays -> :class:`matkit.graph.AtomicGraph` with labels.

    Labels: ``energy`` (1,) float64 eV, ``forces`` (N, 3) eV/Å, ``stress`` (1, 6) eV/Å^3 ASE Voigt, ``has_energy`` /
    ``has_forces`` / ``has_stress`` (1,) bool masks (a missing label is NaN), each per-frame property (1,) float64,
    each per-atom property (N, ...), ``frame_index`` (1,) int64 (index in the dataset) and ``frame_id`` (str).
    """
    from ase import Atoms

    from matkit.graph import atoms_to_graph

    atoms = Atoms(numbers=arrays["atomic_numbers"], positions=arrays["positions"], cell=arrays["cell"],
                  pbc=arrays["pbc"])
    labels = {
        "energy": torch.tensor([float(arrays["energy"])], dtype=torch.float64),
        "forces": torch.as_tensor(arrays["forces"], dtype=dtype),
        "stress": torch.as_tensor(arrays["stress"], dtype=dtype).reshape(1, 6),
        "has_energy": torch.tensor([arrays["has_energy"]]),
        "has_forces": torch.tensor([arrays["has_forces"]]),
        "has_stress": torch.tensor([arrays["has_stress"]]),
        "frame_index": torch.tensor([index], dtype=torch.long),
    }
    for name in properties:
        labels[name] = torch.tensor([float(arrays[name])], dtype=torch.float64)
    for name in atom_properties:
        labels[name] = torch.as_tensor(arrays[name], dtype=dtype)
    graph = atoms_to_graph(atoms, cutoff, dtype=dtype, **labels)
    # exact float64 positions/cell from the file (Atoms keeps them exactly, but be explicit)
    graph.frame_id = frame_id
    return graph


class HDF5Dataset(Dataset):
    """Frames of one or more matkit HDF5 files as :class:`matkit.graph.AtomicGraph` objects (edges within
    ``cutoff`` Å, built on the fly).

    paths: a file or list of files (concatenated in order). indices: optional subset (e.g. a training split) of the
    concatenated frame indices; ``dataset[k]`` is frame ``indices[k]``. dtype: float dtype of positions, forces, stress
    (energies are always float64). properties / atom_properties: names of extra labels to attach (default: all in
    the file(s); a name must exist in every file).

    The HDF5 files are opened lazily in the process that reads them (each DataLoader worker opens its own handle;
    no handle is pickled); only ``offsets``/``n_atoms`` are read at construction.
    """

    def __init__(self, paths, cutoff: float, dtype: Optional[torch.dtype] = None, indices: Optional[Sequence] = None,
                 properties: Optional[Sequence[str]] = None, atom_properties: Optional[Sequence[str]] = None,
                 transform=None):
        if not (math.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"cutoff must be a positive number of Å, got {cutoff}")
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("HDF5Dataset needs at least one file")
        self.cutoff = float(cutoff)
        self.dtype = dtype or torch.get_default_dtype()
        self.transform = transform
        self.files = [FrameFile(p) for p in paths]
        sizes, n_atoms = [], []
        for frames in self.files:
            frames.check()
            sizes.append(len(frames))
            n_atoms.append(frames.n_atoms)
        common = set.intersection(*(set(f.property_names) for f in self.files))
        common_atom = set.intersection(*(set(f.atom_property_names) for f in self.files))
        self.properties = sorted(common) if properties is None else list(properties)
        self.atom_properties = sorted(common_atom) if atom_properties is None else list(atom_properties)
        for name in self.properties:
            if name not in common:
                raise KeyError(f"property {name!r} is not in every file ({[f.path for f in self.files]})")
        for name in self.atom_properties:
            if name not in common_atom:
                raise KeyError(f"atom property {name!r} is not in every file ({[f.path for f in self.files]})")
        for frames in self.files:
            frames.close()  # reopened lazily by whichever process reads
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        all_n_atoms = np.concatenate(n_atoms) if n_atoms else np.zeros(0, np.int64)
        total = int(self._starts[-1])
        if indices is None:
            self.indices = np.arange(total, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= total):
                raise IndexError(f"indices must be in 0..{total - 1}")
        self.n_atoms = all_n_atoms[self.indices]  #: (len,) atoms per frame, for MaxAtomsBatchSampler

    def __len__(self) -> int:
        return len(self.indices)

    def locate(self, k: int) -> tuple[FrameFile, int]:
        """File and local frame index of dataset item ``k``."""
        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for a dataset of {len(self)} frames")
        g = int(self.indices[k])
        f = int(np.searchsorted(self._starts, g, side="right") - 1)
        return self.files[f], g - int(self._starts[f])

    @property
    def groups(self) -> list:
        """Configuration type of every item ('' where none), from ``frames/groups`` (e.g. mlearn's ``AIMD-NVT``,
        ``Elastic``); for errors by configuration type. Leaves the files closed (reopened lazily on access)."""
        labels = []
        for frames in self.files:
            # rows past the file's n_frames (an interrupted append) are not frames
            labels.append(np.asarray(frames.h5["frames/groups"].asstr()[:len(frames)], dtype=object))
            frames.close()
        labels = np.concatenate(labels)
        return [str(labels[int(i)]) for i in self.indices]

    def read_arrays(self, k: int) -> dict:
        frames, local = self.locate(k)
        return frames.read_arrays(local, self.properties, self.atom_properties)

    def __getitem__(self, k: int):
        frames, local = self.locate(int(k))
        arrays = frames.read_arrays(local, self.properties, self.atom_properties)
        frame_id = frames.h5["frames/ids"].asstr()[local]
        graph = _to_graph(arrays, self.cutoff, self.dtype, self.properties, self.atom_properties, int(k), frame_id)
        return self.transform(graph) if self.transform is not None else graph

    def close(self) -> None:
        for frames in self.files:
            frames.close()


def collate_graphs(graphs):
    """Collate a list of graphs into a PyG Batch (``matkit.graph.batch_graphs``)."""
    from matkit.graph import batch_graphs

    return batch_graphs(graphs)


class MaxAtomsBatchSampler(Sampler):
    """Batches of dataset indices whose total size (atoms, or edges if you pass edge counts) is at most ``max_atoms``.

    Frames are taken in a random order (seeded by ``seed + epoch``; call :meth:`set_epoch` every epoch) or in index
    order (``shuffle=False``) and packed greedily. A frame larger than ``max_atoms`` forms a batch on its own (with a
    warning at construction). ``drop_last`` drops the last, under-filled batch.

    Distributed use (like ``DistributedSampler``): every rank builds the same batch list and takes batches
    ``rank, rank + world_size, ...``; the list is padded with its first batches (or truncated with ``drop_last``) to
    a multiple of ``world_size``, so every rank runs the same number of steps. ``num_replicas``/``rank`` default to
    the initialised ``torch.distributed`` group, else 1/0.
    """

    def __init__(self, n_atoms_per_frame: Sequence[int], max_atoms: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        sizes = np.asarray(n_atoms_per_frame, dtype=np.int64).reshape(-1)
        if len(sizes) == 0:
            raise ValueError("MaxAtomsBatchSampler needs at least one frame")
        if max_atoms < 1:
            raise ValueError(f"max_atoms must be >= 1, got {max_atoms}")
        if sizes.min() < 0:
            raise ValueError("n_atoms_per_frame must be non-negative")
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if dist
                                                                          else 1)
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        too_big = np.flatnonzero(sizes > max_atoms)
        if len(too_big):
            warnings.warn(f"{len(too_big)} frame(s) exceed max_atoms={max_atoms} (largest {sizes.max()}, e.g. index "
                          f"{too_big[0]}); each goes into a batch of its own", stacklevel=2)
        self.sizes = sizes
        self.max_atoms = int(max_atoms)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self._cache: tuple[int, list] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.sizes))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.sizes), generator=generator).numpy()

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        batches, current, total = [], [], 0
        for index in order.tolist():
            size = int(self.sizes[index])
            if current and total + size > self.max_atoms:
                batches.append(current)
                current, total = [], 0
            current.append(index)
            total += size
        if current:
            if self.drop_last and batches and total < self.max_atoms:
                pass  # the under-filled tail is dropped
            else:
                batches.append(current)
        return batches

    def all_batches(self) -> list[list[int]]:
        """This epoch's batches for all ranks (padded/truncated to a multiple of ``num_replicas``)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        batches = self._pack(self._order())
        if self.num_replicas > 1:
            remainder = len(batches) % self.num_replicas
            if remainder and self.drop_last and len(batches) >= self.num_replicas:
                batches = batches[:len(batches) - remainder]
            elif remainder:
                pad = self.num_replicas - remainder
                batches = batches + [batches[k % len(batches)] for k in range(pad)]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.all_batches()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return len(self.all_batches()[self.rank::self.num_replicas])


def random_split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, validation) split of ``range(n)``: two sorted int64 arrays, deterministic given ``seed``.

    The validation set has ``round(n * val_fraction)`` frames, at least 1 (and at most n - 1) when val_fraction > 0.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    permutation = np.random.default_rng(seed).permutation(n)
    return np.sort(permutation[n_val:]).astype(np.int64), np.sort(permutation[:n_val]).astype(np.int64)


def atom_batched_loader(dataset: HDF5Dataset, max_atoms: int, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False, num_workers: int = 0, num_replicas: Optional[int] = None,
                        rank: Optional[int] = None, **loader_options) -> DataLoader:
    """DataLoader over ``dataset`` with a :class:`MaxAtomsBatchSampler` (``loader.batch_sampler.set_epoch(e)``)."""
    sampler = MaxAtomsBatchSampler(dataset.n_atoms, max_atoms, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                   num_replicas=num_replicas, rank=rank)
    loader_options.setdefault("persistent_workers", num_workers > 0)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_graphs, num_workers=num_workers,
                      **loader_options)
