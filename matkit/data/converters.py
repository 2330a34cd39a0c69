"""Importers from common atomistic data formats to matkit :class:`~matkit.data.schema.Frame` streams, and
:func:`convert` that streams them into a matkit HDF5 file.

Every importer is a generator (frames are produced one at a time, so files larger than memory convert) and states
the source's units and stress sign in its docstring. An item of the source that cannot be turned into a frame (an
unparsable CIF, a structure whose composition disagrees with its formula column, a frame lacking a label key) is
a *bad item*: with ``on_bad=None`` the importer raises :class:`BadItemError` naming it (file, row or frame, id);
with a callable ``on_bad(message)`` it reports the one-line message and goes on with the next item.
:func:`convert` skips bad items and frames that fail validation (``strict=False``, the default), reports each and
counts them. Errors that make the rest of a file unreadable (truncated JSON, a malformed extxyz frame, a DeePMD set
whose arrays disagree) still stop the conversion, naming the file and position.

matkit units: Å, eV, eV/Å, stress eV/Å^3 in ASE Voigt order (xx, yy, zz, yz, xz, xy), tensile positive.

Unit constants: 1 GPa = ``ase.units.GPa`` eV/Å^3 = 1/160.21766208 eV/Å^3; 1 kBar = 0.1 GPa. VASP (OUTCAR,
vasprun, and the mlearn / MPtrj files derived from it) reports stress in kBar with the opposite sign (positive =
compressive pressure), so ``stress_ase = -0.1 * GPa * stress_vasp_kbar``.
"""
from __future__ import annotations

import glob
import os
import re
import warnings
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from ase import units

from .jsonstream import iter_json_items
from .schema import RESERVED_NAMES, Frame, voigt_from_matrix

__all__ = ["FORMATS", "iter_frames", "convert", "KBAR_VASP_TO_EV_A3", "read_extxyz", "read_asedb", "read_mlearn",
           "read_mptrj", "read_deepmd", "read_mp20csv", "vasp_kbar_to_ase_stress", "mlearn_virial_to_ase_stress",
           "BadItemError", "SkippedFrameWarning"]

#: multiply a VASP-sign kBar stress by this to get an ASE-sign eV/Å^3 stress
KBAR_VASP_TO_EV_A3 = -0.1 * units.GPa

OnBad = Optional[Callable[[str], None]]


class BadItemError(ValueError):
    """One item of a source (a CSV row, a JSON frame, a database row) cannot be converted; the message names it."""


class SkippedFrameWarning(UserWarning):
    """:func:`convert` skipped a bad item or a frame that failed validation (the message names it)."""


def _bad_item(on_bad: OnBad, where: str, err=None) -> None:
    """Report a bad item through ``on_bad``, or raise :class:`BadItemError` when there is none.

    The message is ``where`` (naming file, row/frame, id) followed by ``: <err>`` when ``err`` is given, on one line.
    """
    message = where if err is None else f"{where}: {' '.join(str(err).split()) or type(err).__name__}"
    if on_bad is None:
        raise BadItemError(message)
    on_bad(message)


def vasp_kbar_to_ase_stress(stress_3x3) -> np.ndarray:
    """(3, 3) stress in kBar with VASP's sign (positive = compressive) -> (6,) ASE Voigt eV/Å^3, tensile positive."""
    return voigt_from_matrix(np.asarray(stress_3x3, dtype=np.float64) * KBAR_VASP_TO_EV_A3)


def mlearn_virial_to_ase_stress(virial_stress) -> np.ndarray:
    """mlearn ``virial_stress`` [xx, yy, zz, xy, yz, xz] kBar, VASP sign -> ASE Voigt [xx, yy, zz, yz, xz, xy]
    eV/Å^3."""
    xx, yy, zz, xy, yz, xz = np.asarray(virial_stress, dtype=np.float64)
    return np.array([xx, yy, zz, yz, xz, xy]) * KBAR_VASP_TO_EV_A3


