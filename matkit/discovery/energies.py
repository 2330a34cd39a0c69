"""From a model's total energy to formation energy and hull distance (Matbench Discovery protocol).

1. energy scale: models trained on raw VASP energies (MPtrj ``energy``) get the MP2020 corrections
   (``pymatgen`` ``MaterialsProject2020Compatibility``); models trained on corrected energies (CHGNet:
   MPtrj ``corrected_total_energy``) must not be corrected again;
2. formation energy per atom from the MP elemental reference energies (2023-02-07 entries, uncorrected):
   ``e_form = (E - sum_el n_el mu_el) / N``;
3. hull distance either as the benchmark does (fixed DFT hull: ``e_hull_dft + e_form_pred - e_form_dft``) or
   from a pymatgen ``PhaseDiagram`` (or ``PatchedPhaseDiagram``) of reference entries.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np

__all__ = ["ENERGY_SCALES", "elemental_reference_energies", "formation_energy_per_atom", "mp2020_corrected_energy",
           "energy_on_mp2020_scale", "hull_distance_benchmark", "hull_distance_from_phase_diagram",
           "ELEMENTAL_REFERENCES_PATH", "mp_vasp_parameters"]

#: energy scales a model can be trained on: "raw" (uncorrected MP-style VASP), "mp2020" (MP2020-corrected),
#: "own" (another DFT setting, e.g. MatPES: needs fitted references, :mod:`matkit.discovery.references`)
ENERGY_SCALES = ("raw", "mp2020", "own")

ELEMENTAL_REFERENCES_PATH = Path(__file__).resolve().parent / "data" / "2023-02-07-mp-elemental-reference-entries.json"

#: Hubbard U values (eV) of the Materials Project GGA+U calculations, applied in oxides and fluorides
MP_HUBBARD_U = {"Co": 3.32, "Cr": 3.7, "Fe": 5.3, "Mn": 3.9, "Mo": 4.38, "Ni": 6.2, "V": 3.25, "W": 6.2}


@lru_cache(maxsize=4)
def _load_references(path: str) -> Dict[str, float]:
    from pymatgen.entries.computed_entries import ComputedEntry

    with open(path) as handle:
        raw = json.load(handle)
    refs = {}
    for element, entry_dict in raw.items():
        entry = ComputedEntry.from_dict(entry_dict)
        refs[element] = entry.uncorrected_energy / entry.composition.num_atoms
    return refs


def elemental_reference_energies(path: Optional[Union[str, Path]] = None) -> Dict[str, float]:
    """Element symbol -> reference energy per atom (eV/atom) of the lowest-energy MP entry of the element.

    Default: the 2023-02-07 MP entries Matbench Discovery uses (shipped with matkit). ``path``: a JSON file of
    the same format (element -> ``ComputedEntry.as_dict()``) or of plain floats (element -> eV/atom).
    """
    path = Path(path) if path is not None else ELEMENTAL_REFERENCES_PATH
    if not path.is_file():
        raise FileNotFoundError(f"elemental reference file not found: {path}")
    with open(path) as handle:
        head = json.load(handle)
    if all(isinstance(v, (int, float)) for v in head.values()):
        return {str(k): float(v) for k, v in head.items()}
    return dict(_load_references(str(path)))


def _composition(obj):
    from pymatgen.core import Composition

    if isinstance(obj, Composition):
        return obj
    if hasattr(obj, "composition"):
        return obj.composition
    if hasattr(obj, "get_chemical_symbols"):  # ase.Atoms
        return Composition("".join(obj.get_chemical_symbols()))
    return Composition(obj)


def formation_energy_per_atom(composition, energy: float, references: Optional[Mapping[str, float]] = None) -> float:
    """``(E - sum_el n_el mu_el) / N`` in eV/atom.

    composition : pymatgen Composition / formula string / Structure / ase.Atoms.
    energy : total energy of that composition, eV (on the scale of the references: MP2020-corrected for the
        benchmark). references : element -> eV/atom (default: the MP elemental references).
    """
    comp = _composition(composition)
    refs = references if references is not None else elemental_reference_energies()
    missing = sorted(str(el) for el in comp.elements if str(el) not in refs)
    if missing:
        raise KeyError(f"no elemental reference energy for {missing} (composition {comp.formula})")
    n_atoms = comp.num_atoms
    if n_atoms <= 0:
        raise ValueError(f"empty composition {comp}")
    reference = sum(amount * refs[str(el)] for el, amount in comp.items())
    return float((energy - reference) / n_atoms)


def mp_vasp_parameters(composition) -> dict:
    """``ComputedEntry.parameters`` of an MP-style calculation of ``composition``: GGA+U with MP's U values for
    oxides/fluorides containing Co, Cr, Fe, Mn, Mo, Ni, V or W, GGA otherwise."""
    comp = _composition(composition)
    symbols = {str(el) for el in comp.elements}
    u_elements = symbols & set(MP_HUBBARD_U)
    if u_elements and symbols & {"O", "F"}:
        return {"run_type": "GGA+U", "is_hubbard": True,
                "hubbards": {el: MP_HUBBARD_U.get(el, 0.0) for el in sorted(symbols)}}
    return {"run_type": "GGA", "is_hubbard": False, "hubbards": {}}


def mp2020_corrected_energy(structure, energy: float, entry=None, compatibility=None) -> float:
    """Total energy (eV) after the MP2020 corrections.

    structure : pymatgen Structure (or ase.Atoms) of the relaxed cell. energy : its raw total energy, eV.
    entry : optional reference ``ComputedStructureEntry`` (or its dict) with the VASP parameters (the WBM
        entries in the benchmark); its energy and structure are replaced by ``energy`` and ``structure``, as
        upstream does. Without it an MP-style parameter set is assumed (:func:`mp_vasp_parameters`).
    Raises ``ValueError`` if the compatibility scheme rejects the entry.
    """
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    structure = _as_structure(structure)
    if entry is not None:
        if isinstance(entry, dict):
            entry = ComputedStructureEntry.from_dict(entry)
        parameters = dict(entry.parameters)
        data = dict(entry.data)
        entry_id = entry.entry_id
    else:
        parameters, data, entry_id = mp_vasp_parameters(structure.composition), {}, None
    work = ComputedStructureEntry(structure, float(energy), parameters=parameters, data=data, entry_id=entry_id)
    compatibility = compatibility or MaterialsProject2020Compatibility(check_potcar=False)
    processed = compatibility.process_entry(work, clean=True)
    if processed is None:
        raise ValueError(f"MaterialsProject2020Compatibility rejected {structure.composition.reduced_formula} "
                         f"(parameters {parameters})")
    return float(processed.energy)


def energy_on_mp2020_scale(structure, energy: float, energy_scale: str, entry=None) -> float:
    """Put a model's total energy on the MP2020-corrected scale: corrected if ``energy_scale == "raw"``,
    unchanged if the model was trained on corrected energies (``"mp2020"``, e.g. CHGNet)."""
    if energy_scale not in ENERGY_SCALES:
        raise ValueError(f"energy_scale must be one of {ENERGY_SCALES}, got {energy_scale!r}")
    if energy_scale == "own":
        raise ValueError("energies on a model's own scale cannot be put on the MP2020 scale by corrections: use "
                         "fitted reference energies (matkit.discovery.references)")
    if energy_scale == "mp2020":
        return float(energy)
    return mp2020_corrected_energy(structure, energy, entry=entry)


def hull_distance_benchmark(e_form_pred, e_form_dft, e_above_hull_dft):
    """Matbench Discovery's predicted hull distance against the fixed DFT hull (eV/atom, arrays broadcast):
    ``e_above_hull_dft + (e_form_pred - e_form_dft)``."""
    return np.asarray(e_above_hull_dft, float) + (np.asarray(e_form_pred, float) - np.asarray(e_form_dft, float))


def hull_distance_from_phase_diagram(phase_diagram, composition, energy: float) -> float:
    """Energy above the hull (eV/atom, negative below it) of ``energy`` (eV, total, same scale as the diagram's
    entries) for ``composition`` against ``phase_diagram``: a pymatgen ``PhaseDiagram`` /
    ``PatchedPhaseDiagram`` or a list of reference ``ComputedEntry`` objects to build one from."""
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.entries.computed_entries import ComputedEntry

    if isinstance(phase_diagram, (list, tuple)):
        phase_diagram = PhaseDiagram(list(phase_diagram))
    comp = _composition(composition)
    missing = sorted(str(el) for el in comp.elements if el not in set(phase_diagram.elements))
    if missing:
        raise KeyError(f"phase diagram has no entries for element(s) {missing}")
    entry = ComputedEntry(comp, float(energy))
    _, e_hull = phase_diagram.get_decomp_and_e_above_hull(entry, allow_negative=True)
    return float(e_hull)


def _as_structure(structure):
    if hasattr(structure, "lattice"):
        return structure
    if hasattr(structure, "get_positions"):
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_structure(structure)
    raise TypeError(f"expected pymatgen Structure or ase.Atoms, got {type(structure).__name__}")
