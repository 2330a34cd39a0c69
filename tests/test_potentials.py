"""Bundled potentials: each loads by name, and re-evaluating it on its held-out validation split reproduces the
errors its model card states (``val_errors.json``, written by ``potentials/publish.py``).

This ties the published numbers to the current code: a change in a model's numerics, in the checkpoint loader or in
the data pipeline that alters the predictions of a trained potential fails here.
"""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule

from matkit.calculator import MatkitCalculator
from matkit.cli import main as matkit_main

ROOT = Path(__file__).resolve().parent.parent
POTENTIALS = sorted(p.parent.name for p in (ROOT / "potentials").glob("*/model.pt"))
#: potentials trained here (their cards state validation errors); the others are imported (tests/test_matgl_import.py)
TRAINED = sorted(p.parent.name for p in (ROOT / "potentials").glob("*/val_errors.json"))


def test_every_architecture_is_bundled_on_si_and_acetylacetone():
    for arch in ("tensornet", "escn", "faenet", "gaunt_mace"):
        assert f"{arch}-si" in POTENTIALS and f"{arch}-acac" in POTENTIALS


def test_readme_table_states_each_cards_validation_errors():
    """The README's table of bundled potentials shows every potential, with the errors its card's
    ``val_errors.json`` holds (energy MAE in meV/atom to 2 decimals, force MAE in meV/Å to 1 decimal)."""
    readme = (ROOT / "README.md").read_text()
    rows = dict((m[0], m[1:]) for m in re.findall(r"^\| `([\w-]+)` \| \w+ \| `[\w.]+` \| ([\d.]+) \| ([\d.]+) \|$",
                                                readme, flags=re.MULTILINE))
    assert sorted(rows) == TRAINED
    for name, (energy, forces) in rows.items():
        metrics = json.loads((ROOT / "potentials" / name / "val_errors.json").read_text())["metrics"]
        assert (energy, forces) == (f"{metrics['energy_mae'] * 1000:.2f}", f"{metrics['forces_mae'] * 1000:.1f}"), name


def evaluate_float64(model, dataset, tmp_path, *options):
    """``matkit evaluate MODEL DATASET --dtype float64 [options]``: the JSON it writes, as a dict."""
    out = tmp_path / "errors.json"
    rc = matkit_main(["evaluate", str(model), str(dataset), "--dtype", "float64", "--json", str(out),
                      "--no-progress", *options])
    assert rc == 0
    return json.loads(out.read_text())