def _structure_arrays(structure) -> dict:
    """pymatgen Structure (or its dict) -> positions (Å), atomic_numbers, cell (rows), pbc."""
    from pymatgen.core import Structure

    if isinstance(structure, dict):
        structure = Structure.from_dict(structure)
    numbers = []
    for site in structure:
        if not site.is_ordered:
            raise ValueError(f"disordered site {site.species} is not supported (one species per site needed)")
        numbers.append(site.specie.Z)
    return dict(positions=np.array(structure.cart_coords, dtype=np.float64), atomic_numbers=np.array(numbers),
                cell=np.array(structure.lattice.matrix, dtype=np.float64),
                pbc=np.array(getattr(structure.lattice, "pbc", (True, True, True)), dtype=bool))


# --------------------------------------------------------------------------------------------------- extxyz
def _label_from_atoms(atoms, key: Optional[str], calc_name: str, per_atom: bool, warned: set):
    """Value of ``key`` from atoms.info/arrays, else the SinglePointCalculator result ``calc_name``, else None."""
    if key:
        store = atoms.arrays if per_atom else atoms.info
        if key in store:
            return store[key]
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    if calc_name in results:
        if key and key not in warned:
            warned.add(key)
            warnings.warn(f"extxyz: key {key!r} not found, using the {calc_name!r} that ASE read into the attached "
                          f"SinglePointCalculator (ASE >= 3.23 moves 'energy'/'forces'/'stress' there)", stacklevel=4)
        return results[calc_name]
    return None


def read_extxyz(path, energy_key: str = "REF_energy", forces_key: str = "REF_forces",
                stress_key: str = "REF_stress", virials_key: str = "REF_virials", id_key: Optional[str] = None,
                group_key: str = "config_type", index: str = ":", on_bad: OnBad = None) -> Iterator[Frame]:
    """Extended XYZ (read with ``ase.io.iread``, one frame at a time).

    Units: Å, eV, eV/Å (ASE convention); ``stress`` in eV/Å^3, ASE sign (tensile positive), 6 (Voigt) or 9 values;
    ``virials`` in eV (3x3), virial = -stress x volume, converted with stress = -virial / volume.
    Labels come from ``atoms.info[energy_key]`` / ``atoms.arrays[forces_key]`` / ``atoms.info[stress_key]``
    (MACE-style ``REF_*`` keys by default); when a key is absent, the value ASE 3.29 put into the attached
    SinglePointCalculator (plain ``energy=``, ``forces``, ``stress=`` in the file) is used with a warning.
    Other numeric scalars in ``atoms.info`` become per-frame properties. A frame whose labels cannot be read (e.g.
    a virial that is not 9 numbers) is a bad item (see the module docstring); a frame ASE cannot parse ends the file
    with an error naming the frame.
    """
    warned: set = set()
    for k, atoms in _iread_named(path, index):
        try:
            frame = _extxyz_frame(atoms, k, path, energy_key, forces_key, stress_key, virials_key, id_key, group_key,
                                  warned)
        except Exception as err:  # noqa: BLE001 - one frame's bad labels must not stop the file
            _bad_item(on_bad, f"{path}: frame {k}", err)
            continue
        yield frame


def _iread_named(path, index: str):
    """``ase.io.iread`` of an extxyz file, ``(k, atoms)``; a parse error names the file and the frame (the frames
    after a malformed one cannot be found reliably, so it ends the file)."""
    from ase.io import iread

    frames = iread(os.fspath(path), index=index, format="extxyz")
    k = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - ASE raises many types for malformed text
            raise ValueError(f"{path}: frame {k}: cannot parse extxyz: {' '.join(str(err).split())}") from None
        yield k, atoms
        k += 1


def _extxyz_frame(atoms, k, path, energy_key, forces_key, stress_key, virials_key, id_key, group_key,
                  warned) -> Frame:
    """Frame ``k`` of an extxyz file from the ``Atoms`` ASE read (see :func:`read_extxyz`)."""
    skip = {energy_key, stress_key, virials_key, id_key, group_key}
    energy = _label_from_atoms(atoms, energy_key, "energy", False, warned)
    forces = _label_from_atoms(atoms, forces_key, "forces", True, warned)
    stress = _label_from_atoms(atoms, stress_key, "stress", False, warned)
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        stress = stress.reshape(3, 3) if stress.size == 9 else stress
    elif virials_key and virials_key in atoms.info:
        virials = np.asarray(atoms.info[virials_key], dtype=np.float64).reshape(3, 3)
        stress = -virials / atoms.get_volume()
    properties = {key: float(value) for key, value in atoms.info.items()
                  if key not in skip and key not in RESERVED_NAMES
                  and isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)}
    return Frame(positions=atoms.positions, atomic_numbers=atoms.numbers, cell=atoms.cell.array, pbc=atoms.pbc,
                 energy=energy, forces=forces, stress=stress,
                 id=str(atoms.info.get(id_key, "")) if id_key else f"{os.path.basename(path)}:{k}",
                 group=str(atoms.info.get(group_key, "")) if group_key else "", source=os.path.basename(path),
                 properties=properties)


