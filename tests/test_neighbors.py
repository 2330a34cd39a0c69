"""Tests of matkit.neighbors against ASE (and vesin when installed): pair sets, order, batching, Verlet skin, errors."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from matkit.neighbors import VerletNeighborList, batched_neighbor_list, neighbor_list

PBC_CHOICES = [tuple(bool(int(c)) for c in f"{k:03b}") for k in range(8)]


def ase_pairs(positions, cell, pbc, cutoff, self_interaction=False):
    """ASE's (i, j, S) list for the same input, as a set of tuples."""
    atoms = Atoms("H" * len(positions), positions=positions, cell=cell, pbc=pbc)
    i, j, S = ase_neighbor_list("ijS", atoms, cutoff, self_interaction=self_interaction)
    return set(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))


def as_set(i, j, S):
    return set(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))


def check_format(i, j, S):
    """int64 arrays of the documented shapes, sorted by (i, j, S), no duplicates."""
    assert i.dtype == j.dtype == S.dtype == np.int64
    assert i.shape == j.shape == (len(S),) and S.shape == (len(i), 3)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    np.testing.assert_array_equal(order, np.arange(len(i)))
    assert len(as_set(i, j, S)) == len(i)


def random_cell(rng, skew):
    """Random triclinic cell (3,3): lengths 2-12 Å, off-diagonal shear up to ``skew`` times the lengths, rotated."""
    lengths = rng.uniform(2.0, 12.0, 3)
    cell = np.diag(lengths)
    for a, b in [(1, 0), (2, 0), (2, 1)]:
        cell[a, b] = rng.uniform(-skew, skew) * lengths[b]
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return cell @ q


def random_case(rng):
    """A random structure: cell (possibly strongly skewed), pbc combination, atoms (some outside), cutoff."""
    kind = rng.integers(5)
    pbc = PBC_CHOICES[rng.integers(8)]
    if kind == 0:  # tiny cell, cutoff up to 3x the cell
        cell = random_cell(rng, 0.5) * rng.uniform(0.2, 0.5)
        n = int(rng.integers(1, 4))
        cutoff = 3.0 * np.abs(np.linalg.det(cell)) ** (1 / 3) * rng.uniform(0.5, 1.0)
    elif kind == 1:  # strongly skewed
        cell = random_cell(rng, 3.0)
        n = int(rng.integers(1, 25))
        cutoff = rng.uniform(1.0, 7.0)
    elif kind == 2:  # many atoms, several bins per direction
        cell = random_cell(rng, 0.3) * 1.5
        n = int(rng.integers(40, 150))
        cutoff = rng.uniform(1.0, 4.0)
    else:
        cell = random_cell(rng, 0.6)
        n = int(rng.integers(0, 30))
        cutoff = rng.uniform(0.5, 8.0)
    frac = rng.uniform(-0.6, 1.6, (n, 3)) if rng.random() < 0.5 else rng.random((n, 3))
    positions = frac @ cell
    if not any(pbc) and rng.random() < 0.5:
        cell = np.zeros((3, 3))  # molecule: no cell at all
    return positions, cell, pbc, cutoff


