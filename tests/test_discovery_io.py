"""Prediction files, labels and structure readers in the Matbench Discovery formats."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from matkit.discovery.io import read_labels, read_predictions, read_structures, write_predictions
from matkit.discovery.runner import read_records

FIXTURES = Path(__file__).parent / "fixtures" / "discovery"
# upstream matbench-discovery test fixture (MIT), copied from ../shared/data/matbench_discovery
SHARED_MOCK = Path(__file__).resolve().parent / "fixtures" / "discovery" / "mock-wbm-energy-preds.csv.gz"


def test_prediction_file_round_trip(tmp_path):
    e_form = pd.Series([0.51212345, np.nan, -1.25], index=["wbm-1-1", "wbm-1-2", "wbm-1-3"])
    energy = pd.Series([-43.2, -25.9, -35.1], index=e_form.index)
    path = write_predictions(tmp_path / "preds.csv.gz", e_form, "mymodel", energy=energy, decimals=4)
    df = pd.read_csv(path)
    assert list(df.columns) == ["material_id", "mymodel_energy", "e_form_per_atom_mymodel"]
    back = read_predictions(path)
    assert back.name == "e_form_per_atom_mymodel"
    assert back["wbm-1-1"] == 0.5121 and np.isnan(back["wbm-1-2"]) and back["wbm-1-3"] == -1.25


def test_reads_upstream_mock_predictions():
    preds = read_predictions(SHARED_MOCK)
    assert len(preds) == 499 and preds.name == "formation_energy_per_atom"
    assert preds["wbm-1-1"] == pytest.approx(0.5505)


def test_prediction_file_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"material_id": ["a", "a"], "e_form_per_atom_x": [0.1, 0.2]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="duplicate material ids"):
        read_predictions(bad)
    pd.DataFrame({"material_id": ["a"], "e_form_per_atom_x": [0.1],
                  "e_form_per_atom_y": [0.2]}).to_csv(bad, index=False)
    with pytest.raises(KeyError, match="cannot tell the formation-energy column"):
        read_predictions(bad)
    assert read_predictions(bad, column="e_form_per_atom_y")["a"] == 0.2


def test_labels_wbm_summary_and_mp20():
    wbm = read_labels(FIXTURES / "wbm-summary-mini.csv.gz")
    assert wbm.index[0] == "wbm-1-1" and wbm["unique_prototype"].dtype == bool
    assert (wbm["e_above_hull_mp2020_corrected_ppd_mp"] == 0).sum() == 3  # ties at 0 in the fixture
    mp = read_labels(FIXTURES / "mp20-mini.csv")
    raw = pd.read_csv(FIXTURES / "mp20-mini.csv")
    np.testing.assert_array_equal(mp["e_form_per_atom_mp2020_corrected"], raw["formation_energy_per_atom"])
    assert "unique_prototype" not in mp


def test_structure_readers(tmp_path):
    pairs = read_structures(FIXTURES / "mp20-mini.csv", limit=3)
    assert [m for m, _ in pairs] == pd.read_csv(FIXTURES / "mp20-mini.csv").material_id[:3].tolist()
    from ase.io import write

    atoms = [a.copy() for _, a in pairs]
    for k, a in enumerate(atoms):
        a.info["material_id"] = f"x-{k}"
    write(tmp_path / "s.extxyz", atoms)
    back = read_structures(tmp_path / "s.extxyz")
    assert [m for m, _ in back] == ["x-0", "x-1", "x-2"]
    np.testing.assert_allclose(back[1][1].cell.array, pairs[1][1].cell.array)
    with pytest.raises(ValueError, match="unknown structures format"):
        read_structures(FIXTURES / "make_fixtures.py")
    with pytest.raises(FileNotFoundError):
        read_structures(tmp_path / "nope.csv")


def test_truncated_last_record_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "shard.jsonl"
    path.write_bytes(b'{"material_id": "a"}\n{"material_id": "b"}\n{"material_id": "c", "ener')
    assert [r["material_id"] for r in read_records(path)] == ["a", "b"]
    assert path.read_bytes().endswith(b'"ener')  # reading alone does not modify the file
    read_records(path, repair=True)
    assert path.read_bytes() == b'{"material_id": "a"}\n{"material_id": "b"}\n'