# --------------------------------------------------------------------------------------------------- ASE db
def read_asedb(path, id_key: Optional[str] = None, group_key: Optional[str] = None,
               selection: Optional[str] = None, on_bad: OnBad = None) -> Iterator[Frame]:
    """ASE database (``ase.db``: .db SQLite, .json, ...), rows in id order.

    Units: ASE (Å, eV, eV/Å, stress eV/Å^3 Voigt, tensile positive) from the row's calculator results. Numeric
    scalars in ``key_value_pairs`` and ``row.data`` become per-frame properties; ``magmoms`` becomes the per-atom
    property ``magmom``. ``id_key``/``group_key`` name a key_value_pairs or data entry for the frame id/group
    (default id: ``<file>:<row id>``). A row that cannot be read is a bad item (see the module docstring).
    """
    import ase.db

    db = ase.db.connect(os.fspath(path))
    for row in db.select(selection):
        try:
            atoms = row.toatoms()
            results = atoms.calc.results if atoms.calc is not None else {}
            extra = {**row.get("data", {}), **row.key_value_pairs}
            properties = {key: float(value) for key, value in extra.items() if key not in RESERVED_NAMES
                          and isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)}
            atom_properties = {}
            if results.get("magmoms") is not None:
                atom_properties["magmom"] = np.asarray(results["magmoms"], dtype=np.float64)
            frame = Frame(positions=atoms.positions, atomic_numbers=atoms.numbers, cell=atoms.cell.array,
                          pbc=atoms.pbc, energy=results.get("energy"), forces=results.get("forces"),
                          stress=results.get("stress"),
                          id=str(extra[id_key]) if id_key and id_key in extra else f"{os.path.basename(path)}:{row.id}",
                          group=str(extra.get(group_key, "")) if group_key else "", source=os.path.basename(path),
                          properties=properties, atom_properties=atom_properties)
        except Exception as err:  # noqa: BLE001 - one bad row must not stop the database
            _bad_item(on_bad, f"{path}: row id {row.id}", err)
            continue
        yield frame


# --------------------------------------------------------------------------------------------------- mlearn
def read_mlearn(path, on_bad: OnBad = None) -> Iterator[Frame]:
    """mlearn JSON (Zuo et al. 2020; ``[{structure, outputs: {energy, forces, virial_stress}, group, ...}]``).

    Units and sign of the source: ``energy`` total eV of the cell, ``forces`` eV/Å, ``virial_stress`` 6 numbers in
    order [xx, yy, zz, xy, yz, xz], **kBar with VASP's sign** (positive = compressive). Converted to ASE Voigt
    [xx, yy, zz, yz, xz, xy] eV/Å^3: ``stress = -0.1 * ase.units.GPa * virial_stress`` (reordered).
    ``structure`` is a pymatgen Structure dict (periodic). id = ``<element>-<index>``, group = ``group``.
    An item without a readable structure or labels is a bad item (see the module docstring).
    """
    for k, (_, item) in enumerate(iter_json_items(path)):
        try:
            if not isinstance(item, dict) or "structure" not in item:
                raise ValueError("not an object with a 'structure' key")
            outputs = item.get("outputs", {})
            stress = outputs.get("virial_stress")
            frame = Frame(**_structure_arrays(item["structure"]), energy=outputs.get("energy"),
                          forces=outputs.get("forces"),
                          stress=None if stress is None else mlearn_virial_to_ase_stress(stress),
                          id=f"{item.get('element', 'mlearn')}-{k}", group=str(item.get("group", "")),
                          source=str(item.get("description", "") or item.get("tag", "")))
        except Exception as err:  # noqa: BLE001 - one bad item must not stop the file
            _bad_item(on_bad, f"{path}: item {k}", err)
            continue
        yield frame


