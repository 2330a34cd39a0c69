"""Predicted hull distances of new materials against a convex hull built from known entries.

The benchmark's hull distance, ``e_hull_dft + e_form_pred - e_form_dft``, needs each material's own DFT labels.
For a material without them, the predicted hull distance is its predicted formation energy measured against the
lower convex hull of known phases. Everything here lives in formation-energy space (eV/atom, elements at 0):

* entries: a pymatgen ``ComputedEntry`` / ``ComputedStructureEntry`` JSON list (an MP export; energies on the
  MP2020-corrected scale, turned into formation energies with MP's 2023-02-07 elemental references), or a labels
  file with formation energies (MP-20 ``.h5`` / ``.csv``, WBM summary: :func:`~matkit.discovery.io.read_labels`);
* each material's hull is built from the entries of its chemical system (and subsystems) plus the elements,
  leaving out an entry with the material's own id (so known materials can be checked against the others).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd

__all__ = ["read_hull_entries", "hull_distances"]


def _pd_entry(composition, e_form_per_atom: float, name: str):
    from pymatgen.analysis.phase_diagram import PDEntry
    from pymatgen.core import Composition

    comp = Composition(composition)
    return PDEntry(comp, float(e_form_per_atom) * comp.num_atoms, name=str(name))


def read_hull_entries(path) -> List:
    """Known phases as pymatgen ``PDEntry`` objects whose energies are formation energies (eV per formula unit of
    the entry's composition) and whose names are material ids. See the module docstring for the formats."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"hull entries file not found: {path}")
    if path.suffix.lower() == ".json" or path.name.lower().endswith((".json.gz", ".json.bz2")):
        return _entries_from_json(path)
    from .io import E_FORM_COL, read_labels

    labels = read_labels(path)
    if "formula" not in labels:
        raise KeyError(f"{path.name}: the labels have no formula column to build a hull from")
    bad = labels.index[~np.isfinite(labels[E_FORM_COL].astype(float))]
    if len(bad):
        raise ValueError(f"{path.name}: non-finite formation energies for {list(bad[:5])}")
    return [_pd_entry(f, e, mid) for mid, f, e in zip(labels.index, labels["formula"], labels[E_FORM_COL])]


def _entries_from_json(path: Path) -> List:
    from monty.json import MontyDecoder

    from .energies import formation_energy_per_atom

    if path.name.lower().endswith(".gz"):
        import gzip

        text = gzip.open(path, "rt").read()
    elif path.name.lower().endswith(".bz2"):
        import bz2

        text = bz2.open(path, "rt").read()
    else:
        text = path.read_text()
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(raw, dict):
        raw = raw.get("entries", list(raw.values()))
    out = []
    for k, item in enumerate(raw):
        try:
            entry = MontyDecoder().process_decoded(item)
            e_form = formation_energy_per_atom(entry.composition, entry.energy)
        except Exception as err:  # name the entry: one bad row must be findable
            raise ValueError(f"{path.name}: entry {k} ({item.get('entry_id', '?') if isinstance(item, dict) else '?'}) "
                             f"is not a usable pymatgen ComputedEntry: {err}") from None
        out.append(_pd_entry(entry.composition, e_form, entry.entry_id or f"entry-{k}"))
    return out


def hull_distances(entries, formulas: pd.Series, e_form_pred: pd.Series) -> pd.DataFrame:
    """Predicted hull distance (eV/atom) of each material.

    entries : from :func:`read_hull_entries`. formulas : composition per material id. e_form_pred : predicted
    formation energies (eV/atom) per material id. Returns a DataFrame indexed by material id with ``formula``,
    ``e_form_per_atom``, ``e_above_hull_pred`` (NaN where undefined) and ``note`` (why).
    """
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.core import Composition, Element

    by_system: Dict[frozenset, list] = {}
    for entry in entries:
        by_system.setdefault(frozenset(str(el) for el in entry.composition.elements), []).append(entry)
    cache: Dict[Tuple[frozenset, str], PhaseDiagram] = {}
    rows = []
    for mid, formula in formulas.items():
        e_form = float(e_form_pred.get(mid, np.nan))
        row = {"material_id": mid, "formula": formula, "e_form_per_atom": e_form, "e_above_hull_pred": np.nan,
               "note": ""}
        if not np.isfinite(e_form):
            row["note"] = "no predicted formation energy"
            rows.append(row)
            continue
        comp = Composition(formula)
        system = frozenset(str(el) for el in comp.elements)
        own = str(mid) if any(e.name == str(mid) for e in by_system.get(system, [])) else ""
        key = (system, own)
        if key not in cache:
            members = [e for sub, group in by_system.items() if sub <= system for e in group if e.name != own]
            members += [_pd_entry(el, 0.0, el) for el in system]  # the elements define the zero
            cache[key] = PhaseDiagram(members, elements=[Element(el) for el in sorted(system)])
        _, e_hull = cache[key].get_decomp_and_e_above_hull(_pd_entry(comp, e_form, mid), allow_negative=True)
        row["e_above_hull_pred"] = float(e_hull)
        row["note"] = "own entry left out of the hull" if own else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("material_id")
