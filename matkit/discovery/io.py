"""Structure inputs, labels and prediction files in the formats Matbench Discovery uses.

Structures (:func:`read_structures`) -> list of ``(material_id, ase.Atoms)``:

* MP-20 / CDVAE CSV: columns ``material_id`` and ``cif`` (pymatgen CIF text);
* WBM initial structures ``*.json.bz2`` (``pd.read_json``: columns ``material_id`` and ``initial_structure``,
  a pymatgen ``Structure.as_dict()``; other structure columns ``structure`` / ``relaxed_structure`` accepted);
* extxyz (``.extxyz``/``.xyz``, or a ``.zip`` of extxyz files as ``wbm-initial-atoms.extxyz.zip``) with the id in
  ``atoms.info["material_id"]``;
* a matkit HDF5 dataset (``.h5``, e.g. ``datasets/mp20_val.h5``), ids from the frame ids.

Labels (:func:`read_labels`): a WBM summary CSV (``wbm-summary.csv.gz``: ``material_id``,
``e_form_per_atom_mp2020_corrected``, ``e_above_hull_mp2020_corrected_ppd_mp``, ``unique_prototype``...) or an
MP-20 CSV (``formation_energy_per_atom``, ``e_above_hull``, mapped onto the WBM column names), or a matkit HDF5
dataset with those two per-frame properties (``datasets/mp20_*.h5``).

Predictions (:func:`read_predictions` / :func:`write_predictions`): CSV ``material_id, e_form_per_atom_<model>``
(+ optionally ``<model>_energy``, total eV), as the leaderboard's model prediction files.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd

__all__ = ["read_structures", "read_labels", "read_predictions", "write_predictions", "StructureError", "E_FORM_COL",
           "E_HULL_COL", "UNIQ_COL"]

E_FORM_COL = "e_form_per_atom_mp2020_corrected"
E_HULL_COL = "e_above_hull_mp2020_corrected_ppd_mp"
UNIQ_COL = "unique_prototype"
_STRUCTURE_COLUMNS = ("initial_structure", "structure", "relaxed_structure")


def _suffixes(path: Path) -> str:
    return "".join(path.suffixes).lower()


class StructureError(ValueError):
    """A structure of an input file could not be read; the message names the file, the row and the id."""


def read_structures(path, limit: Optional[int] = None, errors: str = "raise") -> List[Tuple[str, object]]:
    """Read ``(material_id, ase.Atoms)`` pairs from an MP-20 CSV, a WBM structures JSON or extxyz (zip).

    errors : "raise" raises :class:`StructureError` for the first unreadable structure; "keep" returns
        ``(material_id, StructureError)`` in its place, so that a run records it as failed and goes on.
    A missing or empty material id is always an error naming the row.
    """
    if errors not in ("raise", "keep"):
        raise ValueError(f"errors must be 'raise' or 'keep', got {errors!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"structures file not found: {path}")
    suffix = _suffixes(path)
    if suffix.endswith((".h5", ".hdf5")):
        pairs = [(frame.id, frame.to_atoms()) for frame in _frames(path, limit)]
        for _, atoms in pairs:
            atoms.calc = None
    elif ".csv" in suffix:
        pairs = _read_cif_csv(path, limit)
    elif ".json" in suffix:
        pairs = _read_structure_json(path, limit)
    elif suffix.endswith(".zip"):
        pairs = _read_extxyz_zip(path, limit)
    elif suffix.endswith((".extxyz", ".xyz")):
        pairs = _read_extxyz(path, limit)
    else:
        raise ValueError(f"unknown structures format for {path.name}: expected .csv (MP-20 with a 'cif' column), "
                         f".json[.bz2|.gz] (WBM initial structures), .extxyz/.xyz, .extxyz.zip or .h5 (matkit)")
    ids = [mid for mid, _ in pairs]
    dupes = pd.Index(ids)[pd.Index(ids).duplicated()].unique().tolist()
    if dupes:
        raise ValueError(f"{path.name}: duplicate material ids {dupes[:10]}")
    if errors == "raise":
        bad = next((atoms for _, atoms in pairs if isinstance(atoms, Exception)), None)
        if bad is not None:
            raise bad
    return pairs


def _frames(path: Path, limit=None):
    """Frames of a matkit HDF5 dataset (the first ``limit``)."""
    from ..data.hdf5 import FrameFile

    frames = FrameFile(path)
    n = len(frames) if limit is None else min(limit, len(frames))
    return [frames[k] for k in range(n)]


def _read_cif_csv(path: Path, limit) -> List[Tuple[str, object]]:
    from pymatgen.core import Composition, Structure
    from pymatgen.io.ase import AseAtomsAdaptor
    import warnings

    df = pd.read_csv(path, nrows=limit)
    for col in ("material_id", "cif"):
        if col not in df:
            raise KeyError(f"{path.name} lacks column {col!r} (MP-20 format); columns: {list(df.columns)}")
    formulas = df["pretty_formula"] if "pretty_formula" in df else pd.Series([None] * len(df))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "fractional coordinates rounded to ideal values"
        for row, (mid, cif, formula) in enumerate(zip(df["material_id"], df["cif"], formulas), start=2):
            mid = _material_id(mid, path, row)
            try:
                if not isinstance(cif, str) or not cif.strip():
                    raise ValueError("empty cif")
                structure = Structure.from_str(cif, fmt="cif")
                if isinstance(formula, str) and structure.composition.reduced_formula != \
                        Composition(formula).reduced_formula:
                    raise ValueError(f"the CIF gives {structure.composition.reduced_formula} but the row's "
                                     f"pretty_formula is {formula} (truncated or corrupt CIF?)")
                out.append((mid, AseAtomsAdaptor.get_atoms(structure)))
            except Exception as err:  # noqa: BLE001 - one bad row is recorded, the others are read
                out.append((mid, StructureError(f"{path.name} row {row} ({mid}): unreadable structure: "
                                                f"{' '.join(str(err).split())[:200]}")))
    return out


def _material_id(value, path: Path, row: int) -> str:
    """A material id as text; a missing one (empty, NaN) is an error naming the row (no id, no record)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)) or not str(value).strip():
        raise ValueError(f"{path.name} row {row}: material_id is missing")
    return str(value).strip()