# --------------------------------------------------------------------------------------------------- MPtrj
MPTRJ_ENERGY_KEYS = ("corrected_total_energy", "uncorrected_total_energy")
MPTRJ_SCALARS = ("uncorrected_total_energy", "corrected_total_energy", "energy_per_atom", "ef_per_atom",
                 "e_per_atom_relaxed", "ef_per_atom_relaxed", "bandgap")


def read_mptrj(path, energy: str = "corrected_total_energy", on_bad: OnBad = None) -> Iterator[Frame]:
    """MPtrj JSON as released by the Materials Project / CHGNet (``MPtrj_2022.9_full.json``), streamed.

    Layout: ``{mp_id: {frame_id: {structure, uncorrected_total_energy, corrected_total_energy, energy_per_atom,
    ef_per_atom, e_per_atom_relaxed, ef_per_atom_relaxed, force, stress, magmom, bandgap, mp_id}}}``.

    Units and sign of the source: energies eV (``*_total_energy``) and eV/atom (``*_per_atom``; ``energy_per_atom``
    is the MP2020-corrected energy per atom); ``force`` eV/Å; ``stress`` (3, 3) **kBar with VASP's sign**
    (CHGNet converts with ``-0.1`` to GPa, ASE sign); ``magmom`` per-site μB or null.
    Converted: ``stress = -0.1 * ase.units.GPa * stress`` -> ASE Voigt eV/Å^3.

    ``energy`` selects the total energy label: "corrected_total_energy" (MP2020-corrected; what CHGNet/MACE-MP train
    on and what the MP elemental references + MP-20 formation energies are consistent with) or
    "uncorrected_total_energy" (raw VASP). Both are also kept as per-frame properties, with the other scalars.
    id = frame_id, group = mp_id. An entry or frame that lacks a key or has an unreadable structure is a bad item
    (see the module docstring).
    """
    if energy not in MPTRJ_ENERGY_KEYS:
        raise ValueError(f"MPtrj energy must be one of {MPTRJ_ENERGY_KEYS}, got {energy!r}")
    for mp_id, frames in iter_json_items(path):
        if not isinstance(frames, dict):
            _bad_item(on_bad, f"{path}: MPtrj entry {mp_id!r}", "not an object of frames")
            continue
        for frame_id, item in frames.items():
            where = f"{path}: MPtrj frame {mp_id}/{frame_id}"
            if not isinstance(item, dict):
                _bad_item(on_bad, where, "not an object")
                continue
            missing = [key for key in ("structure", energy, "force", "stress") if key not in item]
            if missing:
                _bad_item(on_bad, f"{where} lacks key(s) {missing}")
                continue
            try:
                magmom = item.get("magmom")
                frame = Frame(**_structure_arrays(item["structure"]), energy=item[energy], forces=item["force"],
                              stress=None if item["stress"] is None else vasp_kbar_to_ase_stress(item["stress"]),
                              id=str(frame_id), group=str(item.get("mp_id", mp_id)), source=os.path.basename(path),
                              properties={key: item[key] for key in MPTRJ_SCALARS if item.get(key) is not None},
                              atom_properties={} if magmom is None else {"magmom": np.asarray(magmom,
                                                                                              dtype=np.float64)})
            except Exception as err:  # noqa: BLE001 - one bad frame must not stop the file
                _bad_item(on_bad, where, err)
                continue
            yield frame


# --------------------------------------------------------------------------------------------------- DeePMD
def _deepmd_systems(path) -> list[str]:
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "type.raw")):
        return [path]
    systems = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "**", "type.raw"), recursive=True))
    if not systems:
        raise FileNotFoundError(f"{path}: no DeePMD system (a folder with type.raw) found")
    return systems


