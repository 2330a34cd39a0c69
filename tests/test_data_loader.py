"""HDF5Dataset graphs vs ASE neighbour lists, DataLoader with worker processes, the atom-bounded batch sampler
(determinism, bound, distributed partitioning) and validation splits."""
import os
import pickle

import numpy as np
import pytest
import torch

from matkit.data import (HDF5Dataset, MaxAtomsBatchSampler, atom_batched_loader, convert, random_split_indices)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")


@pytest.fixture(scope="module")
def mptrj_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mptrj.h5"
    convert(os.path.join(FIXTURES, "mptrj_thin_11.db"), path, "asedb", id_key="uid", progress=False)
    return path


def test_graph_edges_match_ase_neighbor_list(mptrj_file):
    import ase.db
    from ase.neighborlist import neighbor_list

    dataset = HDF5Dataset(mptrj_file, cutoff=4.0, dtype=torch.float64)
    rows = list(ase.db.connect(os.path.join(FIXTURES, "mptrj_thin_11.db")).select())
    for k in (0, 5):
        graph, atoms = dataset[k], rows[k].toatoms()
        i, j, d = neighbor_list("ijd", atoms, 4.0)
        assert graph.edge_index.shape[1] == len(i)
        src, dst = graph.edge_index
        vec = graph.pos[src] - graph.pos[dst] + graph.shifts @ graph.cell[0]
        np.testing.assert_allclose(np.sort(vec.norm(dim=1).numpy()), np.sort(d), atol=1e-10)
        assert graph.frame_index.item() == k and graph.frame_id == rows[k].data["uid"]


def test_dataset_pickles_without_an_open_handle(mptrj_file):
    dataset = HDF5Dataset(mptrj_file, cutoff=3.0)
    dataset[3]  # opens the file in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert all(f._h5 is None for f in clone.files)
    torch.testing.assert_close(clone[3].forces, dataset[3].forces)


def test_dataloader_with_two_workers_matches_direct_reads(mptrj_file):
    dataset = HDF5Dataset(mptrj_file, cutoff=3.0, dtype=torch.float64)
    dataset[0]  # the parent has the file open before the workers fork
    loader = atom_batched_loader(dataset, max_atoms=40, shuffle=True, seed=3, num_workers=2)
    seen = []
    for batch in loader:
        assert batch.num_nodes <= 40 or batch.num_graphs == 1
        for g, index in enumerate(batch.frame_index.tolist()):
            direct = dataset[index]
            mask = batch.batch == g
            torch.testing.assert_close(batch.pos[mask], direct.pos, rtol=0, atol=0)
            torch.testing.assert_close(batch.forces[mask], direct.forces, rtol=0, atol=0)
            assert batch.energy[g].item() == direct.energy.item()
            seen.append(index)
    assert sorted(seen) == list(range(len(dataset)))


def test_dataset_subset_and_multiple_files(mptrj_file, tmp_path):
    other = tmp_path / "si.h5"
    convert(os.path.join(FIXTURES, "mlearn_si_4.json"), other, "mlearn", progress=False)
    both = HDF5Dataset([mptrj_file, other], cutoff=3.0, properties=[], atom_properties=[])
    assert len(both) == 15 and both[12].frame_id == "Si-1"
    subset = HDF5Dataset([mptrj_file, other], cutoff=3.0, indices=[12, 0], properties=[], atom_properties=[])
    assert subset[0].frame_id == "Si-1" and subset.n_atoms.tolist() == [both.n_atoms[12], both.n_atoms[0]]
    # configuration types follow the same concatenation and indexing (mlearn groups; the MPtrj frames have none)
    assert both.groups == [""] * 11 + ["Vacancy", "Surface", "AIMD-NVT", "Elastic"]
    assert subset.groups == ["Surface", ""] and all(f._h5 is None for f in subset.files)
    with pytest.raises(KeyError, match="not in every file"):
        HDF5Dataset([mptrj_file, other], cutoff=3.0, properties=["corrected_total_energy"])
    with pytest.raises(IndexError):
        both[15]