def _read_structure_json(path: Path, limit) -> List[Tuple[str, object]]:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    df = pd.read_json(path)
    if "material_id" not in df:
        df = df.rename_axis("material_id").reset_index()
    col = next((c for c in _STRUCTURE_COLUMNS if c in df), None)
    if col is None:
        raise KeyError(f"{path.name} has no structure column (expected one of {_STRUCTURE_COLUMNS}); "
                       f"columns: {list(df.columns)}")
    if limit is not None:
        df = df.iloc[:limit]
    return [(str(mid), AseAtomsAdaptor.get_atoms(Structure.from_dict(d))) for mid, d in zip(df["material_id"], df[col])]


def _atoms_id(atoms, fallback: str) -> str:
    for key in ("material_id", "id", "mat_id"):
        if key in atoms.info:
            return str(atoms.info[key])
    return fallback


def _clean(atoms):
    atoms.calc = None
    return atoms


def _read_extxyz(path: Path, limit) -> List[Tuple[str, object]]:
    from ase.io import iread

    out = []
    for k, atoms in enumerate(iread(str(path), index=":", format="extxyz")):
        if limit is not None and k >= limit:
            break
        out.append((_atoms_id(atoms, f"{path.stem}-{k}"), _clean(atoms)))
    return out


def _read_extxyz_zip(path: Path, limit) -> List[Tuple[str, object]]:
    from ase.io import read

    out = []
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith((".extxyz", ".xyz")))
        for name in names:
            if limit is not None and len(out) >= limit:
                break
            text = archive.read(name).decode()
            for k, atoms in enumerate(read(io.StringIO(text), index=":", format="extxyz")):
                out.append((_atoms_id(atoms, f"{Path(name).stem}-{k}" if k else Path(name).stem), _clean(atoms)))
    return out[:limit] if limit is not None else out