def read_deepmd(path, type_map: Optional[Sequence[str]] = None, on_bad: OnBad = None) -> Iterator[Frame]:
    """DeePMD-kit npy systems: ``type.raw``, ``type_map.raw``, ``set.*/{coord,box,energy,force,virial}.npy``.

    ``path`` is one system folder or a folder searched recursively for systems. Arrays are memory-mapped and read one
    frame at a time. Units and sign of the source: coord/box Å (box rows = cell vectors, 9 numbers row-major),
    energy eV, force eV/Å, **virial eV with virial = -stress x volume** (DeePMD's ASE calculator returns
    stress = -virial / V), converted to ASE stress eV/Å^3 = -virial / volume. A ``nopbc`` file marks a
    non-periodic system (box optional). ``type_map`` overrides a missing ``type_map.raw``.
    id = ``<system>/<set>/<frame>``, group = system folder name. Arrays of a set that disagree in shape stop the
    conversion (naming the file); a frame whose values cannot be converted is a bad item (see the module docstring).
    """
    from ase.data import atomic_numbers as symbol_to_z

    for system in _deepmd_systems(path):
        types = np.loadtxt(os.path.join(system, "type.raw"), dtype=np.int64, ndmin=1)
        map_file = os.path.join(system, "type_map.raw")
        names = open(map_file).read().split() if os.path.exists(map_file) else type_map
        if names is None:
            raise ValueError(f"{system}: no type_map.raw; pass type_map=['O', 'H', ...]")
        numbers = np.array([symbol_to_z[names[t]] for t in types])
        periodic = not os.path.exists(os.path.join(system, "nopbc"))
        name = os.path.basename(os.path.normpath(system))
        for set_dir in sorted(glob.glob(os.path.join(system, "set.*"))):
            load = lambda key: (np.load(os.path.join(set_dir, f"{key}.npy"), mmap_mode="r")  # noqa: E731
                                if os.path.exists(os.path.join(set_dir, f"{key}.npy")) else None)
            coord, box, energy, force, virial = (load(k) for k in ("coord", "box", "energy", "force", "virial"))
            if coord is None:
                raise ValueError(f"{set_dir}: missing coord.npy")
            n_frames = coord.shape[0]
            for key, array, width in (("box", box, 9), ("energy", energy, 1), ("force", force, 3 * len(types)),
                                      ("virial", virial, 9)):
                if array is not None and (array.shape[0] != n_frames or array.reshape(n_frames, -1).shape[1] != width):
                    raise ValueError(f"{set_dir}: {key}.npy has shape {array.shape}, expected ({n_frames}, {width})")
            if coord.reshape(n_frames, -1).shape[1] != 3 * len(types):
                raise ValueError(f"{set_dir}: coord.npy has shape {coord.shape}, expected ({n_frames}, "
                                 f"{3 * len(types)}) for {len(types)} atoms in type.raw")
            if periodic and box is None:
                raise ValueError(f"{set_dir}: missing box.npy for a periodic system (add a 'nopbc' file if it is not)")
            for f in range(n_frames):
                try:
                    cell = np.zeros((3, 3)) if box is None else np.asarray(box[f], dtype=np.float64).reshape(3, 3)
                    stress = None
                    if virial is not None:
                        with np.errstate(divide="ignore", invalid="ignore"):  # a zero volume fails validation
                            stress = -np.asarray(virial[f], dtype=np.float64).reshape(3, 3) / abs(np.linalg.det(cell))
                    forces = None if force is None else np.asarray(force[f], dtype=np.float64).reshape(-1, 3)
                    frame = Frame(positions=np.asarray(coord[f], dtype=np.float64).reshape(-1, 3),
                                  atomic_numbers=numbers, cell=cell, pbc=np.array([periodic] * 3),
                                  energy=None if energy is None else float(np.asarray(energy[f]).reshape(())),
                                  forces=forces,
                                  stress=stress, id=f"{name}/{os.path.basename(set_dir)}/{f}", group=name,
                                  source=os.path.basename(os.path.normpath(path)))
                except Exception as err:  # noqa: BLE001 - one bad frame must not stop the set
                    _bad_item(on_bad, f"{set_dir}: frame {f}", err)
                    continue
                yield frame


# --------------------------------------------------------------------------------------------------- MP-20 CSV
MP20_LABELS = ("formation_energy_per_atom", "e_above_hull", "band_gap")