def test_dataset_groups_ignore_rows_past_n_frames(tmp_path):
    """Rows an interrupted append left past ``n_frames`` do not shift the next file's configuration types."""
    import h5py

    path = tmp_path / "si.h5"
    convert(os.path.join(FIXTURES, "mlearn_si_4.json"), path, "mlearn", progress=False)
    with h5py.File(path, "r+") as h5:
        h5["frames/groups"].resize(6, axis=0)
        h5["frames/groups"][4] = "not a frame"
    dataset = HDF5Dataset([path, path], cutoff=3.0, properties=[], atom_properties=[])
    assert dataset.groups == ["Vacancy", "Surface", "AIMD-NVT", "Elastic"] * 2


def test_sampler_bound_coverage_and_determinism():
    sizes = np.random.default_rng(0).integers(1, 60, size=200)
    sampler = MaxAtomsBatchSampler(sizes, max_atoms=100, shuffle=True, seed=7)
    epoch0 = list(sampler)
    assert all(sizes[b].sum() <= 100 for b in epoch0)
    assert sorted(i for b in epoch0 for i in b) == list(range(200))
    assert list(MaxAtomsBatchSampler(sizes, 100, shuffle=True, seed=7)) == epoch0  # same seed+epoch
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and len(sampler) == len(list(sampler))
    ordered = list(MaxAtomsBatchSampler(sizes, 100, shuffle=False))
    assert [i for b in ordered for i in b] == list(range(200))
    # greedy packing: no two consecutive batches could have been merged
    assert all(sizes[a].sum() + sizes[b[0]] > 100 for a, b in zip(ordered, ordered[1:]))


def test_sampler_oversized_frame_and_drop_last():
    with pytest.warns(UserWarning, match="exceed max_atoms"):
        batches = list(MaxAtomsBatchSampler([5, 500, 5], 100, shuffle=False))
    assert batches == [[0], [1], [2]]
    assert list(MaxAtomsBatchSampler([40, 40, 40, 10], 100, shuffle=False, drop_last=True)) == [[0, 1]]
    assert list(MaxAtomsBatchSampler([40, 40, 40, 10], 100, shuffle=False)) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_distributed_partition(world_size):
    sizes = np.random.default_rng(1).integers(1, 30, size=101)
    per_rank = [list(MaxAtomsBatchSampler(sizes, 64, seed=5, num_replicas=world_size, rank=r))
                for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1, "every rank runs the same number of steps"
    single = list(MaxAtomsBatchSampler(sizes, 64, seed=5))
    covered = [i for batches in per_rank for b in batches for i in b]
    assert set(covered) == set(range(101))
    assert len(covered) - 101 == sum(len(b) for b in single[: len(covered) and
                                                             (world_size - len(single) % world_size) % world_size])
    dropped = [list(MaxAtomsBatchSampler(sizes, 64, seed=5, num_replicas=world_size, rank=r, drop_last=True))
               for r in range(world_size)]
    flat = [i for batches in dropped for b in batches for i in b]
    assert len(flat) == len(set(flat)), "with drop_last no frame is repeated"
    with pytest.raises(ValueError, match="rank 3"):
        MaxAtomsBatchSampler(sizes, 64, num_replicas=3, rank=3)


def test_random_split_indices():
    train, val = random_split_indices(100, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).tolist() == list(range(100))
    again = random_split_indices(100, 0.1, seed=0)
    assert np.array_equal(again[1], val) and not np.array_equal(random_split_indices(100, 0.1, seed=1)[1], val)
    assert len(random_split_indices(3, 0.01)[1]) == 1 and len(random_split_indices(2, 0.9)[0]) == 1
    with pytest.raises(ValueError):
        random_split_indices(10, 1.0)
