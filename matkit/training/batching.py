"""Deterministic epoch batching for training.

An epoch is a list of *global* batches (lists of dataset indices), built from ``(seed, epoch)`` alone, so a
run resumed in the middle of an epoch sees exactly the same order. With ``R`` ranks each global batch is
split into ``R`` disjoint parts (:func:`matkit.training.ddp.split_global_batch`); a single process uses the
whole global batch, so one process and ``R`` processes see the same global batches.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

__all__ = ["epoch_order", "make_batches", "epoch_batches", "flatten_batches", "unflatten_batches"]


def epoch_order(indices: Sequence[int], seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """The order of ``indices`` in ``epoch`` (a fixed permutation per ``(seed, epoch)``)."""
    indices = [int(i) for i in indices]
    if not shuffle:
        return indices
    rng = np.random.default_rng([int(seed), int(epoch), 0x6D6B])
    return [indices[k] for k in rng.permutation(len(indices))]


def make_batches(order: Sequence[int], sizes: Sequence[int], batch_size: int,
                 max_atoms: Optional[int] = None, min_structures: int = 1) -> List[List[int]]:
    """Cut an ordered list of dataset indices into global batches.

    ``sizes[i]``: atoms of structure ``i`` (indexed by dataset index). Without ``max_atoms`` a batch holds
    ``batch_size`` structures; with it, consecutive structures are packed while the batch has at most
    ``max_atoms`` atoms (a single larger structure forms its own batch). Every batch holds at least
    ``min_structures`` structures (the number of ranks): a too-short batch is extended beyond the atom cap,
    and a too-short last batch is merged into the previous one.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    batches: List[List[int]] = []
    current: List[int] = []
    atoms = 0
    for index in order:
        n = int(sizes[index])
        if max_atoms is None:
            full = len(current) >= batch_size
        else:
            full = bool(current) and atoms + n > max_atoms and len(current) >= min_structures
        if full:
            batches.append(current)
            current, atoms = [], 0
        current.append(int(index))
        atoms += n
    if current:
        if len(current) < min_structures and batches:
            batches[-1].extend(current)
        else:
            batches.append(current)
    if any(len(b) < min_structures for b in batches):
        raise ValueError(f"the training set has {len(order)} structures, fewer than the {min_structures} ranks")
    return batches


def epoch_batches(indices: Sequence[int], sizes: Sequence[int], seed: int, epoch: int, batch_size: int,
                  max_atoms: Optional[int] = None, shuffle: bool = True, min_structures: int = 1) -> List[List[int]]:
    """Global batches of ``epoch``: :func:`epoch_order` then :func:`make_batches`."""
    return make_batches(epoch_order(indices, seed, epoch, shuffle), sizes, batch_size, max_atoms, min_structures)


def flatten_batches(batches: Sequence[Sequence[int]]):
    """``(flat indices, batch lengths)`` as int64 lists (plain data for checkpoints)."""
    return [int(i) for b in batches for i in b], [len(b) for b in batches]


def unflatten_batches(flat: Sequence[int], lengths: Sequence[int]) -> List[List[int]]:
    out, start = [], 0
    for n in lengths:
        out.append([int(i) for i in flat[start:start + int(n)]])
        start += int(n)
    if start != len(flat):
        raise ValueError("corrupt batch order in checkpoint: lengths do not add up to the number of indices")
    return out