def read_mp20csv(path, label_columns: Sequence[str] = MP20_LABELS, structure_column: str = "cif",
                 id_column: str = "material_id", group: Optional[str] = None, chunksize: int = 1000,
                 formula_column: Optional[str] = "pretty_formula", elements_column: Optional[str] = "elements",
                 on_bad: OnBad = None) -> Iterator[Frame]:
    """CSV of pymatgen structures with per-structure labels (CDVAE MP-20 / Carbon-24 layout), read in chunks.

    ``structure_column`` holds a CIF string (parsed with pymatgen ``Structure.from_str(cif, fmt="cif")``);
    ``label_columns`` become per-frame properties, in the source's units (MP-20: ``formation_energy_per_atom`` and
    ``e_above_hull`` in eV/atom on the MP2020-corrected scale, ``band_gap`` eV). No energy, forces or stress.
    id = ``id_column``, group = ``group`` (default: the file name without extension, e.g. "train").

    A row is a bad item (see the module docstring; named ``<path>: row <r> (<id>)``, ``r`` counting data rows from
    0 as ``pandas.read_csv(path).iloc[r]`` does) when its CIF does not parse, has a disordered site, or a label is
    not a number, and when the parsed composition disagrees with the row's own ``formula_column`` (reduced formula,
    e.g. "TmMgHg2") or ``elements_column`` (e.g. "['Hg', 'Mg', 'Tm']"), where the CSV has them: a truncated CIF can
    parse as a different compound. None (or a column the CSV lacks) skips that check.
    """
    import pandas as pd

    group = os.path.splitext(os.path.basename(path))[0] if group is None else group
    for chunk in pd.read_csv(path, chunksize=chunksize):
        missing = [c for c in (structure_column, *label_columns) if c not in chunk.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; columns are {list(chunk.columns)}")
        has_id = id_column in chunk.columns
        checks = [c for c in (formula_column, elements_column) if c and c in chunk.columns]
        for row_index, row in chunk.iterrows():
            where = f"{path}: row {row_index}" + (f" ({row[id_column]})" if has_id else "")
            try:
                frame = _mp20_frame(row, structure_column, label_columns, formula_column, elements_column, checks)
            except Exception as err:  # noqa: BLE001 - one bad row must not stop the file
                _bad_item(on_bad, where, err)
                continue
            frame.id = str(row[id_column]) if has_id else str(row_index)
            frame.group = group
            frame.source = os.path.basename(path)
            yield frame


def _mp20_frame(row, structure_column, label_columns, formula_column, elements_column, checks) -> Frame:
    """One MP-20 CSV row -> Frame (structure and labels); raises ValueError naming the column that is wrong."""
    import ast

    import pandas as pd
    from pymatgen.core import Composition, Structure

    cif = row[structure_column]
    if not isinstance(cif, str) or not cif.strip():
        raise ValueError(f"the {structure_column!r} column is empty")
    try:
        structure = Structure.from_str(cif, fmt="cif")
    except Exception as err:  # noqa: BLE001 - pymatgen raises many types for a malformed CIF
        raise ValueError(f"cannot parse the {structure_column!r} column: {err}") from None
    arrays = _structure_arrays(structure)
    composition = structure.composition
    if formula_column in checks and not pd.isna(row[formula_column]):  # an empty cell: nothing to check against
        try:
            expected = Composition(str(row[formula_column]))
        except Exception:  # noqa: BLE001 - pymatgen raises several types for a bad formula
            raise ValueError(f"the {formula_column!r} column is not a formula: {row[formula_column]!r}") from None
        if expected.reduced_composition != composition.reduced_composition:
            raise ValueError(f"the CIF parses as {composition.reduced_formula} ({composition.formula}), the "
                             f"{formula_column!r} column says {row[formula_column]} (truncated or wrong CIF?)")
    if elements_column in checks and not pd.isna(row[elements_column]):
        elements = str(row[elements_column]).strip()
        expected = set(ast.literal_eval(elements) if elements.startswith("[") else re.split(r"[\s,]+", elements))
        found = {element.symbol for element in composition.elements}
        if expected != found:
            raise ValueError(f"the CIF has elements {sorted(found)}, the {elements_column!r} column says "
                             f"{sorted(expected)} (truncated or wrong CIF?)")
    properties = {}
    for column in label_columns:
        value = row[column]
        if pd.isna(value):
            continue
        try:
            properties[column] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"label column {column!r} is not a number: {value!r}") from None
    return Frame(**arrays, properties=properties)