@pytest.mark.parametrize("seed", range(6))
def test_matches_ase_on_random_structures(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        positions, cell, pbc, cutoff = random_case(rng)
        self_interaction = bool(rng.random() < 0.2)
        i, j, S = neighbor_list(positions, cell, pbc, cutoff, self_interaction=self_interaction)
        check_format(i, j, S)
        assert as_set(i, j, S) == ase_pairs(positions, cell, pbc, cutoff, self_interaction)
        assert not np.any(S[:, ~np.array(pbc)])
        d = np.linalg.norm(positions[j] + S @ cell - positions[i], axis=1)
        assert np.all(d < cutoff)


def test_one_atom_cell_with_cutoff_three_times_the_cell():
    cell = np.array([[2.0, 0.0, 0.0], [0.7, 1.9, 0.0], [0.4, 0.5, 2.1]])
    positions = np.array([[5.3, -1.2, 0.4]])  # outside the cell
    for self_interaction in (False, True):
        i, j, S = neighbor_list(positions, cell, True, 6.3, self_interaction=self_interaction)
        check_format(i, j, S)
        assert as_set(i, j, S) == ase_pairs(positions, cell, [True] * 3, 6.3, self_interaction)
        assert ((0, 0, (0, 0, 0)) in as_set(i, j, S)) == self_interaction
    # a pair list of a lattice is symmetric: S and -S both present
    assert as_set(i, j, S) == as_set(j, i, -S)


def test_two_atom_triclinic_cell_and_fcc_supercell():
    cell = np.array([[2.9, 0, 0], [0.9, 2.7, 0], [0.6, 0.8, 3.1]])
    positions = np.array([[0.1, 0.2, 0.3], [1.5, 1.4, 1.6]])
    for cutoff in (5.0, 6.0, 11.0):
        i, j, S = neighbor_list(positions, cell, True, cutoff)
        check_format(i, j, S)
        assert as_set(i, j, S) == ase_pairs(positions, cell, [True] * 3, cutoff)
    atoms = bulk("Cu", "fcc", a=3.615, cubic=True).repeat(3)
    atoms.rattle(0.02, seed=1)
    i, j, S = neighbor_list(atoms.positions, atoms.cell.array, True, 5.0)
    check_format(i, j, S)
    assert len(i) == 4536
    assert as_set(i, j, S) == ase_pairs(atoms.positions, atoms.cell.array, [True] * 3, 5.0)


def test_molecule_slab_wire_and_degenerate_inputs():
    c60 = molecule("C60")
    i, j, S = neighbor_list(c60.positions, np.zeros((3, 3)), False, 5.0)
    check_format(i, j, S)
    assert as_set(i, j, S) == ase_pairs(c60.positions, np.zeros((3, 3)), [False] * 3, 5.0)
    assert len(i) == 1740
    # slab and wire whose non-periodic cell vectors are zero
    rng = np.random.default_rng(7)
    slab_cell = np.array([[4.0, 0.0, 0.0], [1.5, 3.5, 0.0], [0.0, 0.0, 0.0]])
    wire_cell = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.3, 2.5]])
    for cell, pbc in [(slab_cell, (True, True, False)), (wire_cell, (False, False, True))]:
        positions = rng.uniform(-3, 8, (25, 3))
        i, j, S = neighbor_list(positions, cell, pbc, 4.0)
        check_format(i, j, S)
        assert as_set(i, j, S) == ase_pairs(positions, cell, pbc, 4.0)
    # 0 and 1 atoms; all atoms on one point
    for n in (0, 1):
        i, j, S = neighbor_list(np.zeros((n, 3)), np.eye(3) * 10, True, 3.0)
        assert len(i) == 0 and S.shape == (0, 3) and i.dtype == np.int64
    i, j, S = neighbor_list(np.zeros((3, 3)), np.zeros((3, 3)), False, 1.0)
    assert as_set(i, j, S) == {(a, b, (0, 0, 0)) for a in range(3) for b in range(3) if a != b}
    # pbc given as one bool or ints
    pos = rng.random((5, 3)) * 3
    ref = neighbor_list(pos, np.eye(3) * 3, [True, True, True], 2.0)
    for pbc in (True, [1, 1, 1], np.array([True] * 3)):
        for a, b in zip(neighbor_list(pos, np.eye(3) * 3, pbc, 2.0), ref):
            np.testing.assert_array_equal(a, b)


def test_batched_equals_per_structure_calls():
    rng = np.random.default_rng(3)
    cases = [random_case(rng) for _ in range(40)]
    cases.insert(5, (np.zeros((0, 3)), np.eye(3) * 4, (True, True, True), 3.0))
    cutoff = 3.5
    positions = [c[0] for c in cases]
    cells = np.stack([c[1] for c in cases])
    pbc = np.array([c[2] for c in cases])
    i, j, S, counts = batched_neighbor_list(positions, cells, pbc, cutoff=cutoff, self_interaction=True)
    check_format(i, j, S)
    ptr = np.concatenate([[0], np.cumsum([len(p) for p in positions])])
    edges = np.concatenate([[0], np.cumsum(counts)])
    for b, (pos, cell, pbc_b, _) in enumerate(cases):
        ref = neighbor_list(pos, cell, pbc_b, cutoff, self_interaction=True)
        block = slice(edges[b], edges[b + 1])
        np.testing.assert_array_equal(i[block], ref[0] + ptr[b])
        np.testing.assert_array_equal(j[block], ref[1] + ptr[b])
        np.testing.assert_array_equal(S[block], ref[2])
    # concatenated positions + ptr form gives the same arrays
    out = batched_neighbor_list(np.concatenate(positions), cells, pbc, ptr, cutoff, self_interaction=True)
    for a, b in zip(out, (i, j, S, counts)):
        np.testing.assert_array_equal(a, b)
    empty = batched_neighbor_list([], np.zeros((0, 3, 3)), True, cutoff=2.0)
    assert all(len(a) == 0 for a in empty)


def test_verlet_list_never_misses_a_pair_and_rebuilds_only_when_needed():
    rng = np.random.default_rng(11)
    cell = random_cell(rng, 0.5) * 0.8
    cell = cell * (64 / abs(np.linalg.det(cell)) * 12.0) ** (1 / 3)  # ~12 Å^3 per atom
    positions = rng.random((64, 3)) @ cell
    cutoff, skin = 3.5, 0.6
    verlet = VerletNeighborList(cutoff, skin)
    ref_pos = None
    expected_builds = 0
    for step in range(300):
        positions = positions + rng.normal(scale=0.03, size=positions.shape)
        if ref_pos is None or np.linalg.norm(positions - ref_pos, axis=1).max() > skin / 2:
            ref_pos = positions.copy()
            expected_builds += 1
        got = verlet.update(positions, cell, True)
        fresh = neighbor_list(positions, cell, True, cutoff)
        for a, b in zip(got, fresh):
            np.testing.assert_array_equal(a, b)
    assert verlet.n_builds == expected_builds
    assert 3 < expected_builds < 150
    # cell, pbc and atom-count changes force a rebuild
    n = verlet.n_builds
    verlet.update(positions, cell * 1.001, True)
    verlet.update(positions, cell * 1.001, [True, True, False])
    verlet.update(positions[:-1], cell * 1.001, [True, True, False])
    assert verlet.n_builds == n + 3
    # wrapping atoms into the cell moves them by a lattice vector: rebuilt, shifts stay correct
    wrapped = positions - np.floor(positions @ np.linalg.inv(cell)) @ cell
    got = verlet.update(wrapped, cell, True)
    for a, b in zip(got, neighbor_list(wrapped, cell, True, cutoff)):
        np.testing.assert_array_equal(a, b)
    # skin 0: rebuilt every call
    plain = VerletNeighborList(cutoff)
    for _ in range(3):
        plain.update(positions, cell, True)
    assert plain.n_builds == 3


