"""Neighbour lists: an O(N) Numba cell list for periodic, partly periodic and open systems.

Public API
----------
``neighbor_list(positions, cell, pbc, cutoff, self_interaction=False) -> (i, j, S)``
    Full list (both directions) of the pairs with ``|positions[j] + S @ cell - positions[i]| < cutoff``, the
    meaning of ``ase.neighborlist.neighbor_list("ijS")``. ``i``, ``j``: int64 ``(n_pairs,)``; ``S``: int64
    ``(n_pairs, 3)``, the integer cell shift of ``j`` (always 0 along non-periodic directions). Sorted by
    ``(i, j, S)`` lexicographically.
``batched_neighbor_list(positions, cells, pbc, ptr, cutoff, self_interaction=False) -> (i, j, S, counts)``
    Many structures in one call (one Numba loop, no per-structure Python overhead); see its docstring.
``VerletNeighborList(cutoff, skin).update(positions, cell, pbc) -> (i, j, S)``
    Verlet-skin list for MD; ``n_builds`` counts the cell-list builds.

Algorithm (one structure)
-------------------------
1. *Binning frame.* Rows of the frame are the lattice vectors along periodic directions. Along non-periodic
   directions the cell vector is ignored (it may be zero) and replaced by unit vectors orthogonal to the periodic
   ones; atoms are then binned over their bounding box in that direction. Shifts along non-periodic directions are 0.
2. *Fractional coordinates* ``f = r @ inv(frame)``. Along a periodic direction k an atom is wrapped into the cell:
   ``n_k = floor(f_k)``, and the wrapped Cartesian position ``p = r - n @ cell`` is used for all distances. The
   integer wrap ``n`` is remembered, so the returned shift refers to the *input* (unwrapped) positions:
   ``p_j + img @ cell - p_i = r_j + S @ cell - r_i`` with ``S = img + n_i - n_j``.
3. *Bin grid.* The height of the cell along k (distance between the two faces not containing axis k) is
   ``h_k = 1 / |b_k|`` with ``b_k`` the k-th reciprocal vector (column k of ``inv(frame)``). Direction k gets ``nb_k``
   bins; since ``|r_j - r_i| >= |f_j - f_i|_k * h_k``, every pair within the cutoff lies within
   ``r_k = ceil(cutoff / (h_k / nb_k))`` bins along each direction. ``nb_k = floor(m_k h_k / cutoff)`` (bins at
   least cutoff/m_k wide, at least one bin), with the m_k in 1..4 that minimise a cost model (distance tests +
   COLUMN_COST x bin columns visited), the total capped at MAX_BINS_PER_ATOM bins per atom so memory stays O(N)
   for dilute or huge open systems. Along periodic directions a bin offset that leaves the cell maps to bin
   ``(b + d) mod nb_k`` of periodic image ``floor((b + d) / nb_k)`` -- when the cutoff exceeds the cell this walks
   through as many images as needed; along non-periodic directions offsets are clipped to the existing bins.
4. *Counting sort* of the atoms by bin (stable), then *extended columns*: every column of bins along direction 2 is
   copied with ``r_2`` extra bins on both sides holding the periodic images along direction 2 (positions shifted,
   image stored with the atom). The ``2 r_2 + 1`` bins around any atom are then one contiguous run, so an atom
   visits one run per column offset (d0, d1). Column offsets whose bins cannot hold a pair within the cutoff
   (exact minimum of the in-plane distance over the two bin ranges) are dropped once per structure.
5. *Rows.* Atoms are visited in bin order (neighbouring atoms share bins, so this is cache-friendly whatever the
   atom order). For atom ``i`` the runs are scanned branch-free (every candidate is written, the count advances only
   for hits); a hit is one int64 key ``j << (3 bits + 1) | F_0 | F_1 | F_2 | borderline`` with fields
   ``F_k = img_k - n_j,k + const`` (the neighbour's wrap is folded into the key when the extended columns are built;
   the images along directions 0, 1 are added per column). Since ``S = F - const + n_i``, key order within a row is
   (j, S) order: sorting the row's keys (bucket sort, a few ns per key) gives the documented ``(i, j, S)`` order
   without any global sort. Candidates within a relative 1e-8 of the cutoff are re-tested with the distance
   computed exactly as ASE does, ``|pos[j] - pos[i] + S @ cell|`` (symmetric in i, j to the last bit), so exact ties
   (lattice vectors equal to the cutoff) follow the input positions, not the wrapping, and agree with
   :class:`VerletNeighborList`'s filter.
6. *Output.* The sorted keys of each row are parked in the ``i`` output array, then decoded in atom order into
   ``j`` and ``S`` (no per-neighbour lookups), and ``i`` is filled last. The int64 outputs are sized from a density
   estimate (allocated by numpy for large systems: first-touch page faults are much cheaper than with Numba's
   allocator) and grow geometrically if short.

Cost: O(N) bins and candidates for a fixed density and cutoff, plus O(k) per row of k neighbours for the sort.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["neighbor_list", "batched_neighbor_list", "VerletNeighborList"]

LARGE_SYSTEM = 2000
"""From this many atoms per call, the output buffers are allocated by numpy from a pair-count estimate."""
COLUMN_COST = 5.0
"""Cost of visiting one column of bins, in units of one distance test (used to choose the bin grid)."""
MAX_BINS_PER_ATOM = 2.0
"""Cap on the number of bins per atom (keeps memory O(N) for dilute cells and large open systems)."""
MAX_IMAGE_BOXES = 50_000_000
"""Refuse searches that would visit more (bin offset) boxes per atom than this (cutoff absurdly large vs cell)."""

# Status codes returned by the kernels (0 = ok).
_OK, _NONFINITE_POSITIONS, _NONFINITE_CELL, _SINGULAR_CELL, _TOO_MANY_IMAGES, _KEY_OVERFLOW, _FAR_POSITIONS = range(7)
_SINGULAR_TOL = 1e-10  # |volume| / (product of periodic vector lengths) below this: singular


# ----------------------------------------------------------------------------------------------------------------
# Numba kernels
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True)
def _inverse3(m, inv):
    """Write the inverse of the 3x3 matrix ``m`` into ``inv`` (3,3); returns det(m) (inverse invalid if 0)."""
    inv[0, 0] = m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1]
    inv[0, 1] = m[0, 2] * m[2, 1] - m[0, 1] * m[2, 2]
    inv[0, 2] = m[0, 1] * m[1, 2] - m[0, 2] * m[1, 1]
    inv[1, 0] = m[1, 2] * m[2, 0] - m[1, 0] * m[2, 2]
    inv[1, 1] = m[0, 0] * m[2, 2] - m[0, 2] * m[2, 0]
    inv[1, 2] = m[0, 2] * m[1, 0] - m[0, 0] * m[1, 2]
    inv[2, 0] = m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]
    inv[2, 1] = m[0, 1] * m[2, 0] - m[0, 0] * m[2, 1]
    inv[2, 2] = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    det = m[0, 0] * inv[0, 0] + m[0, 1] * inv[1, 0] + m[0, 2] * inv[2, 0]
    if det != 0.0:
        for a in range(3):
            for b in range(3):
                inv[a, b] /= det
    return det


@njit(cache=True)
def _row_norm(m, k):
    """Euclidean norm of row k of a (3,3) matrix."""
    return math.sqrt(m[k, 0] * m[k, 0] + m[k, 1] * m[k, 1] + m[k, 2] * m[k, 2])


@njit(cache=True)
def _cross_into(m, a, b, k):
    """Row k of ``m`` := normalised cross product of rows a and b; returns the norm before normalising."""
    x = m[a, 1] * m[b, 2] - m[a, 2] * m[b, 1]
    y = m[a, 2] * m[b, 0] - m[a, 0] * m[b, 2]
    z = m[a, 0] * m[b, 1] - m[a, 1] * m[b, 0]
    norm = math.sqrt(x * x + y * y + z * z)
    if norm > 0.0:
        m[k, 0] = x / norm
        m[k, 1] = y / norm
        m[k, 2] = z / norm
    return norm


@njit(cache=True)
def _binning_frame(cell, pbc, frame):
    """Fill ``frame`` (3,3) with the binning frame of ``cell`` (3,3) / ``pbc`` (3,); returns a status code.

    Row k is ``cell[k]`` along periodic directions. Non-periodic rows are unit vectors orthogonal to the periodic
    rows and to each other, so only the periodic lattice vectors must be valid (finite, linearly independent).
    """
    n_per = 0
    for k in range(3):
        for c in range(3):
            frame[k, c] = 0.0
        if pbc[k]:
            n_per += 1
            for c in range(3):
                if not math.isfinite(cell[k, c]):
                    return _NONFINITE_CELL
                frame[k, c] = cell[k, c]
            if _row_norm(frame, k) == 0.0:
                return _SINGULAR_CELL
    if n_per == 0:
        for k in range(3):
            frame[k, k] = 1.0
    elif n_per == 1:
        p = 0 if pbc[0] else (1 if pbc[1] else 2)
        o1 = (p + 1) % 3
        o2 = (p + 2) % 3
        # helper axis least aligned with the periodic vector, then two cross products give an orthonormal pair
        ax = 0
        for c in range(1, 3):
            if abs(frame[p, c]) < abs(frame[p, ax]):
                ax = c
        frame[o2, ax] = 1.0
        _cross_into(frame, p, o2, o1)  # o1 := unit(a x e), orthogonal to a
        for c in range(3):
            frame[o2, c] = 0.0
        _cross_into(frame, p, o1, o2)  # o2 := unit(a x o1), orthogonal to a and o1
    elif n_per == 2:
        o = 0 if not pbc[0] else (1 if not pbc[1] else 2)
        a = (o + 1) % 3
        b = (o + 2) % 3
        if _cross_into(frame, a, b, o) <= _SINGULAR_TOL * _row_norm(frame, a) * _row_norm(frame, b):
            return _SINGULAR_CELL
    else:
        det = (frame[0, 0] * (frame[1, 1] * frame[2, 2] - frame[1, 2] * frame[2, 1])
               - frame[0, 1] * (frame[1, 0] * frame[2, 2] - frame[1, 2] * frame[2, 0])
               + frame[0, 2] * (frame[1, 0] * frame[2, 1] - frame[1, 1] * frame[2, 0]))
        lengths = 1.0
        for k in range(3):
            lengths *= _row_norm(frame, k)
        if abs(det) <= _SINGULAR_TOL * lengths:
            return _SINGULAR_CELL
    return _OK


@njit(cache=True)
def _reach(heights, pbc, cutoff, nb, reach):
    """Bins to search on either side, ``reach`` (3,): ceil(cutoff / bin width), at most nb - 1 when not periodic."""
    for k in range(3):
        reach[k] = 0
        if heights[k] > 0.0:  # (capped so that absurd cutoff / cell ratios give a clean error, not an overflow)
            reach[k] = np.int64(min(math.ceil(cutoff * nb[k] / heights[k]), 1e9))
        if not pbc[k]:
            reach[k] = min(reach[k], nb[k] - 1)


@njit(cache=True)
def _grid_cost(n_atoms, pbc, nb, reach):
    """Modelled work per atom of a bin grid: distance tests + COLUMN_COST x columns of bins visited."""
    n_bins = 1.0
    boxes = 1.0
    columns = 1.0
    for k in range(3):
        n_bins *= nb[k]
        offsets = 2 * reach[k] + 1 if pbc[k] else min(2 * reach[k] + 1, nb[k])
        boxes *= offsets
        if k < 2:
            columns *= offsets
    return n_atoms / n_bins * boxes + COLUMN_COST * columns


@njit(cache=True)
def _bin_grid(heights, pbc, cutoff, n_atoms, nb, reach):
    """Choose the bins per direction ``nb`` (3,) and search reach ``reach`` (3,) for region heights (3,) in Å.

    Candidate grids have bins of width >= cutoff / m_k along direction k, m_k in 1..3 (1..4 along direction 2, where
    finer bins are cheap because the columns are contiguous; reach ~ m_k). Among those with
    at most MAX_BINS_PER_ATOM bins per atom the one with the lowest :func:`_grid_cost` is taken. When none qualifies
    (dilute or very large open systems) the bin width is widened until the cap holds.
    """
    max_bins = max(MAX_BINS_PER_ATOM * n_atoms, 8.0)
    trial_nb = np.empty(3, np.int64)
    trial_reach = np.empty(3, np.int64)
    best = np.inf
    for code in range(36):
        total = 1.0
        for k in range(3):
            m = (code % 3 + 1) if k == 0 else ((code // 3) % 3 + 1 if k == 1 else code // 9 + 1)
            nb_k = min(max(math.floor(heights[k] * m / cutoff), 1.0), max_bins)
            trial_nb[k] = np.int64(nb_k)
            total *= nb_k
        if total > max_bins:
            continue
        _reach(heights, pbc, cutoff, trial_nb, trial_reach)
        cost = _grid_cost(n_atoms, pbc, trial_nb, trial_reach)
        if cost < best:
            best = cost
            for k in range(3):
                nb[k] = trial_nb[k]
                reach[k] = trial_reach[k]
    if best < np.inf:
        return
    width = cutoff
    while True:
        total = 1.0
        for k in range(3):
            nb_k = min(max(math.floor(heights[k] / width), 1.0), max_bins)
            nb[k] = np.int64(nb_k)
            total *= nb_k
        if total <= max_bins:
            break
        width *= max(1.05, (total / max_bins) ** (1.0 / 3.0))
    _reach(heights, pbc, cutoff, nb, reach)


@njit(cache=True)
def _fractional(pos, cell, pbc, frame, frac, wrap, wrapped):
    """Fractional coordinates in the binning frame, wrapped into [0, 1) along periodic directions.

    pos (n,3) Å in; frac (n,3) out: periodic directions wrapped, non-periodic ones rescaled to [0, 1] over the
    bounding box; wrap (n,3) int64 out: integer cells subtracted; wrapped (n,3) Å out: ``pos - wrap @ cell``.
    Returns (heights (3,) Å of the binned region along each direction, extent (3,) of the region in frame
    coordinates (1 along periodic directions, the bounding-box span in Å otherwise), det(frame), status).
    """
    n = pos.shape[0]
    inv = np.empty((3, 3))
    det = _inverse3(frame, inv)
    heights = np.empty(3)
    extent = np.empty(3)
    for k in range(3):
        extent[k] = 1.0
        heights[k] = 1.0 / math.sqrt(inv[0, k] * inv[0, k] + inv[1, k] * inv[1, k] + inv[2, k] * inv[2, k])
    lo = np.empty(3)
    hi = np.empty(3)
    for k in range(3):
        lo[k] = np.inf
        hi[k] = -np.inf
    for a in range(n):
        x = pos[a, 0]
        y = pos[a, 1]
        z = pos[a, 2]
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
            return heights, extent, det, _NONFINITE_POSITIONS
        for k in range(3):
            f = x * inv[0, k] + y * inv[1, k] + z * inv[2, k]
            if abs(f) > 1e12:
                return heights, extent, det, _FAR_POSITIONS
            if pbc[k]:
                fl = math.floor(f)
                wrap[a, k] = np.int64(fl)
                f -= fl
            else:
                wrap[a, k] = 0
                lo[k] = min(lo[k], f)
                hi[k] = max(hi[k], f)
            frac[a, k] = f
        for c in range(3):
            wrapped[a, c] = pos[a, c] - wrap[a, 0] * cell[0, c] - wrap[a, 1] * cell[1, c] - wrap[a, 2] * cell[2, c]
    for k in range(3):
        if not pbc[k]:
            span = hi[k] - lo[k]
            scale = 1.0 / span if span > 0.0 else 0.0
            for a in range(n):
                frac[a, k] = (frac[a, k] - lo[k]) * scale
            heights[k] *= span
            extent[k] = span
    return heights, extent, det, _OK


@njit(cache=True)
def _sort_into_bins(frac, wrapped, nb, atom_bin, bin_start, sorted_pos, sorted_idx):
    """Counting sort of the atoms by bin (stable).

    frac (n,3) in [0,1]; nb (3,) bins. Out: atom_bin (n,3) bin coordinates, bin_start (n_bins+1,) offsets (bins
    linear with direction 2 fastest), sorted_pos (n,3) wrapped positions in bin order, sorted_idx (n,) atom indices.
    """
    n = frac.shape[0]
    flat = np.empty(n, np.int64)
    for b in range(bin_start.shape[0]):
        bin_start[b] = 0
    for a in range(n):
        for k in range(3):
            c = np.int64(frac[a, k] * nb[k])
            atom_bin[a, k] = min(max(c, 0), nb[k] - 1)
        flat[a] = (atom_bin[a, 0] * nb[1] + atom_bin[a, 1]) * nb[2] + atom_bin[a, 2]
        bin_start[flat[a] + 1] += 1
    for b in range(bin_start.shape[0] - 1):
        bin_start[b + 1] += bin_start[b]
    fill = bin_start.copy()
    for a in range(n):
        slot = fill[flat[a]]
        fill[flat[a]] += 1
        sorted_idx[slot] = a
        for c in range(3):
            sorted_pos[slot, c] = wrapped[a, c]


@njit(cache=True)
def _image_tables(nb, reach, pbc):
    """Neighbour-bin lookup: for bin b + offset d (t = b + d + reach[k]) along direction k, the bin inside the cell
    ``tab_bin[k, t]`` and the periodic image ``tab_img[k, t]``. Returns (tab_bin, tab_img, largest |image|)."""
    width = 0
    for k in range(3):
        width = max(width, nb[k] + 2 * reach[k])
    tab_bin = np.zeros((3, width), np.int64)
    tab_img = np.zeros((3, width), np.int64)
    img_max = 0
    for k in range(3):
        for t in range(nb[k] + 2 * reach[k]):
            u = t - reach[k]
            if pbc[k]:
                q = u // nb[k]
                tab_bin[k, t] = u - q * nb[k]
                tab_img[k, t] = q
                img_max = max(img_max, abs(q))
            else:
                tab_bin[k, t] = u  # only used inside [0, nb)
    return tab_bin, tab_img, img_max


@njit(cache=True)
def _key_layout(img_max, wrap):
    """Field width ``bits`` and offset ``key_off`` of the pair keys for images up to ``img_max`` and wraps (n,3).

    A key stores, per direction k, ``F_k = image_k - wrap_j,k + key_off`` in ``bits`` bits; ``F_k`` lies in
    [0, 2 key_off]. For a row i, ``S_k = F_k - key_off + wrap_i,k``."""
    w_max = 0
    for a in range(wrap.shape[0]):
        for k in range(3):
            w_max = max(w_max, abs(wrap[a, k]))
    key_off = img_max + w_max
    bits = 1
    while (1 << bits) < 2 * key_off + 1:
        bits += 1
    return bits, key_off


@njit(cache=True)
def _pair_key(j, g0, g1, g2, w0, w1, w2, key_off, bits):
    """int64 key of neighbour j at image (g0, g1, g2) with wrap (w0, w1, w2) of j (see :func:`_key_layout`).

    ``j << (3 bits + 1) | F_0 << (2 bits + 1) | F_1 << (bits + 1) | F_2 << 1``; bit 0 is free for a flag. Within a
    row, key order is (j, S) order, and adding ``g << field`` to a key adds g to that image (no carries)."""
    return ((j << (3 * bits + 1)) | ((g0 - w0 + key_off) << (2 * bits + 1)) | ((g1 - w1 + key_off) << (bits + 1))
            | ((g2 - w2 + key_off) << 1))


@njit(cache=True)
def _extend_columns(nb, reach, pbc, cell, bin_start, sorted_pos, sorted_idx, tab_bin, tab_img, wrap, key_off, bits):
    """Bin columns along direction 2 extended by ``reach[2]`` bins on both sides with periodic images.

    Column (m0, m1) gets ``nb[2] + 2 reach[2]`` slots; slot t holds the atoms of bin ``t - reach[2]`` (wrapped, the
    positions shifted by the image along direction 2; empty outside the cell when not periodic). Then the bins
    b2 - reach .. b2 + reach around any atom are one contiguous run. Returns (ext_start (n_slots+1,),
    ext_pos (n_ext,3) Å, ext_key (n_ext,) int64): the pair key of atom j seen at image (0, 0, g2), see
    :func:`_pair_key`.
    """
    slots = nb[2] + 2 * reach[2]
    n_cols = nb[0] * nb[1]
    ext_start = np.zeros(n_cols * slots + 1, np.int64)
    for col in range(n_cols):
        for t in range(slots):
            u = t - reach[2]
            if pbc[2] or (0 <= u < nb[2]):
                b = col * nb[2] + tab_bin[2, t]
                ext_start[col * slots + t + 1] = bin_start[b + 1] - bin_start[b]
    for e in range(n_cols * slots):
        ext_start[e + 1] += ext_start[e]
    n_ext = ext_start[n_cols * slots]
    ext_pos = np.empty((n_ext, 3))
    ext_key = np.empty(n_ext, np.int64)
    zero = np.int64(0)  # (a variable, not a literal: one compiled _pair_key)
    for col in range(n_cols):
        for t in range(slots):
            e = ext_start[col * slots + t]
            if ext_start[col * slots + t + 1] == e:
                continue
            g2 = tab_img[2, t]
            b = col * nb[2] + tab_bin[2, t]
            for s in range(bin_start[b], bin_start[b + 1]):
                j = sorted_idx[s]
                for c in range(3):
                    ext_pos[e, c] = sorted_pos[s, c] + g2 * cell[2, c]
                ext_key[e] = _pair_key(j, zero, zero, g2, wrap[j, 0], wrap[j, 1], wrap[j, 2], key_off, bits)
                e += 1
    return ext_start, ext_pos, ext_key


@njit(cache=True)
def _edge_min(a, b, c, x, y_lo, y_hi):
    """min over y in [y_lo, y_hi] of a x^2 + 2 b x y + c y^2 (c >= 0)."""
    y = y_lo
    if c > 0.0:
        y = min(max(-b * x / c, y_lo), y_hi)
    elif b * x < 0.0:
        y = y_hi
    return a * x * x + 2.0 * b * x * y + c * y * y


@njit(cache=True)
def _active_columns(frame, extent, nb, reach, pbc, cutoff):
    """Column offsets (d0, d1) that can hold a neighbour: (n_cols,) int64 arrays d0, d1.

    For bin offsets d0, d1 the pair displacement is x u + y v + z frame[2] with x in [d0-1, d0+1], y in [d1-1, d1+1]
    (in bins) and u, v the bin edge vectors. Its length is at least the distance of x u' + y v' to the origin, with u',
    v' the parts of u, v orthogonal to frame[2]; columns where the minimum of that quadratic over the box reaches the
    cutoff are dropped.
    """
    # quadratic form a x^2 + 2 b x y + c y^2 of the in-plane displacement (Gram matrix of u', v')
    n2 = math.sqrt(frame[2, 0] ** 2 + frame[2, 1] ** 2 + frame[2, 2] ** 2)
    su = extent[0] / nb[0]
    sv = extent[1] / nb[1]
    uu = 0.0
    uv = 0.0
    vv = 0.0
    ue = 0.0
    ve = 0.0
    for k in range(3):
        e = frame[2, k] / n2
        uu += frame[0, k] * frame[0, k]
        uv += frame[0, k] * frame[1, k]
        vv += frame[1, k] * frame[1, k]
        ue += frame[0, k] * e
        ve += frame[1, k] * e
    a = (uu - ue * ue) * su * su
    b = (uv - ue * ve) * su * sv
    c = (vv - ve * ve) * sv * sv
    limit = cutoff * cutoff * (1.0 + 1e-8)
    n_max = (2 * reach[0] + 1) * (2 * reach[1] + 1)
    d0s = np.empty(n_max, np.int64)
    d1s = np.empty(n_max, np.int64)
    n_cols = 0
    for d0 in range(-reach[0], reach[0] + 1):
        for d1 in range(-reach[1], reach[1] + 1):
            x_lo, x_hi, y_lo, y_hi = d0 - 1.0, d0 + 1.0, d1 - 1.0, d1 + 1.0
            if x_lo <= 0.0 <= x_hi and y_lo <= 0.0 <= y_hi:
                q = 0.0
            else:
                q = min(min(_edge_min(a, b, c, x_lo, y_lo, y_hi), _edge_min(a, b, c, x_hi, y_lo, y_hi)),
                        min(_edge_min(c, b, a, y_lo, x_lo, x_hi), _edge_min(c, b, a, y_hi, x_lo, x_hi)))
            if q < limit:
                d0s[n_cols] = d0
                d1s[n_cols] = d1
                n_cols += 1
    return d0s[:n_cols], d1s[:n_cols]


@njit(cache=True)
def _insertion_sort(keys, lo, hi):
    """Sort ``keys[lo:hi]`` (int64) in place."""
    for a in range(lo + 1, hi):
        key = keys[a]
        b = a - 1
        while b >= lo and keys[b] > key:
            keys[b + 1] = keys[b]
            b -= 1
        keys[b + 1] = key


@njit(cache=True)
def _sort_keys(keys, n, scratch):
    """Sort ``keys[:n]`` (int64, >= 0) in place: insertion sort of runs of 16, then bottom-up merges through ``scratch``
    (>= n). Merges are branch-free (the comparison result is used arithmetically) and skipped for runs already in
    order, so rows that arrive nearly sorted (spatially ordered atoms) cost little."""
    run = 16
    for lo in range(0, n, run):
        _insertion_sort(keys, lo, min(lo + run, n))
    src = keys
    dst = scratch
    width = run
    big = np.iinfo(np.int64).max
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            if mid == hi or src[mid - 1] <= src[mid]:
                for out in range(lo, hi):
                    dst[out] = src[out]
                continue
            a = lo
            b = mid
            for out in range(lo, hi):
                va = src[a] if a < mid else big
                vb = src[b] if b < hi else big
                take_a = np.int64(va <= vb)
                dst[out] = min(va, vb)
                a += take_a
                b += 1 - take_a
        src, dst = dst, src
        width *= 2
    if src is not keys:
        for a in range(n):
            keys[a] = src[a]


@njit(cache=True)
def _sort_row(keys, n, scratch, counts, bucket):
    """Sort ``keys[:n]`` (int64) in place by bucket sort: 4n equal-width buckets over [min, max] (a monotone map, so
    the buckets are ordered), a stable counting scatter into ``scratch``, then one insertion pass that only reorders
    within buckets. Neighbour rows are far from sorted even for spatially ordered atoms, and random for shuffled ones;
    this costs a few ns per key either way. Rows with a crowded bucket fall back to :func:`_sort_keys`.

    scratch, bucket (>= n,) int64 and counts (>= 4n + 1,) int64 are work arrays.
    """
    ordered = True
    for a in range(1, n):
        if keys[a - 1] > keys[a]:
            ordered = False
            break
    if ordered:  # e.g. a single bin: candidates arrive in index order
        return
    if n <= 16:
        _sort_keys(keys, n, scratch)
        return
    k_min = keys[0]
    k_max = keys[0]
    for a in range(1, n):
        k_min = min(k_min, keys[a])
        k_max = max(k_max, keys[a])
    n_buckets = 4 * n
    scale = n_buckets / (float(k_max - k_min) + 1.0)
    for b in range(n_buckets + 1):
        counts[b] = 0
    for a in range(n):
        b = min(np.int64((keys[a] - k_min) * scale), n_buckets - 1)
        bucket[a] = b
        counts[b + 1] += 1
    largest = 0
    for b in range(n_buckets):
        largest = max(largest, counts[b + 1])
        counts[b + 1] += counts[b]
    if largest > 32:
        _sort_keys(keys, n, scratch)
        return
    for a in range(n):
        b = bucket[a]
        scratch[counts[b]] = keys[a]
        counts[b] += 1
    keys[0] = scratch[0]
    for a in range(1, n):
        key = scratch[a]
        b = a - 1
        while b >= 0 and keys[b] > key:
            keys[b + 1] = keys[b]
            b -= 1
        keys[b + 1] = key


@njit(cache=True)
def _grow(arr, new_len, n_used):
    """New int64 array like ``arr`` ((n,) or (n, 3)) with ``new_len`` rows; its first ``n_used`` rows copied."""
    out = np.empty((new_len,) + arr.shape[1:], np.int64)
    flat_in = arr.reshape(-1)
    flat_out = out.reshape(-1)
    for a in range(n_used * (flat_in.shape[0] // max(arr.shape[0], 1))):
        flat_out[a] = flat_in[a]
    return out


@njit(cache=True)
def _row_keys(xi, yi, zi, b0, b1, b2, cell, pbc, nb, reach, col_d0, col_d1, tab_bin, tab_img, bits,
              ext_start, ext_pos, ext_key, rc2_lo, rc2_hi, keys):
    """Neighbours of one atom (wrapped position xi, yi, zi Å; bin coordinates b0, b1, b2) as pair keys
    (:func:`_pair_key`) plus a borderline flag in bit 0, written to ``keys``.

    For every active column offset (d0, d1) the bins b2 - reach .. b2 + reach of the extended column are one
    contiguous run of candidates. Hits have squared distance < rc2_hi; ``borderline`` (bit 0) marks those >= rc2_lo,
    to be re-tested exactly by the caller. The hit test is branch-free: every candidate is written and the count
    advances only for hits. The self pair (j = i, image 0) is included. Returns the number of keys, or -1 when
    ``keys`` is too short (the caller grows it and calls again; no allocation here keeps the loop tight).
    """
    count = 0
    slots = nb[2] + 2 * reach[2]
    run = 2 * reach[2] + 1
    for c in range(col_d0.shape[0]):
        u0 = b0 + col_d0[c]
        u1 = b1 + col_d1[c]
        if not pbc[0] and (u0 < 0 or u0 >= nb[0]):
            continue
        if not pbc[1] and (u1 < 0 or u1 >= nb[1]):
            continue
        t0 = u0 + reach[0]
        t1 = u1 + reach[1]
        base = (tab_bin[0, t0] * nb[1] + tab_bin[1, t1]) * slots + b2
        start = ext_start[base]
        stop = ext_start[base + run]
        if start == stop:
            continue
        if count + (stop - start) > keys.shape[0]:
            return -1
        g0 = tab_img[0, t0]
        g1 = tab_img[1, t1]
        # q = p_i - image @ cell, so that the pair vector is p_j(ext) - q
        qx = xi - g0 * cell[0, 0] - g1 * cell[1, 0]
        qy = yi - g0 * cell[0, 1] - g1 * cell[1, 1]
        qz = zi - g0 * cell[0, 2] - g1 * cell[1, 2]
        code = (g0 << (2 * bits + 1)) + (g1 << (bits + 1))  # adds the images along 0, 1 to the key's fields
        for s in range(start, stop):
            ex = ext_pos[s, 0] - qx
            ey = ext_pos[s, 1] - qy
            ez = ext_pos[s, 2] - qz
            d2 = ex * ex + ey * ey + ez * ez
            keys[count] = ext_key[s] + code + np.int64(d2 >= rc2_lo)
            count += np.int64(d2 < rc2_hi)
    return count


@njit(cache=True)
def _within(pos, cell, i, j, s0, s1, s2, cutoff):
    """Exact test ``|pos[j] - pos[i] + (s0, s1, s2) @ cell| < cutoff`` (pos (n,3), cell (3,3), Å)."""
    d2 = 0.0
    for c in range(3):
        d = (pos[j, c] - pos[i, c]) + (s0 * cell[0, c] + s1 * cell[1, c] + s2 * cell[2, c])
        d2 += d * d
    return math.sqrt(d2) < cutoff


@njit(cache=True)
def _ensure_capacity(out_i, out_j, out_s, n_out, extra):
    """The output arrays, reallocated (doubling) when fewer than ``extra`` rows are free after ``n_out``."""
    if n_out + extra > out_j.shape[0]:
        cap = max(n_out + extra, 2 * out_j.shape[0])
        out_i = _grow(out_i, cap, n_out)
        out_j = _grow(out_j, cap, n_out)
        out_s = _grow(out_s, cap, n_out)
    return out_i, out_j, out_s


@njit(cache=True)
def _filter_row(i, keys, count, self_key, wrap, key_off, bits, pos, cell, cutoff, dest, start):
    """Copy the sorted keys of row i to ``dest[start:]``, without ``self_key`` (or -1) and without borderline keys
    (bit 0) that :func:`_within` rejects; the flag bit is cleared. Returns the number of keys kept."""
    mask = (1 << bits) - 1
    shift = 3 * bits + 1
    kept = start
    for c in range(count):
        key = keys[c]
        if key == self_key:
            continue
        if key & 1:
            j = key >> shift
            s0 = ((key >> (2 * bits + 1)) & mask) - key_off + wrap[i, 0]
            s1 = ((key >> (bits + 1)) & mask) - key_off + wrap[i, 1]
            s2 = ((key >> 1) & mask) - key_off + wrap[i, 2]
            if not _within(pos, cell, i, j, s0, s1, s2, cutoff):
                continue
            key -= 1
        dest[kept] = key
        kept += 1
    return kept - start


@njit(cache=True)
def _decode_rows(row_start, row_len, wrap, key_off, bits, offset, out_i, out_j, out_s, n_out):
    """Write the rows, in atom order, from their keys stored in ``out_i`` (row i at ``row_start[i]``, ``row_len[i]``
    keys) to out_j (+ offset) and out_s from index n_out, then fill out_i. ``S_k = F_k - key_off + wrap_i,k``.
    Returns the new n_out."""
    mask = (1 << bits) - 1
    shift = 3 * bits + 1
    p = n_out
    for i in range(row_start.shape[0]):
        w0 = wrap[i, 0] - key_off
        w1 = wrap[i, 1] - key_off
        w2 = wrap[i, 2] - key_off
        for c in range(row_start[i], row_start[i] + row_len[i]):
            key = out_i[c]
            out_j[p] = (key >> shift) + offset
            out_s[p, 0] = ((key >> (2 * bits + 1)) & mask) + w0
            out_s[p, 1] = ((key >> (bits + 1)) & mask) + w1
            out_s[p, 2] = ((key >> 1) & mask) + w2
            p += 1
    p = n_out
    for i in range(row_start.shape[0]):
        for c in range(row_len[i]):
            out_i[p] = i + offset
            p += 1
    return p


@njit(cache=True)
def _structure_pairs(pos, cell, pbc, cutoff, self_interaction, offset, out_i, out_j, out_s, n_out):
    """Append the pairs of one structure to the output arrays.

    pos (n,3) Å, cell (3,3) Å (rows = lattice vectors), pbc (3,) bool, cutoff Å; ``offset`` is added to the atom
    indices. out_i, out_j (cap,) and out_s (cap,3) int64 hold ``n_out`` pairs already. Returns the (possibly
    reallocated) output arrays, the new pair count and a status code.
    """
    n = pos.shape[0]
    if n == 0:
        return out_i, out_j, out_s, n_out, _OK
    frame = np.empty((3, 3))
    status = _binning_frame(cell, pbc, frame)
    if status != _OK:
        return out_i, out_j, out_s, n_out, status
    frac = np.empty((n, 3))
    wrap = np.empty((n, 3), np.int64)
    wrapped = np.empty((n, 3))
    heights, extent, det, status = _fractional(pos, cell, pbc, frame, frac, wrap, wrapped)
    if status != _OK:
        return out_i, out_j, out_s, n_out, status

    nb = np.empty(3, np.int64)
    reach = np.empty(3, np.int64)
    _bin_grid(heights, pbc, cutoff, n, nb, reach)
    if (2.0 * reach[0] + 1.0) * (2.0 * reach[1] + 1.0) * (2.0 * reach[2] + 1.0) > MAX_IMAGE_BOXES:
        return out_i, out_j, out_s, n_out, _TOO_MANY_IMAGES
    tab_bin, tab_img, img_max = _image_tables(nb, reach, pbc)
    bits, key_off = _key_layout(img_max, wrap)
    if n >= (1 << max(61 - 3 * bits, 0)):
        return out_i, out_j, out_s, n_out, _KEY_OVERFLOW

    atom_bin = np.empty((n, 3), np.int64)
    bin_start = np.empty(nb[0] * nb[1] * nb[2] + 1, np.int64)
    sorted_pos = np.empty((n, 3))
    sorted_idx = np.empty(n, np.int64)
    _sort_into_bins(frac, wrapped, nb, atom_bin, bin_start, sorted_pos, sorted_idx)
    ext_start, ext_pos, ext_key = _extend_columns(nb, reach, pbc, cell, bin_start, sorted_pos, sorted_idx, tab_bin,
                                                  tab_img, wrap, key_off, bits)
    col_d0, col_d1 = _active_columns(frame, extent, nb, reach, pbc, cutoff)

    # expected number of pairs (bulk estimate), to size the output once
    if pbc[0] and pbc[1] and pbc[2]:
        expect = np.int64(1.15 * n * n / abs(det) * 4.1888 * cutoff ** 3) + n
    else:
        expect = 16 * n
    out_i, out_j, out_s = _ensure_capacity(out_i, out_j, out_s, n_out, expect)

    # candidates within a relative 1e-8 of the cutoff are re-tested with the distance computed from the input
    # positions exactly as |pos[j] - pos[i] + S @ cell| (as ASE does), so ties do not depend on the wrapping
    rc2_lo = cutoff * cutoff * (1.0 - 1e-8)
    rc2_hi = cutoff * cutoff * (1.0 + 1e-8)
    keys = np.empty(max(256, 4 * expect // n), np.int64)
    scratch = np.empty(keys.shape[0], np.int64)
    bucket = np.empty(keys.shape[0], np.int64)
    counts = np.empty(4 * keys.shape[0] + 1, np.int64)
    zero = np.int64(0)
    # rows are searched in bin order (neighbouring atoms share bins: cache-friendly whatever the atom order); their
    # sorted keys are parked in out_i, then decoded in atom order into out_j / out_s, and out_i is filled last
    row_start = np.empty(n, np.int64)
    row_len = np.empty(n, np.int64)
    t = n_out
    for s in range(n):
        i = sorted_idx[s]
        while True:
            count = _row_keys(wrapped[i, 0], wrapped[i, 1], wrapped[i, 2], atom_bin[i, 0], atom_bin[i, 1],
                              atom_bin[i, 2], cell, pbc, nb, reach, col_d0, col_d1, tab_bin, tab_img, bits,
                              ext_start, ext_pos, ext_key, rc2_lo, rc2_hi, keys)
            if count >= 0:
                break
            keys = np.empty(2 * keys.shape[0], np.int64)
            scratch = np.empty(keys.shape[0], np.int64)
            bucket = np.empty(keys.shape[0], np.int64)
            counts = np.empty(4 * keys.shape[0] + 1, np.int64)
        _sort_row(keys, count, scratch, counts, bucket)
        out_i, out_j, out_s = _ensure_capacity(out_i, out_j, out_s, t, count)
        self_key = -1 if self_interaction else _pair_key(i, zero, zero, zero, wrap[i, 0], wrap[i, 1], wrap[i, 2],
                                                         key_off, bits)
        row_start[i] = t
        row_len[i] = _filter_row(i, keys, count, self_key, wrap, key_off, bits, pos, cell, cutoff, out_i, t)
        t += row_len[i]
    n_out = _decode_rows(row_start, row_len, wrap, key_off, bits, offset, out_i, out_j, out_s, n_out)
    return out_i, out_j, out_s, n_out, _OK


@njit(cache=True)
def _batched_pairs(positions, cells, pbcs, ptr, cutoff, self_interaction, out_i, out_j, out_s):
    """Pairs of all structures: positions (N,3), cells (B,3,3), pbcs (B,3) bool, ptr (B+1,) int64 atom offsets.

    out_i, out_j (cap,) and out_s (cap, 3) int64 are the initial output buffers (any capacity, grown when needed).
    Returns global out_i, out_j (n_pairs,), out_s (n_pairs,3) (views of the buffers), counts (B,) pairs per
    structure, status code and the index of the failing structure (-1 when ok).
    """
    n_struct = ptr.shape[0] - 1
    counts = np.zeros(n_struct, np.int64)
    n_out = ptr[0]  # == 0; not a literal, so the callee is compiled once
    for b in range(n_struct):
        before = n_out
        out_i, out_j, out_s, n_out, status = _structure_pairs(
            positions[ptr[b]:ptr[b + 1]], cells[b], pbcs[b], cutoff, self_interaction, ptr[b],
            out_i, out_j, out_s, n_out)
        if status != _OK:
            return out_i[:0], out_j[:0], out_s[:0], counts, status, b
        counts[b] = n_out - before
    return out_i[:n_out], out_j[:n_out], out_s[:n_out], counts, _OK, -1


@njit(cache=True)
def _filter_pairs(positions, cell, i, j, s, cutoff, out_i, out_j, out_s):
    """Copy the pairs (i, j, s) with |positions[j] + s @ cell - positions[i]| < cutoff to out_i, out_j (>= n,) and
    out_s (>= n, 3), keeping their order; returns how many. Same test as the borderline re-test of the cell list, so
    a Verlet list agrees with a fresh list even for exact ties."""
    q = 0
    for p in range(i.shape[0]):
        if _within(positions, cell, i[p], j[p], s[p, 0], s[p, 1], s[p, 2], cutoff):
            out_i[q] = i[p]
            out_j[q] = j[p]
            for c in range(3):
                out_s[q, c] = s[p, c]
            q += 1
    return q


@njit(cache=True)
def _max_displacement2(positions, reference):
    """Largest squared displacement between positions (n,3) and reference (n,3)."""
    best = 0.0
    for a in range(positions.shape[0]):
        d2 = 0.0
        for c in range(3):
            d = positions[a, c] - reference[a, c]
            d2 += d * d
        best = max(best, d2)
    return best


# ----------------------------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------------------------

_MESSAGES = {
    _NONFINITE_POSITIONS: "positions contain NaN or inf",
    _NONFINITE_CELL: "cell contains NaN or inf along a periodic direction",
    _SINGULAR_CELL: "cell is singular (zero volume) along its periodic directions",
    _TOO_MANY_IMAGES: "cutoff is absurdly large compared with the cell (too many periodic images)",
    _KEY_OVERFLOW: "too many atoms, periodic images or cells between atoms for the int64 pair keys (wrap the "
                   "positions into the cell)",
    _FAR_POSITIONS: "positions are more than 1e12 cells (or Å along open directions) away from the cell",
}


def _check_cutoff(cutoff) -> float:
    cutoff = float(cutoff)
    if not (math.isfinite(cutoff) and cutoff > 0.0):
        raise ValueError(f"cutoff must be a finite number > 0, got {cutoff}")
    return cutoff


def _writable(a: np.ndarray) -> np.ndarray:
    """``a`` itself, or a copy when it is read-only (one compiled kernel signature instead of two)."""
    return a if a.flags.writeable else a.copy()


def _as_positions(positions) -> np.ndarray:
    positions = _writable(np.ascontiguousarray(positions, dtype=np.float64))
    if positions.ndim != 2 or positions.shape[1] != 3:
        if positions.size == 0:
            return np.zeros((0, 3))
        raise ValueError(f"positions must have shape (n_atoms, 3), got {positions.shape}")
    return positions


def _as_pbc(pbc, n_struct=None) -> np.ndarray:
    if n_struct is None and isinstance(pbc, np.ndarray) and pbc.dtype == np.bool_ and pbc.shape == (3,):
        return _writable(np.ascontiguousarray(pbc))  # fast path (ASE's atoms.pbc)
    pbc = np.asarray(pbc)
    if pbc.dtype != np.bool_:
        if not np.isin(pbc, (0, 1)).all():
            raise ValueError(f"pbc must be booleans, got {pbc}")
        pbc = pbc.astype(np.bool_)
    if n_struct is None:
        if pbc.shape == ():
            return np.full(3, bool(pbc))
        if pbc.shape != (3,):
            raise ValueError(f"pbc must be a bool or have shape (3,), got shape {pbc.shape}")
        return _writable(np.ascontiguousarray(pbc))
    if pbc.shape == () or pbc.shape == (3,):
        return np.array(np.broadcast_to(pbc, (n_struct, 3)))
    if pbc.shape != (n_struct, 3):
        raise ValueError(f"pbc must have shape (3,) or ({n_struct}, 3), got {pbc.shape}")
    return _writable(np.ascontiguousarray(pbc))


_EMPTY_OUT = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 3), np.int64))


def _output_buffers(cells, pbc, ptr, cutoff):
    """Initial output buffers (out_i, out_j, out_s) for the kernel, allocated by numpy for large systems.

    First-touch page faults of numpy allocations are several times cheaper than those of Numba's allocator for
    buffers of tens of MB, so large outputs are sized here from an estimate (the kernel grows them if it is short;
    untouched capacity costs only address space). Small systems return empty buffers that the kernel grows.
    """
    if ptr[-1] < LARGE_SYSTEM:
        return _EMPTY_OUT
    n_atoms = np.diff(ptr)
    volume = np.abs(np.linalg.det(cells))
    periodic = pbc.all(axis=1) & (volume > 0)
    density = np.where(periodic, n_atoms / np.where(periodic, volume, 1.0), 0.15)  # 0.15 / Å^3: dense solid
    sphere = 4.0 / 3.0 * np.pi * cutoff ** 3
    # (at least the kernel's own estimate, 1.15 n^2 / V * sphere + n, so that it does not reallocate)
    cap = int(np.sum(np.minimum(1.2 * n_atoms * density * sphere, n_atoms * np.maximum(n_atoms - 1, 0) * np.where(
        periodic, np.inf, 1.0)) + n_atoms) + 1024)
    return np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty((cap, 3), np.int64)


def _raise(status, structure=None):
    where = "" if structure is None else f" (structure {structure})"
    raise ValueError(_MESSAGES[status] + where)


def neighbor_list(positions, cell, pbc, cutoff, self_interaction=False):
    """Full neighbour list of one structure.

    Parameters
    ----------
    positions : (n_atoms, 3) float, Å. Atoms may lie outside the cell.
    cell : (3, 3) float, Å, rows = lattice vectors. Only the periodic rows are used (non-periodic rows may be zero).
    pbc : bool or (3,) bool, periodicity along each lattice vector.
    cutoff : float, Å; pairs with distance strictly below it.
    self_interaction : include the pair (i, i, S=0).

    Returns
    -------
    i, j : (n_pairs,) int64 and S : (n_pairs, 3) int64 with ``|positions[j] + S @ cell - positions[i]| < cutoff``,
    both directions, sorted by (i, j, S) lexicographically (identical to ASE ``neighbor_list("ijS")`` as a set).
    """
    positions = _as_positions(positions)
    cell = _writable(np.ascontiguousarray(cell, dtype=np.float64))
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
    pbc = _as_pbc(pbc)
    cutoff = _check_cutoff(cutoff)
    ptr = np.array([0, positions.shape[0]], np.int64)
    cells, pbcs = cell[None], pbc[None]
    i, j, S, _, status, _ = _batched_pairs(positions, cells, pbcs, ptr, cutoff, bool(self_interaction),
                                           *_output_buffers(cells, pbcs, ptr, cutoff))
    if status:
        _raise(status)
    return i, j, S


def batched_neighbor_list(positions, cells, pbc, ptr=None, cutoff=None, self_interaction=False):
    """Neighbour lists of many structures in one Numba call (no per-structure Python overhead).

    Parameters
    ----------
    positions : (N_total, 3) float, Å: the structures' atoms concatenated; or a sequence of (n_b, 3) arrays, in which
        case ``ptr`` must be None and is built from their lengths.
    cells : (B, 3, 3) float, Å, rows = lattice vectors.
    pbc : (B, 3) bool, or (3,) / bool shared by all structures.
    ptr : (B + 1,) int, atom offsets: structure b owns atoms ``ptr[b]:ptr[b+1]`` (``ptr[0] == 0``, non-decreasing).
    cutoff : float, Å.
    self_interaction : include (i, i, S=0).

    Returns
    -------
    i, j : (n_pairs,) int64 *global* atom indices (already offset by ``ptr``); S : (n_pairs, 3) int64 shifts in units
    of the structure's own cell; counts : (B,) int64 pairs per structure. The pairs of structure b are the contiguous
    block ``[cumsum(counts)[b-1], cumsum(counts)[b])``, each block equal to ``neighbor_list`` of that structure, so the
    whole list is sorted by (i, j, S). The structure of each pair is ``np.repeat(np.arange(B), counts)``.
    """
    if cutoff is None:
        raise TypeError("batched_neighbor_list() needs a cutoff")
    if ptr is None:
        blocks = [_as_positions(p) for p in positions]
        ptr = np.zeros(len(blocks) + 1, np.int64)
        ptr[1:] = np.cumsum([len(p) for p in blocks])
        positions = np.concatenate(blocks) if blocks else np.zeros((0, 3))
    positions = _as_positions(positions)
    ptr = _writable(np.ascontiguousarray(ptr, dtype=np.int64))
    if ptr.ndim != 1 or len(ptr) < 1 or ptr[0] != 0 or ptr[-1] != len(positions) or (np.diff(ptr) < 0).any():
        raise ValueError(f"ptr must be non-decreasing offsets from 0 to n_atoms={len(positions)}, got {ptr}")
    n_struct = len(ptr) - 1
    cells = _writable(np.ascontiguousarray(cells, dtype=np.float64))
    if cells.shape != (n_struct, 3, 3):
        raise ValueError(f"cells must have shape ({n_struct}, 3, 3), got {cells.shape}")
    pbc = _as_pbc(pbc, n_struct)
    cutoff = _check_cutoff(cutoff)
    i, j, S, counts, status, where = _batched_pairs(positions, cells, pbc, ptr, cutoff, bool(self_interaction),
                                                    *_output_buffers(cells, pbc, ptr, cutoff))
    if status:
        _raise(status, where)
    return i, j, S, counts


class VerletNeighborList:
    """Neighbour list with a Verlet skin, for MD and relaxations.

    ``update(positions, cell, pbc)`` returns exactly the pairs closer than ``cutoff`` (same format and order as
    :func:`neighbor_list`). The underlying cell list is built with ``cutoff + skin`` and rebuilt only when an atom moved
    more than ``skin / 2`` since the last build (then no pair can have crossed into the cutoff unseen), or the cell,
    pbc or number of atoms changed. Wrapping atoms back into the cell counts as a large move (rebuild), so the
    returned shifts always refer to the positions passed in. ``n_builds`` counts the builds.
    """

    def __init__(self, cutoff: float, skin: float = 0.0):
        self.cutoff = _check_cutoff(cutoff)
        self.skin = float(skin)
        if not (math.isfinite(self.skin) and self.skin >= 0.0):
            raise ValueError(f"skin must be a finite number >= 0, got {skin}")
        self.n_builds = 0
        self._ref = None
        self._pairs = None

    def _needs_rebuild(self, positions, cell, pbc) -> bool:
        if self._ref is None:
            return True
        ref_pos, ref_cell, ref_pbc = self._ref
        if ref_pos.shape != positions.shape or not np.array_equal(ref_cell, cell) or not np.array_equal(ref_pbc, pbc):
            return True
        if self.skin <= 0:
            return True
        return _max_displacement2(positions, ref_pos) > (0.5 * self.skin) ** 2

    def update(self, positions, cell, pbc):
        """Pairs (i, j, S) within ``cutoff`` for positions (n,3) Å, cell (3,3) Å, pbc (3,) bool."""
        positions = _as_positions(positions)
        cell = _writable(np.ascontiguousarray(cell, dtype=np.float64))
        pbc = _as_pbc(pbc)
        if self._needs_rebuild(positions, cell, pbc):
            self._pairs = neighbor_list(positions, cell, pbc, self.cutoff + self.skin)
            self._ref = (positions.copy(), cell.copy(), pbc.copy())
            self.n_builds += 1
        i, j, S = self._pairs
        if self.skin <= 0:
            return i, j, S
        out_i, out_j, out_s = np.empty_like(i), np.empty_like(j), np.empty_like(S)  # numpy: cheap page faults
        n = _filter_pairs(positions, cell, i, j, S, self.cutoff, out_i, out_j, out_s)
        return out_i[:n], out_j[:n], out_s[:n]