def read_labels(path) -> pd.DataFrame:
    """DFT labels indexed by ``material_id`` with columns ``e_form_per_atom_mp2020_corrected`` and
    ``e_above_hull_mp2020_corrected_ppd_mp`` (eV/atom), ``unique_prototype`` when present, ``formula`` if known.

    Accepts the WBM summary (``wbm-summary.csv[.gz]``) or an MP-20 CSV (``formation_energy_per_atom``,
    ``e_above_hull``, ``pretty_formula``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"labels file not found: {path}")
    if _suffixes(path).endswith((".h5", ".hdf5")):
        rows = [dict(material_id=f.id, formula=f.to_atoms().get_chemical_formula(), **f.properties)
                for f in _frames(path)]
        df = pd.DataFrame(rows)
    else:
        df = pd.read_csv(path)
    if "material_id" not in df:
        raise KeyError(f"{path.name} lacks a 'material_id' column; columns: {list(df.columns)}")
    if E_FORM_COL not in df and "formation_energy_per_atom" in df:  # MP-20
        df = df.rename(columns={"formation_energy_per_atom": E_FORM_COL, "e_above_hull": E_HULL_COL,
                                "pretty_formula": "formula"})
    missing = [c for c in (E_FORM_COL, E_HULL_COL) if c not in df]
    if missing:
        raise KeyError(f"{path.name} lacks label column(s) {missing}; columns: {list(df.columns)}")
    df = df.set_index("material_id")
    if df.index.has_duplicates:
        raise ValueError(f"{path.name}: duplicate material ids {df.index[df.index.duplicated()][:10].tolist()}")
    keep = [c for c in (E_FORM_COL, E_HULL_COL, UNIQ_COL, "formula") if c in df]
    out = df[keep].copy()
    if UNIQ_COL in out:
        out[UNIQ_COL] = out[UNIQ_COL].astype(bool)
    return out


def read_predictions(path, column: Optional[str] = None) -> pd.Series:
    """Predicted formation energies (eV/atom) indexed by ``material_id`` from a leaderboard-style CSV.

    ``column``: the e_form column; by default the single column starting with ``e_form_per_atom`` (or
    ``formation_energy_per_atom``, the upstream test fixture's name).
    """
    path = Path(path)
    df = pd.read_csv(path)
    if "material_id" not in df:
        raise KeyError(f"{path.name} lacks a 'material_id' column; columns: {list(df.columns)}")
    if column is None:
        candidates = [c for c in df.columns if c.startswith("e_form_per_atom")] or \
                     [c for c in df.columns if c == "formation_energy_per_atom"]
        if len(candidates) != 1:
            raise KeyError(f"{path.name}: cannot tell the formation-energy column among {list(df.columns)}; "
                           f"pass column=")
        column = candidates[0]
    elif column not in df:
        raise KeyError(f"{path.name} has no column {column!r}; columns: {list(df.columns)}")
    series = pd.to_numeric(df.set_index("material_id")[column], errors="coerce")
    if series.index.has_duplicates:
        raise ValueError(f"{path.name}: duplicate material ids {series.index[series.index.duplicated()][:10].tolist()}")
    series.name = column
    return series


def write_predictions(path, e_form: pd.Series, model: str, energy: Optional[pd.Series] = None,
                      decimals: Optional[int] = None, flags: Optional[pd.Series] = None) -> Path:
    """Write ``material_id, e_form_per_atom_<model>[, <model>_energy][, <model>_flags]`` (eV/atom, eV) as CSV
    (gz if the name ends with .gz). ``decimals``: round (the leaderboard files use 4); default full precision.
    ``flags``: per material, what a user must know before trusting the row ("not converged", "failed", ...)."""
    path = Path(path)
    df = pd.DataFrame({f"e_form_per_atom_{model}": e_form})
    if energy is not None:
        df.insert(0, f"{model}_energy", energy.reindex(df.index))
    if flags is not None:
        df[f"{model}_flags"] = flags.reindex(df.index).fillna("")
    df.index.name = "material_id"
    if decimals is not None:
        df = df.round(decimals)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path)
    return path
