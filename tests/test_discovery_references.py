"""Formation energies on a model's own scale (fitted references), hull distances from known entries, and the
stability CLI end to end with the bundled universal potential."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Composition

from matkit.cli import main as matkit_main
from matkit.discovery.energies import mp2020_corrected_energy
from matkit.discovery.hull import hull_distances, read_hull_entries
from matkit.discovery.references import ReferenceFit, cross_validated_formation_energies, fit_reference_energies

ROOT = Path(__file__).resolve().parent.parent
MP20_5 = ROOT / "tests" / "fixtures" / "data" / "mp20_val_5.csv"
FORMULAS = ["Na", "Cl2", "NaCl", "Na3Cl", "Fe", "O2", "FeO", "Fe2O3", "Fe3O4", "NaFeO2", "Na2O", "FeCl3", "NaClO4"]


def _synthetic(mu, u_fe=0.0, seed=0):
    """Compositions, 'model' total energies and target formation energies with E = N e_form + sum n mu (+ U term)."""
    rng = np.random.default_rng(seed)
    comps = [Composition(f) for f in FORMULAS]
    e_form = rng.uniform(-2.0, 0.0, len(comps))
    energies = []
    for comp, e in zip(comps, e_form):
        total = comp.num_atoms * e + sum(n * mu[str(el)] for el, n in comp.items())
        if "O" in {str(el) for el in comp.elements}:
            total += u_fe * comp["Fe"]
        energies.append(total)
    return comps, np.array(energies), e_form


def test_fit_recovers_known_chemical_potentials():
    mu = {"Na": -1.3, "Cl": -1.9, "Fe": -8.1, "O": -4.7}
    comps, energies, e_form = _synthetic(mu)
    fit = fit_reference_energies(comps, energies, e_form, regularization=1e-12)
    for el, value in mu.items():
        assert fit.elements[el] == pytest.approx(value, abs=1e-8)
    assert fit.fit_mae < 1e-9 and fit.n_fit == len(FORMULAS)
    for comp, energy, target in zip(comps, energies, e_form):
        assert fit.formation_energy(comp, energy) == pytest.approx(target, abs=1e-8)


def test_fitted_u_terms_capture_an_oxide_offset_that_plain_references_cannot():
    mu = {"Na": -1.3, "Cl": -1.9, "Fe": -8.1, "O": -4.7}
    comps, energies, e_form = _synthetic(mu, u_fe=-1.7)
    plain = fit_reference_energies(comps, energies, e_form, regularization=1e-12)
    with_u = fit_reference_energies(comps, energies, e_form, corrections="fitted-u", regularization=1e-12)
    assert plain.fit_mae > 0.05
    assert with_u.fit_mae < 1e-9 and with_u.u_terms == {"Fe": pytest.approx(-1.7, abs=1e-8)}
    assert with_u.formation_energy(Composition("FeCl3"), energies[FORMULAS.index("FeCl3")]) == \
        pytest.approx(e_form[FORMULAS.index("FeCl3")], abs=1e-8)  # no U term outside oxides/fluorides


def test_mp2020_choice_corrects_before_applying_the_references():
    from ase.build import bulk

    atoms = bulk("FeO", "rocksalt", a=4.3)
    fit = ReferenceFit(elements={"Fe": -8.0, "O": -5.0}, corrections="mp2020")
    expected = (mp2020_corrected_energy(atoms, -15.0) - (-8.0 - 5.0)) / 2
    assert fit.formation_energy(atoms, -15.0) == pytest.approx(expected, abs=1e-12)
    assert mp2020_corrected_energy(atoms, -15.0) != -15.0  # the oxide and U corrections did apply


def test_unknown_elements_and_bad_files_are_named(tmp_path):
    fit = ReferenceFit(elements={"Na": -1.0, "Cl": -2.0}, fitted_on="5 crystals", fit_mae=0.01)
    with pytest.raises(KeyError, match=r"\['K'\].*5 crystals"):
        fit.formation_energy(Composition("KCl"), -5.0)
    path = fit.save(tmp_path / "refs.json")
    assert ReferenceFit.load(path) == fit
    (tmp_path / "other.json").write_text(json.dumps({"Na": -1.0}))
    with pytest.raises(ValueError, match="not a matkit reference-energy file"):
        ReferenceFit.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="corrections must be one of"):
        fit_reference_energies([Composition("Na")], [-1.0], [0.0], corrections="u")


def test_cross_validation_predicts_held_out_folds():
    mu = {"Na": -1.3, "Cl": -1.9, "Fe": -8.1, "O": -4.7}
    comps, energies, e_form = _synthetic(mu)
    comps, energies, e_form = comps * 3, np.tile(energies, 3), np.tile(e_form, 3)
    predicted = cross_validated_formation_energies(comps, energies, e_form, folds=3, regularization=1e-12)
    np.testing.assert_allclose(predicted, e_form, atol=1e-7)


def test_hull_distances_hand_worked(tmp_path):
    """Li-O: elements at 0, Li2O at -2.0 eV/atom (x_O = 1/3), Li2O2 at -1.6 (x_O = 1/2). LiO2 (x_O = 2/3) predicted
    at -1.0: the hull there runs from Li2O2 (-1.6 at 1/2) to O (0 at 1): -1.6 + (1/6)/(1/2) * 1.6 = -1.0667, so
    +0.0667 above. Li2O2 itself, predicted at -1.5 with its own entry left out: the hull between Li2O and O at
    x_O = 1/2 is -2.0 * (1/2)/(2/3) = -1.5, so exactly on it."""
    labels = pd.DataFrame({"material_id": ["mp-a", "mp-b"], "formation_energy_per_atom": [-2.0, -1.6],
                           "e_above_hull": [0.0, 0.0], "pretty_formula": ["Li2O", "Li2O2"]})
    labels.to_csv(tmp_path / "entries.csv", index=False)
    entries = read_hull_entries(tmp_path / "entries.csv")
    out = hull_distances(entries, pd.Series({"new": "LiO2", "mp-b": "Li2O2", "x": "LiF"}),
                         pd.Series({"new": -1.0, "mp-b": -1.5, "x": -3.0}))
    assert out.loc["new", "e_above_hull_pred"] == pytest.approx(-1.0 + 1.6 - (1 / 3) * 1.6, abs=1e-9)
    assert out.loc["mp-b", "e_above_hull_pred"] == pytest.approx(0.0, abs=1e-9)
    assert out.loc["mp-b", "note"] == "own entry left out of the hull"
    # LiF: no F-containing entries, so its hull is Li + F at 0
    assert out.loc["x", "e_above_hull_pred"] == pytest.approx(-3.0, abs=1e-9)


def test_hull_entries_from_a_pymatgen_json(tmp_path):
    from pymatgen.entries.computed_entries import ComputedEntry

    from matkit.discovery.energies import elemental_reference_energies

    mu = elemental_reference_energies()
    entry = ComputedEntry("Li2O", 2 * mu["Li"] + mu["O"] - 3 * 2.0, entry_id="mp-1960")
    (tmp_path / "mp.json").write_text(json.dumps([entry.as_dict()]))
    (pd_entry,) = read_hull_entries(tmp_path / "mp.json")
    assert pd_entry.name == "mp-1960" and pd_entry.energy == pytest.approx(-6.0, abs=1e-9)
    (tmp_path / "bad.json").write_text(json.dumps([{"entry_id": "mp-x", "energy": 1.0}]))
    with pytest.raises(ValueError, match="entry 0 \\(mp-x\\)"):
        read_hull_entries(tmp_path / "bad.json")


def test_stability_cli_with_the_universal_potential(tmp_path, capsys):
    """run -c <bundled name> -> fit-references -> metrics --references -> hull, on 5 MP-20 crystals."""
    run_dir = tmp_path / "run"
    assert matkit_main(["discovery", "run", str(MP20_5), "-c", "tensornet-matpes-pbe", "-o", str(run_dir),
                        "--no-progress"]) == 0
    records = [json.loads(line) for p in run_dir.glob("shard-*.jsonl") for line in p.read_text().splitlines()]
    assert len(records) == 5 and all(r["status"] == "ok" and r["energy_scale"] == "own" for r in records)
    assert all(r["e_form_per_atom"] is None and "fit reference energies" in r["note"] for r in records)
    refs = tmp_path / "refs.json"
    assert matkit_main(["discovery", "fit-references", str(run_dir), "-l", str(MP20_5), "-o", str(refs),
                        "--corrections", "none"]) == 0
    fit = ReferenceFit.load(refs)
    assert fit.n_fit == 5 and fit.corrections == "none"
    capsys.readouterr()
    assert matkit_main(["discovery", "metrics", str(run_dir), "-l", str(MP20_5), "--references", str(refs)]) == 0
    out = capsys.readouterr().out
    assert "outlier mask 5.0 eV/atom: 0 masked" in out and "rounding to 3 decimals" in out
    hull_csv = tmp_path / "hull.csv"
    assert matkit_main(["discovery", "hull", str(run_dir), "-e", str(MP20_5), "--references", str(refs),
                        "-o", str(hull_csv)]) == 0
    hull = pd.read_csv(hull_csv, index_col=0)
    assert len(hull) == 5 and hull["e_above_hull_pred"].notna().all()
    assert (hull["note"] == "own entry left out of the hull").all()
    capsys.readouterr()
    assert matkit_main(["discovery", "run", str(MP20_5), "-c", "no-such-potential", "-o", str(tmp_path / "x"),
                        "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no-such-potential" in err and "bundled potential" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "run.json").exists()


def test_l1_fit_ignores_a_gross_outlier_that_least_squares_spreads():
    mu = {"Na": -1.3, "Cl": -1.9, "Fe": -8.1, "O": -4.7}
    comps, energies, e_form = _synthetic(mu)
    comps, energies, e_form = comps * 2, np.tile(energies, 2), np.tile(e_form, 2)
    energies[3] += 5.0 * comps[3].num_atoms  # one material 5 eV/atom off (Na3Cl)
    l2 = fit_reference_energies(comps, energies, e_form, regularization=1e-12)
    l1 = fit_reference_energies(comps, energies, e_form, regularization=1e-12, loss="l1")
    assert max(abs(l2.elements[el] - v) for el, v in mu.items()) > 0.1
    for el, value in mu.items():
        assert l1.elements[el] == pytest.approx(value, abs=1e-4)
    assert l1.loss == "l1" and ReferenceFit(**{**l1.__dict__}).loss == "l1"
