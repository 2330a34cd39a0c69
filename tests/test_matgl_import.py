"""matgl TensorNet import (:mod:`matkit.convert.matgl`) and the bundled ``tensornet-matpes-*`` universal potentials.

References are matgl's own outputs, stored as fixtures (written by ``benchmarks/tensornet_vs_matgl.py --fixture``
and ``tests/fixtures/matgl/make_tiny_models.py`` in matgl's venvs), so CI checks parity without matgl:

* ``matpes_reference.npz``: matgl 2.0.6 (the release whose TensorNet convention the MatPES v2025.1 weights were
  trained with) on 33 structures, both potentials, float32 and float64;
* ``tiny_v1/``, ``tiny_v2/``: small random matgl potentials saved by matgl 2.0.6 (TensorNet ``@model_version`` 1)
  and matgl 4.1.2 (version 2), with matgl's float64 energies, forces and stresses.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

import matkit
from matkit.calculator import MatkitCalculator
from matkit.convert.matgl import MatglImportError, load_matgl_tensornet, read_matgl_potential
from model_harness import ModelHarness

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "matgl"
POTENTIALS = ["tensornet-matpes-pbe", "tensornet-matpes-r2scan"]
#: the issue's parity targets for float32; float64 must agree to round-off
TOLERANCES = {"float32": (1e-5, 1e-4, 1e-5), "float64": (1e-11, 1e-10, 1e-11)}  # E/atom, F, stress


def _reference():
    return np.load(FIXTURES / "matpes_reference.npz", allow_pickle=False)


def _atoms(ref, name, pbc=True):
    return Atoms(numbers=ref[f"{name}/numbers"], positions=ref[f"{name}/positions"], cell=ref[f"{name}/cell"],
                 pbc=pbc)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", POTENTIALS)
def test_bundled_potential_matches_matgl(name, precision):
    """From the bundled name, offline: energies, forces and stresses of 33 structures (24 MP-20 crystals, a
    slab, a vacancy supercell, a strained cell, a compressed metal, a molecule in a box, Si64, a lone atom in a box
    and a lone atom beside H2: nodes without edges) as matgl gives."""
    ref = _reference()
    assert str(ref["matgl_version"]) == "2.0.6"
    calc = MatkitCalculator.from_pretrained(name, dtype=precision)
    tol_e, tol_f, tol_s = TOLERANCES[precision]
    names = [str(s) for s in ref["structure_names"]]
    assert {"Ge-atom-in-box", "Li-atom-beside-H2"} <= set(names)
    assert len(names) >= 30 and len({z for s in names for z in ref[f"{s}/numbers"]}) >= 50
    for structure in names:
        atoms = _atoms(ref, structure, pbc=ref[f"{structure}/pbc"])
        atoms.calc = calc
        key = f"{name}/{precision}/{structure}"
        assert abs(atoms.get_potential_energy() - ref[f"{key}/energy"]) / len(atoms) < tol_e, structure
        np.testing.assert_allclose(atoms.get_forces(), ref[f"{key}/forces"], rtol=0, atol=tol_f, err_msg=structure)
        np.testing.assert_allclose(atoms.get_stress(), ref[f"{key}/stress"], rtol=0, atol=tol_s, err_msg=structure)


@pytest.mark.parametrize("version", [1, 2])
def test_tiny_matgl_models_of_both_conventions_match(version):
    """Random matgl potentials saved by matgl 2.0.6 (version 1) and 4.1.2 (version 2): float64 round-off."""
    folder = FIXTURES / f"tiny_v{version}"
    assert json.loads((folder / "model.json").read_text())["kwargs"]["model"]["@model_version"] == version
    ref = np.load(folder / "reference.npz", allow_pickle=False)
    calc = MatkitCalculator(load_matgl_tensornet(folder), dtype="float64")
    for name in ("SiCFe8", "FeOHSi16-strained", "ethanol-in-box"):
        atoms = _atoms(ref, name)
        atoms.calc = calc
        scale_f = np.abs(ref[f"{name}/forces"]).max()
        assert scale_f > 1e-3  # the comparison below is not trivially satisfied
        assert abs(atoms.get_potential_energy() - ref[f"{name}/energy"]) < 1e-12 * abs(ref[f"{name}/energy"])
        np.testing.assert_allclose(atoms.get_forces(), ref[f"{name}/forces"], rtol=0, atol=1e-12 * scale_f)
        np.testing.assert_allclose(atoms.get_stress(), ref[f"{name}/stress"], rtol=0,
                                   atol=1e-12 * np.abs(ref[f"{name}/stress"]).max())


def test_the_two_conventions_differ_on_mixed_structures():
    """Loading version-1 weights as if they were version 2 (what matgl >= 3.0 does) changes mixed-element
    energies: the version switch in the importer is not a no-op."""
    folder = FIXTURES / "tiny_v1"
    config, state = read_matgl_potential(folder)
    config["kwargs"]["model"]["@model_version"] = 2
    from matkit.convert.matgl import tensornet_from_matgl_state

    ref = np.load(folder / "reference.npz", allow_pickle=False)
    wrong = MatkitCalculator(tensornet_from_matgl_state(config, state), dtype="float64")
    atoms = _atoms(ref, "FeOHSi16-strained")
    atoms.calc = wrong
    assert abs(atoms.get_potential_energy() - ref["FeOHSi16-strained/energy"]) > 1e-6


def test_potential_card_and_checkpoint():
    for name in POTENTIALS:
        folder = ROOT / "potentials" / name
        payload = matkit.checkpoint.read_checkpoint(folder / "model.pt")
        assert payload["model"] == "tensornet" and len(payload["species"]) == 89
        hp = payload["hparams"]
        assert (hp["radial_basis"], hp["self_loops"], hp["readout"]) == ("smooth_bessel", False, "gated")
        assert "BSD" in (folder / "LICENSE.matgl.txt").read_text()
        card = (folder / "README.md").read_text().lower()
        for needed in ("bsd-3-clause", "matpes", "energy scale", "matgl 2.0.6", "parity", "speed"):
            assert needed in card, (name, needed)


def _matgl_source():
    folder = Path(os.environ.get("MATKIT_MATGL_MODELS", ROOT.parent / "shared" / "data" / "matgl_tensornet_matpes"))
    return folder if folder.is_dir() else None


@pytest.mark.skipif(_matgl_source() is None, reason="matgl weights not here ($MATKIT_MATGL_MODELS)")
@pytest.mark.parametrize("name,folder", [("tensornet-matpes-pbe", "TensorNet-MatPES-PBE-v2025.1-PES"),
                                         ("tensornet-matpes-r2scan", "TensorNet-MatPES-r2SCAN-v2025.1-PES")])
def test_bundled_checkpoint_is_the_conversion_of_the_source(name, folder):
    fresh = load_matgl_tensornet(_matgl_source() / folder, dtype=torch.float32).state_dict()
    bundled = matkit.load_checkpoint(ROOT / "potentials" / name / "model.pt").state_dict()
    assert fresh.keys() == bundled.keys()
    for key in fresh:
        assert torch.equal(fresh[key], bundled[key]), key


def test_convert_command_writes_a_checkpoint(tmp_path):
    from matkit.convert.matgl import _main

    out = tmp_path / "tiny.pt"
    assert _main([str(FIXTURES / "tiny_v1"), str(out), "--dtype", "float64"]) == 0
    loaded, direct = matkit.load_checkpoint(out), load_matgl_tensornet(FIXTURES / "tiny_v1")
    ref = np.load(FIXTURES / "tiny_v1" / "reference.npz", allow_pickle=False)
    atoms = _atoms(ref, "SiCFe8")
    energies = []
    for model in (loaded, direct):
        atoms.calc = MatkitCalculator(model, dtype="float64")
        energies.append(atoms.get_potential_energy())
    assert energies[0] == energies[1]


# ---- refusals: unsupported settings and broken files name the cause -------------------------------------------
def _edited_copy(tmp_path, edit_config=None, edit_state=None):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny_v2", folder)
    config, state = read_matgl_potential(folder)
    if edit_config:
        edit_config(config)
        (folder / "model.json").write_text(json.dumps(config))
    if edit_state:
        edit_state(state)
        torch.save(state, folder / "state.pt")
    return folder


def _set(path, value):
    def edit(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


ARGS = ("kwargs", "model", "init_args")


@pytest.mark.parametrize("edit,message", [
    (_set(ARGS + ("use_smooth",), False), "smooth spherical Bessel"),
    (_set(ARGS + ("rbf_type",), "Gaussian"), "rbf_type='Gaussian'"),
    (_set(ARGS + ("is_intensive",), True), "is_intensive"),
    (_set(ARGS + ("activation_type",), "softexp"), "activation_type='softexp'"),
    (_set(ARGS + ("include_state",), True), "state"),
    (_set(ARGS + ("equivariance_invariance_group",), "SO(3)"), "SO(3)"),
    (_set(("kwargs", "calc_repuls"), True), "ZBL"),
    (_set(("kwargs", "model", "@model_version"), 3), "@model_version=3"),
    (_set(("kwargs", "model", "@class"), "M3GNet"), "M3GNet"),
    (_set(("@class",), "ModelWithCharge"), "not a matgl Potential"),
    (_set(ARGS + ("element_types",), ["H", "C", "O", "Si", "Xx"]), "Xx"),
])
def test_unsupported_settings_are_refused(tmp_path, edit, message):
    folder = _edited_copy(tmp_path, edit_config=edit)
    with pytest.raises(MatglImportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_matgl_tensornet(folder)


def test_state_problems_are_refused(tmp_path):
    folder = _edited_copy(tmp_path, edit_state=lambda s: s.__setitem__("data_mean", torch.tensor(0.5)))
    with pytest.raises(MatglImportError, match="data_mean=0.5"):
        load_matgl_tensornet(folder)
    folder = _edited_copy(tmp_path / "b", edit_state=lambda s: s.__setitem__("model.extra.weight", torch.ones(2)))
    with pytest.raises(MatglImportError, match="does not map.*model.extra.weight"):
        load_matgl_tensornet(folder)
    folder = _edited_copy(tmp_path / "c", edit_state=lambda s: s.pop("model.linear.bias"))
    with pytest.raises(MatglImportError, match="lacks 'model.linear.bias'"):
        load_matgl_tensornet(folder)
    folder = _edited_copy(tmp_path / "d", edit_config=_set(ARGS + ("units",), 16))
    with pytest.raises(MatglImportError, match="shapes do not match"):
        load_matgl_tensornet(folder)


class _Code:
    def __reduce__(self):
        return (print, ("this would run",))


def test_broken_or_unsafe_files_are_refused(tmp_path):
    with pytest.raises(MatglImportError, match="not found"):
        load_matgl_tensornet(tmp_path / "nowhere")
    folder = _edited_copy(tmp_path)
    (folder / "model.json").write_text("{not json")
    with pytest.raises(MatglImportError, match="model.json: not valid JSON"):
        load_matgl_tensornet(folder)
    folder = _edited_copy(tmp_path / "b")
    (folder / "state.pt").write_bytes((folder / "state.pt").read_bytes()[:1000])
    with pytest.raises(MatglImportError, match="state.pt: corrupt or truncated"):
        load_matgl_tensornet(folder)
    folder = _edited_copy(tmp_path / "c")
    torch.save({"payload": _Code()}, folder / "state.pt")
    with pytest.raises(MatglImportError, match="refusing to load"):
        load_matgl_tensornet(folder)
    folder = _edited_copy(tmp_path / "d")
    (folder / "state.pt").unlink()
    with pytest.raises(MatglImportError, match="state.pt is missing"):
        load_matgl_tensornet(folder)


# ---- the model harness on the imported universal potential -----------------------------------------------------
class TestImportedMatPESHarness(ModelHarness):
    """The shared harness (invariance, FD forces and stress, smoothness, batching, isolated atoms) on the bundled
    ``tensornet-matpes-pbe`` weights themselves, not a random stand-in."""

    model_name = "tensornet"
    cutoff = 5.0

    def make_model(self, dtype=torch.float64):
        return matkit.load_checkpoint(ROOT / "potentials" / "tensornet-matpes-pbe" / "model.pt").to(dtype).eval()

    def test_unknown_element_is_rejected(self):
        model = self.make_model(torch.float64)
        atoms = Atoms(numbers=[14, 84], positions=[[0, 0, 0], [2.0, 0, 0]])
        with pytest.raises(ValueError, match="Po"):
            self.evaluate(model, atoms, torch.float64)


# ---- matgl itself, live (its own venv) ---------------------------------------------------------------------------
@pytest.mark.peers
@pytest.mark.skipif(not os.environ.get("MATKIT_MATGL_PYTHON") or _matgl_source() is None,
                    reason="needs $MATKIT_MATGL_PYTHON (a matgl 2.0.6 venv) and the matgl weights")
def test_matches_matgl_live(tmp_path):
    spec = importlib.util.spec_from_file_location("tensornet_vs_matgl", ROOT / "benchmarks" / "tensornet_vs_matgl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=5.6, cubic=True)
    atoms.rattle(0.05, seed=0)
    structs = [("NaCl8", atoms.numbers.tolist(), atoms.positions.tolist(), atoms.cell.array.tolist(), [True] * 3)]
    folders = {"tensornet-matpes-pbe": str(_matgl_source() / "TensorNet-MatPES-PBE-v2025.1-PES")}
    reference = bench.run_peer(os.environ["MATKIT_MATGL_PYTHON"], tmp_path,
                               {"models": folders, "structures": structs, "dft_frames": []})
    rows = bench.differences(MatkitCalculator.from_pretrained("tensornet-matpes-pbe", dtype="float64"), structs,
                             reference, "tensornet-matpes-pbe/float64")
    assert max(rows["NaCl8"]) < 1e-9