def test_matches_vesin():
    vesin = pytest.importorskip("vesin")
    rng = np.random.default_rng(5)
    atoms = bulk("Cu", "fcc", a=3.615, cubic=True).repeat((6, 5, 4))
    atoms.rattle(0.05, seed=2)
    cases = [(atoms.positions, atoms.cell.array, (True, True, True), 5.0)]
    cases += [random_case(rng) for _ in range(40)]
    for positions, cell, pbc, cutoff in cases:
        if len(positions) == 0:
            continue
        vi, vj, vS = vesin.NeighborList(cutoff=cutoff, full_list=True).compute(positions, cell, list(pbc), "ijS")
        i, j, S = neighbor_list(positions, cell, pbc, cutoff)
        assert as_set(i, j, S) == as_set(vi.astype(np.int64), vj.astype(np.int64), vS.astype(np.int64))


def test_bad_input_errors():
    pos = np.random.default_rng(0).random((4, 3)) * 3
    cell = np.eye(3) * 3
    bad_pos = pos.copy()
    bad_pos[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        neighbor_list(bad_pos, cell, True, 2.0)
    bad_pos[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        neighbor_list(bad_pos, cell, False, 2.0)
    for cutoff in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="cutoff"):
            neighbor_list(pos, cell, True, cutoff)
    with pytest.raises(ValueError, match="singular"):
        neighbor_list(pos, np.zeros((3, 3)), True, 2.0)
    with pytest.raises(ValueError, match="singular"):
        neighbor_list(pos, [[3, 0, 0], [6, 0, 0], [0, 0, 3]], [True, True, False], 2.0)
    with pytest.raises(ValueError, match="singular"):
        neighbor_list(pos, [[3, 0, 0], [0, 3, 0], [3, 3, 0]], True, 2.0)
    with pytest.raises(ValueError, match="singular"):
        neighbor_list(pos, [[3, 0, 0], [0, 3, 0], [0, 0, 0]], [False, False, True], 2.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        neighbor_list(pos, [[3, 0, 0], [0, np.nan, 0], [0, 0, 3]], True, 2.0)
    # a zero or NaN cell vector along a non-periodic direction is fine
    neighbor_list(pos, [[3, 0, 0], [0, 3, 0], [0, 0, np.nan]], [True, True, False], 2.0)
    with pytest.raises(ValueError, match="positions"):
        neighbor_list(pos[:, :2], cell, True, 2.0)
    with pytest.raises(ValueError, match="cell"):
        neighbor_list(pos, np.eye(2), True, 2.0)
    with pytest.raises(ValueError, match="pbc"):
        neighbor_list(pos, cell, [True, False], 2.0)
    with pytest.raises(ValueError, match="ptr"):
        batched_neighbor_list(pos, cell[None], True, [0, 3], 2.0)
    with pytest.raises(ValueError, match="cells"):
        batched_neighbor_list(pos, cell, True, [0, 4], 2.0)
    with pytest.raises(ValueError, match="structure 1"):
        batched_neighbor_list(pos, np.stack([cell, np.zeros((3, 3))]), True, [0, 2, 4], 2.0)
    with pytest.raises(ValueError, match="cutoff"):
        VerletNeighborList(-1.0)
    with pytest.raises(ValueError, match="too many periodic images"):
        neighbor_list(pos, cell * 1e-6, True, 2.0)
    with pytest.raises(ValueError, match="away from the cell"):
        neighbor_list(pos + 1e14, cell, True, 2.0)


def test_exact_ties_follow_ase():
    """Pairs exactly at the cutoff (lattice vectors equal to it) are excluded, as in ASE, however atoms are wrapped."""
    cell = np.diag([3.0, 3.0, 4.0])
    positions = np.array([[0.5, 0.5, 0.5], [2.0, 0.5, 0.5], [-2.5, 3.5, 8.5], [6.5, -5.5, 1.5]])
    for cutoff in (1.5, 3.0, 4.0, 5.0, 6.0):
        i, j, S = neighbor_list(positions, cell, True, cutoff)
        assert as_set(i, j, S) == ase_pairs(positions, cell, [True] * 3, cutoff)
        verlet = VerletNeighborList(cutoff, skin=0.5)
        for a, b in zip(verlet.update(positions, cell, True), (i, j, S)):
            np.testing.assert_array_equal(a, b)