def assert_same_errors(result, card):
    """``result`` (a fresh ``matkit evaluate --json``) reproduces the stated ``card`` errors."""
    assert result["structures"] == card["structures"]
    for key, value in card["metrics"].items():
        if value is None:
            assert result["metrics"][key] is None, key
        else:
            assert result["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_every_bundled_potential_is_trained_here_or_imported():
    imported = sorted(set(POTENTIALS) - set(TRAINED))
    assert imported == ["tensornet-matpes-pbe", "tensornet-matpes-r2scan"]


@pytest.mark.parametrize("name", TRAINED)
def test_validation_errors_match_the_model_card(name, tmp_path):
    folder = ROOT / "potentials" / name
    card = json.loads((folder / "val_errors.json").read_text())
    dataset = ROOT / "datasets" / Path(card["dataset"]).name
    assert_same_errors(evaluate_float64(folder / "model.pt", dataset, tmp_path, "--split", "val"), card)


TESTED = [(p.parent.name, i) for p in sorted((ROOT / "potentials").glob("*/test_errors.json"))
          for i in range(len(json.loads(p.read_text())))]


@pytest.mark.parametrize("name,index", TESTED)
def test_test_set_errors_match_the_model_card(name, index, tmp_path):
    """The errors on data never used in training (``publish.py --test``) are reproduced from ``model.pt``."""
    folder = ROOT / "potentials" / name
    card = json.loads((folder / "test_errors.json").read_text())[index]
    train_dataset = json.loads((folder / "val_errors.json").read_text())["dataset"]
    assert Path(card["dataset"]).name != Path(train_dataset).name
    assert_same_errors(evaluate_float64(folder / "model.pt", ROOT / card["dataset"], tmp_path), card)


def load_publish():
    """``potentials/publish.py`` (a script, not a package module) imported for its helpers."""
    spec = importlib.util.spec_from_file_location("publish", ROOT / "potentials" / "publish.py")
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    return publish


def test_publish_takes_the_training_sentence_from_the_run_log_else_from_the_card(tmp_path):
    """Republishing without the run folder (``--run`` with a copy of ``model.pt``) keeps what the card said."""
    publish = load_publish()
    folder = tmp_path / "card"
    folder.mkdir()
    (folder / "README.md").write_text("| training | best checkpoint after epoch 230, EMA weights; a CPU. "
                                      "finished after 230 epochs, 6670 steps; best validation loss 0.0138661 |\n"
                                      "| forces | ... |\n")
    assert (publish.finished_sentence(tmp_path, folder)
            == "finished after 230 epochs, 6670 steps; best validation loss 0.0138661")
    assert publish.finished_sentence(tmp_path, tmp_path / "no-card") == ""
    (tmp_path / "train.log").write_text("12:00:00 INFO epoch 5 ...\n12:00:01 INFO finished after 5 epochs, 10 steps; "
                                        "best validation loss 0.5; checkpoints in runs/x\n")
    assert publish.finished_sentence(tmp_path, folder) == "finished after 5 epochs, 10 steps; best validation loss 0.5"


@pytest.mark.parametrize("name", POTENTIALS)
def test_bundled_potential_runs_in_ase_float32_and_float64(name):
    """From the name alone: energy, forces and (crystals) stress are finite, and float32 agrees with float64."""
    calc64 = MatkitCalculator.from_pretrained(name, dtype="float64")
    species = calc64.model.species
    if 6 in species:                                           # the molecule potentials
        atoms = molecule("CH3COCH3")
        atoms.center(vacuum=4.0)
        props = ["energy", "forces"]
    else:
        from ase.data import chemical_symbols, reference_states

        symbol = chemical_symbols[species[0]]
        state = reference_states[species[0]]
        atoms = bulk(symbol, state["symmetry"], a=state["a"], cubic=True)
        atoms.rattle(0.05, seed=1)
        props = ["energy", "forces", "stress"]
    results = {}
    for dtype, calc in (("float64", calc64), ("float32", MatkitCalculator.from_pretrained(name, dtype="float32"))):
        calc.calculate(atoms, props)
        results[dtype] = {k: np.asarray(calc.results[k]) for k in props}
        assert all(np.isfinite(v).all() for v in results[dtype].values())
    n = len(atoms)
    assert abs(results["float32"]["energy"] - results["float64"]["energy"]) / n < 1e-4
    np.testing.assert_allclose(results["float32"]["forces"], results["float64"]["forces"], atol=1e-3)


def test_publish_names_the_first_stage_start_of_a_multi_stage_training(tmp_path):
    """A later stage warm-restarts from the stage before it: the card names where the first stage started."""
    publish = load_publish()
    final = {"finetune": {"from_checkpoint": "runs/potentials/x-stage1/best.pt"}}
    (tmp_path / "stage1.yaml").write_text("model: {name: tensornet}\n")
    assert publish.training_start([tmp_path / "stage1.yaml"], final) is None           # stage 1 from scratch
    (tmp_path / "stage1.yaml").write_text("finetune: {from_checkpoint: tensornet-matpes-pbe}\n")
    assert publish.training_start([tmp_path / "stage1.yaml"], final) == "tensornet-matpes-pbe"
    assert publish.training_start([], final) == "runs/potentials/x-stage1/best.pt"     # one stage: its own start
    assert publish.training_start([], {"model": {"name": "tensornet"}}) is None