# --------------------------------------------------------------------------------------------------- driver
FORMATS: dict[str, Callable[..., Iterator[Frame]]] = {
    "extxyz": read_extxyz,
    "asedb": read_asedb,
    "mlearn": read_mlearn,
    "mptrj": read_mptrj,
    "deepmd": read_deepmd,
    "mp20csv": read_mp20csv,
}


def iter_frames(path, format: str, **options) -> Iterator[Frame]:
    """Frames of ``path`` read with the importer for ``format`` (a key of :data:`FORMATS`)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {sorted(FORMATS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    return FORMATS[format](path, **options)


def convert(inputs, output, format: str, append: bool = False, compression: Optional[str] = "gzip",
            flush_frames: int = 256, every: int = 1, max_frames: Optional[int] = None, license: Optional[str] = None,
            note: Optional[str] = None, check_units: bool = True, progress: bool = True, strict: bool = False,
            on_skip: Optional[Callable[[str], None]] = None, **options) -> dict:
    """Stream ``inputs`` (a path or list of paths) of ``format`` into the matkit HDF5 file ``output``.

    every / max_frames subsample (keep every k-th frame, at most max_frames frames; recorded in provenance).

    One bad structure does not stop the conversion: a bad item of the source (see the module docstring) or a frame
    that fails validation (:func:`~matkit.data.schema.validate_frame`) is skipped and reported with a one-line
    message naming the input file, the row/frame (``frame k`` counts the frames the importer produced for that
    file) and the id: through ``on_skip(message)``, by default as a :class:`SkippedFrameWarning`. ``strict=True``
    raises instead (:class:`BadItemError` / :class:`~matkit.data.schema.FrameValidationError`).

    Returns the counts: frames_added, frames_skipped, skipped (the first 100 messages), frames_with (frames added
    with an energy / forces / stress label), n_frames, n_atoms_total, output. Nothing is left at ``output`` (or
    changed in it, for ``append``) if the conversion fails.
    """
    from tqdm import tqdm

    from .hdf5 import HDF5Writer
    from .schema import FrameValidationError

    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {sorted(FORMATS)}")
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    for path in inputs:  # before anything is written
        if not os.path.exists(path):
            raise FileNotFoundError(f"{os.fspath(path)}: no such file or folder")
    provenance = {"inputs": [os.fspath(p) for p in inputs], "format": format,
                  "options": {k: v for k, v in options.items() if v is not None}, "every": every,
                  "max_frames": max_frames}
    if note:
        provenance["note"] = note
    skipped: list[str] = []
    n_skipped = 0

    def skip(message: str) -> None:
        nonlocal n_skipped
        n_skipped += 1
        if len(skipped) < 100:
            skipped.append(message)
        if on_skip is None:
            warnings.warn(message, SkippedFrameWarning, stacklevel=3)
        else:
            on_skip(message)

    kept = 0
    labelled = {"energy": 0, "forces": 0, "stress": 0}  # frames added with each label (a wrong key shows as 0)
    with HDF5Writer(output, mode="a" if append else "w", compression=compression, provenance=provenance,
                    license=license, flush_frames=flush_frames, check_units=check_units) as writer:
        with tqdm(desc=f"convert {format}", unit=" frames", disable=not progress) as bar:
            for path in inputs:
                frames = iter_frames(path, format, on_bad=None if strict else skip, **options)
                for k, frame in enumerate(frames):
                    if k % every:
                        continue
                    if max_frames is not None and kept >= max_frames:
                        break
                    try:
                        writer.add(frame, where=f"{os.fspath(path)}: frame {k}")
                    except FrameValidationError as err:
                        if strict:
                            raise
                        skip(str(err))
                        continue
                    kept += 1
                    for label in labelled:
                        labelled[label] += getattr(frame, label) is not None
                    bar.update()
        counts = {"frames_added": kept, "frames_skipped": n_skipped, "skipped": skipped, "frames_with": labelled}
    counts.update(n_frames=writer.n_frames, n_atoms_total=writer.n_atoms_total, output=os.fspath(output))
    return counts
