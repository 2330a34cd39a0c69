"""Energy scales, MP2020 corrections, formation energies and hull distances."""
import json

import numpy as np
import pytest
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.entries.computed_entries import ComputedStructureEntry

from matkit.discovery.energies import (ELEMENTAL_REFERENCES_PATH, elemental_reference_energies,
                                       energy_on_mp2020_scale, formation_energy_per_atom, hull_distance_benchmark,
                                       hull_distance_from_phase_diagram, mp2020_corrected_energy)


def test_elemental_references_match_the_shared_file():
    refs = elemental_reference_energies()
    assert len(refs) == 89
    # values quoted in shared/data/matbench_discovery/PROVENANCE.md (eV/atom)
    assert refs["Fe"] == pytest.approx(-8.4700, abs=5e-5)
    assert refs["Si"] == pytest.approx(-5.4253, abs=5e-5)
    assert refs["O"] == pytest.approx(-4.9467, abs=5e-5)
    raw = json.loads(ELEMENTAL_REFERENCES_PATH.read_text())
    assert all(d["correction"] == 0 for d in raw.values())


def test_formation_energy_from_references():
    refs = elemental_reference_energies()
    comp = Composition("Fe2O3")
    energy = 2 * refs["Fe"] + 3 * refs["O"] - 5 * 0.75  # 0.75 eV/atom below the elements
    assert formation_energy_per_atom(comp, energy) == pytest.approx(-0.75, abs=1e-12)
    assert formation_energy_per_atom("Si8", 8 * refs["Si"]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(KeyError, match=r"no elemental reference energy for \['Xe'\]"):
        formation_energy_per_atom("XeF2", -10.0, references={"F": -1.9})


def fe2o3():
    return Structure(Lattice.hexagonal(5.03, 13.7), ["Fe", "Fe", "O", "O", "O"],
                     [[0, 0, 0.355], [0, 0, 0.145], [0.306, 0, 0.25], [0, 0.306, 0.25], [0.694, 0.694, 0.25]])


def test_mp2020_corrections_match_published_values():
    # MP2020: oxide anion correction -0.687 eV per O, GGA/GGA+U mixing correction -2.256 eV per Fe
    raw = -40.0
    corrected = mp2020_corrected_energy(fe2o3(), raw)
    assert corrected - raw == pytest.approx(3 * -0.687 + 2 * -2.256, abs=1e-9)
    # models trained on corrected energies (CHGNet) are not corrected again
    assert energy_on_mp2020_scale(fe2o3(), raw, "mp2020") == raw
    assert energy_on_mp2020_scale(fe2o3(), raw, "raw") == pytest.approx(corrected, abs=1e-12)
    with pytest.raises(ValueError, match="energy_scale"):
        energy_on_mp2020_scale(fe2o3(), raw, "corrected")


def test_mp2020_uses_given_entry_parameters():
    # a GGA (no U) calculation of an Fe oxide is rejected by the MP2020 scheme, as in pymatgen
    entry = ComputedStructureEntry(fe2o3(), -1.0, parameters={"run_type": "GGA", "hubbards": {}})
    with pytest.raises(ValueError, match="rejected Fe2O3"):
        mp2020_corrected_energy(fe2o3(), -40.0, entry=entry.as_dict())
    # an intermetallic gets no correction
    alloy = Structure(Lattice.cubic(2.9), ["Fe", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert mp2020_corrected_energy(alloy, -12.0) == pytest.approx(-12.0, abs=1e-12)


def test_hull_distance_benchmark_formula():
    out = hull_distance_benchmark([-1.0, 0.2], [-1.1, 0.25], [0.05, 0.0])
    np.testing.assert_allclose(out, [0.15, -0.05], atol=1e-15)


def test_hull_distance_from_phase_diagram_binary():
    # A-B binary: elements at 0 eV/atom, AB at -1 eV/atom on the hull. A compound A3B (x_B = 1/4) lies on the
    # tie line A-AB at -0.5 eV/atom; giving it -0.4 eV/atom puts it 0.1 eV/atom above the hull.
    entries = [PDEntry("Li", 0.0), PDEntry("Na", 0.0), PDEntry("LiNa", -2.0)]
    assert hull_distance_from_phase_diagram(entries, "Li3Na", 4 * -0.4) == pytest.approx(0.1, abs=1e-10)
    # below the hull: negative
    pd_ = PhaseDiagram(entries)
    assert hull_distance_from_phase_diagram(pd_, "Li3Na", 4 * -0.6) == pytest.approx(-0.1, abs=1e-10)
    with pytest.raises(KeyError, match="no entries for element"):
        hull_distance_from_phase_diagram(pd_, "LiK", -1.0)
