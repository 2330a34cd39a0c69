"""The matkit HDF5 frames schema (version 1) and the in-memory :class:`Frame`.

One HDF5 file holds any number of frames (structures) of any size. Per-atom arrays of all frames are
concatenated along their first axis; per-frame arrays have one row per frame; frame ``f`` owns the atoms
``offsets[f] : offsets[f] + n_atoms[f]``.

Layout::

    /                                   file attributes (see below)
    /atoms/positions        (N, 3)  float64   Cartesian positions, Å
    /atoms/atomic_numbers   (N,)    int32     1..118
    /atoms/forces           (N, 3)  float64   eV/Å (NaN where the frame has no forces)
    /atoms/properties/<name> (N, ...) float64 optional extra per-atom labels (e.g. magmom), NaN = missing
    /frames/offsets         (F,)    int64     index of the frame's first atom in /atoms/*
    /frames/n_atoms         (F,)    int64
    /frames/cell            (F, 3, 3) float64 lattice vectors as rows, Å (as given by the source, also for pbc=False)
    /frames/pbc             (F, 3)  bool
    /frames/energy          (F,)    float64   total energy, eV (NaN = missing)
    /frames/stress          (F, 6)  float64   eV/Å^3, ASE Voigt order xx, yy, zz, yz, xz, xy, tensile positive
    /frames/has_energy, has_forces, has_stress  (F,) bool   label presence flags (False <=> the value is NaN)
    /frames/properties/<name> (F,)  float64   optional extra per-frame labels (formation_energy_per_atom,
                                              e_above_hull, corrected_total_energy, ...), NaN = missing
    /frames/ids, /frames/groups, /frames/sources  (F,) variable-length UTF-8 strings ('' = none)

N = ``attrs["n_atoms_total"]`` and F = ``attrs["n_frames"]`` are the *committed* sizes: readers use them, never
the dataset lengths. A writer appends rows first and updates these two attributes last, so a failed append leaves
the committed frames untouched (and the writer shrinks the datasets back).

File attributes: ``schema`` = "matkit-frames", ``schema_version`` = 1, ``n_frames``, ``n_atoms_total``,
``units`` (JSON: length Å, energy eV, forces eV/Å, stress eV/Å^3 + sign/order), ``stress_convention``,
``provenance`` (JSON list, one entry per conversion/append: input, format, options, frame range, date),
``license``, ``content_sha256`` (see :func:`matkit.data.hdf5.content_hash`), ``created_with`` (matkit version).

Datasets are chunked and compressed (gzip by default, lzf or none on request) and resizable (appendable).

Validation on write (:func:`validate_frame`): shapes, dtypes, finite values (a NaN label is an error: pass
``None`` for a missing label), atomic numbers in 1..118, non-degenerate periodic cells, and unit plausibility
(stress larger than 5 eV/Å^3 = 801 GPa is almost certainly kBar or GPa). Errors name the frame index and key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SCHEMA_NAME = "matkit-frames"
SCHEMA_VERSION = 1
UNITS = {
    "length": "Angstrom",
    "energy": "eV",
    "forces": "eV/Angstrom",
    "stress": "eV/Angstrom^3",
}
STRESS_CONVENTION = "ASE Voigt order (xx, yy, zz, yz, xz, xy); tensile positive; stress = (1/V) dE/d(strain)"
UNITS_JSON = json.dumps(UNITS, sort_keys=True)

#: per-frame string metadata stored as variable-length UTF-8 datasets
STRING_KEYS = ("ids", "groups", "sources")
#: core labels, each with a presence flag ``has_<label>``
LABELS = ("energy", "forces", "stress")

#: names an extra property may not take (they are core labels or graph attributes)
RESERVED_NAMES = frozenset({"energy", "forces", "stress", "free_energy", "positions", "pos", "atomic_numbers",
                            "numbers", "cell", "pbc", "edge_index", "shifts", "batch", "ptr", "num_nodes",
                            "frame_index", "frame_id", "has_energy", "has_forces", "has_stress", "x", "y"})

#: plausibility limits used by ``check_units`` (values beyond them almost surely have the wrong unit)
MAX_ABS_STRESS = 5.0  # eV/Å^3 (801 GPa); 1 kBar = 6.2e-4 eV/Å^3, so a kBar-valued stress trips it quickly
MAX_ABS_FORCE = 1.0e4  # eV/Å
MAX_ABS_POSITION = 1.0e5  # Å
MAX_ABS_ENERGY_PER_ATOM = 1.0e6  # eV/atom

#: ASE Voigt order (xx, yy, zz, yz, xz, xy) as (row, col) pairs of the 3x3 tensor
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


class FrameValidationError(ValueError):
    """A frame failed validation; the message names the frame index (and id) and the key."""


@dataclass
class Frame:
    """One structure with its labels, in matkit units (Å, eV, eV/Å, eV/Å^3 ASE Voigt).

    positions (n, 3) Å; atomic_numbers (n,); cell (3, 3) rows = lattice vectors, Å; pbc (3,) bool;
    energy: total energy eV or None; forces (n, 3) eV/Å or None; stress (6,) ASE Voigt or (3, 3), eV/Å^3, or None;
    properties: extra per-frame float labels; atom_properties: extra per-atom float arrays (n, ...).
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    stress: Optional[np.ndarray] = None
    id: str = ""
    group: str = ""
    source: str = ""
    properties: dict = field(default_factory=dict)
    atom_properties: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return int(np.shape(self.positions)[0])

    def to_atoms(self):
        """``ase.Atoms`` with a SinglePointCalculator holding the present labels."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.atomic_numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        results = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = np.asarray(self.forces)
        if self.stress is not None:
            results["stress"] = np.asarray(self.stress)
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info.update({"id": self.id, "group": self.group, **self.properties})
        return atoms


def voigt_from_matrix(stress: np.ndarray) -> np.ndarray:
    """(3, 3) -> (6,) ASE Voigt (xx, yy, zz, yz, xz, xy), using the upper triangle."""
    stress = np.asarray(stress, dtype=np.float64)
    return np.array([stress[a, b] for a, b in VOIGT_PAIRS])


def _where(index, frame: Frame) -> str:
    """``frame <index> (id '<id>')``; a str ``index`` names the place itself (e.g. ``"data.json: frame 7"``)."""
    return (index if isinstance(index, str) else f"frame {index}") + (f" (id {frame.id!r})" if frame.id else "")


def _float_array(value, key: str, shape: tuple, where: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise FrameValidationError(f"{where}: {key} is not numeric ({err})") from None
    if array.shape != shape:
        raise FrameValidationError(f"{where}: {key} has shape {array.shape}, expected {shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        first = np.argwhere(bad)[0].tolist()
        raise FrameValidationError(
            f"{where}: {key} contains NaN or inf (first at index {first}); pass None for a missing label")
    return array


def validate_frame(frame: Frame, index, check_units: bool = True) -> Frame:
    """Check one frame and return a copy with normalised dtypes (float64, int32, bool, Voigt stress).

    Raises :class:`FrameValidationError` naming ``index`` (an int: "frame <index>"; a str: used as given) and
    ``frame.id``, and the offending key.
    """
    where = _where(index, frame)
    positions = np.asarray(frame.positions)
    if positions.ndim != 2 or positions.shape[1] != 3 or positions.shape[0] == 0:
        raise FrameValidationError(f"{where}: positions has shape {positions.shape}, expected (n_atoms >= 1, 3)")
    n = positions.shape[0]
    positions = _float_array(positions, "positions", (n, 3), where)
    numbers = np.asarray(frame.atomic_numbers)
    if numbers.shape != (n,):
        raise FrameValidationError(f"{where}: atomic_numbers has shape {numbers.shape}, expected ({n},)")
    if numbers.dtype.kind not in "iu":
        if numbers.dtype.kind != "f" or not np.all(np.isfinite(numbers)) or np.any(numbers != np.round(numbers)):
            raise FrameValidationError(f"{where}: atomic_numbers must be integers, got dtype {numbers.dtype}")
    numbers = numbers.astype(np.int64)
    if numbers.min() < 1 or numbers.max() > 118:
        raise FrameValidationError(f"{where}: atomic_numbers outside 1..118 ({numbers.min()}..{numbers.max()})")
    cell = _float_array(frame.cell, "cell", (3, 3), where)
    pbc = np.asarray(frame.pbc)
    if pbc.shape == ():
        pbc = np.repeat(pbc, 3)
    if pbc.shape != (3,) or pbc.dtype.kind not in "bui":
        raise FrameValidationError(f"{where}: pbc must be 3 booleans, got {frame.pbc!r}")
    pbc = pbc.astype(bool)
    if pbc.any() and np.linalg.matrix_rank(cell[pbc], tol=1e-10) < pbc.sum():
        raise FrameValidationError(f"{where}: cell is degenerate along its periodic directions (pbc={pbc.tolist()})")

    energy = None
    if frame.energy is not None:
        energy = float(_float_array(frame.energy, "energy", (), where))
    forces = None if frame.forces is None else _float_array(frame.forces, "forces", (n, 3), where)
    stress = None
    if frame.stress is not None:
        raw = np.asarray(frame.stress, dtype=np.float64)
        if raw.shape == (3, 3):
            raw = _float_array(raw, "stress", (3, 3), where)
            if not np.allclose(raw, raw.T, rtol=1e-6, atol=1e-10):
                raise FrameValidationError(f"{where}: stress (3, 3) is not symmetric")
            stress = voigt_from_matrix(raw)
        else:
            stress = _float_array(raw, "stress", (6,), where)
    for key in (*frame.properties, *frame.atom_properties):
        if key in RESERVED_NAMES or not str(key) or "/" in str(key):
            raise FrameValidationError(f"{where}: property name {key!r} is reserved or invalid")
    properties = {}
    for key, value in frame.properties.items():
        if value is None:
            continue
        properties[str(key)] = float(_float_array(value, f"properties[{key!r}]", (), where))
    atom_properties = {}
    for key, value in frame.atom_properties.items():
        if value is None:
            continue
        value = np.asarray(value, dtype=np.float64)
        if value.ndim == 0 or value.shape[0] != n:
            raise FrameValidationError(f"{where}: atom_properties[{key!r}] has shape {value.shape}, "
                                       f"expected ({n}, ...)")
        atom_properties[str(key)] = _float_array(value, f"atom_properties[{key!r}]", value.shape, where)

    if check_units:
        _check_plausible_units(where, n, positions, energy, forces, stress)
    return Frame(positions=positions, atomic_numbers=numbers.astype(np.int32), cell=cell, pbc=pbc, energy=energy,
                 forces=forces, stress=stress, id=str(frame.id or ""), group=str(frame.group or ""),
                 source=str(frame.source or ""), properties=properties, atom_properties=atom_properties)


def _check_plausible_units(where, n, positions, energy, forces, stress) -> None:
    hint = "(wrong units?); pass check_units=False / --no-check-units to accept it"
    if np.abs(positions).max() > MAX_ABS_POSITION:
        raise FrameValidationError(f"{where}: positions up to {np.abs(positions).max():.3g} Å {hint}")
    if energy is not None and abs(energy) / n > MAX_ABS_ENERGY_PER_ATOM:
        raise FrameValidationError(f"{where}: energy {energy:.6g} eV for {n} atoms is implausible {hint}")
    if forces is not None and np.abs(forces).max() > MAX_ABS_FORCE:
        raise FrameValidationError(f"{where}: forces up to {np.abs(forces).max():.3g} eV/Å {hint}")
    if stress is not None and np.abs(stress).max() > MAX_ABS_STRESS:
        raise FrameValidationError(
            f"{where}: stress up to {np.abs(stress).max():.3g} eV/Å^3 (= {np.abs(stress).max() * 160.2177:.4g} GPa) "
            f"looks like kBar or GPa, expected eV/Å^3 {hint}")
