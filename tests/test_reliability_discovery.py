"""Bad input in the calculator and the stability runs: clear errors naming the structure, one bad structure
never stops the others, nothing unphysical or unconverged reaches a predictions file unflagged, runs cannot be
mixed up or outlived by their workers."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ase.build import bulk

import matkit
from matkit.calculator import MatkitCalculator
from matkit.checkpoint import save_checkpoint
from matkit.cli import main as matkit_main
from matkit.discovery.batched_relax import BatchedRelaxer, RelaxFailure
from matkit.discovery.io import StructureError, read_structures
from matkit.discovery.relax import RelaxSettings
from matkit.discovery.runner import _RunLock, merge_records, run

ROOT = Path(__file__).resolve().parent.parent
MP20 = ROOT / "tests" / "fixtures" / "discovery" / "mp20-mini.csv"


@pytest.fixture(scope="module")
def lj():
    return matkit.build("lj", sigma=2.0, epsilon=0.05, rc=5.0, smooth=True)


@pytest.fixture(scope="module")
def lj_checkpoint(tmp_path_factory, lj):
    path = tmp_path_factory.mktemp("ckpt") / "lj.pt"
    save_checkpoint(lj, path, metadata={"energy_scale": "mp2020"})
    return str(path)


def _crystals():
    return [bulk("Cu", "fcc", a=3.7, cubic=True), bulk("Al", "fcc", a=4.1, cubic=True), bulk("Na", "bcc", a=4.3)]


# ---- calculator ------------------------------------------------------------------------------------------------
def test_coincident_atoms_are_an_error_naming_them_not_nan():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.positions[5] = atoms.positions[2] + [0.0, 0.0, 1e-6]
    atoms.calc = MatkitCalculator.from_pretrained("tensornet-si")
    with pytest.raises(ValueError, match=r"atoms 2 and 5 are 0\.000 Å apart"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-4), ("float64", 1e-8)])
def test_atoms_far_from_the_origin_keep_their_precision(dtype, tol):
    """float32 has ~0.06 Å resolution at 1e6 Å: positions are wrapped and centred in float64 before the cast."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=0)
    far = atoms.copy()
    far.positions += 1.0e6
    far.positions[3] += 7 * far.cell[0] - 3 * far.cell[2]
    out = []
    for a in (atoms, far):
        a.calc = MatkitCalculator.from_pretrained("tensornet-si", dtype=dtype)
        out.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    assert abs(out[0][0] - out[1][0]) < tol * len(atoms)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=0, atol=tol * 10)
    np.testing.assert_allclose(out[1][2], out[0][2], rtol=0, atol=tol)


# ---- batched relaxer ---------------------------------------------------------------------------------------------
def test_batched_relaxer_fails_only_the_bad_structures(lj):
    good = _crystals()
    coincident = bulk("Cu", "fcc", a=3.7, cubic=True)
    coincident.positions[1] = coincident.positions[0]
    nan_positions = bulk("Cu", "fcc", a=3.7, cubic=True)
    nan_positions.positions[2, 1] = np.nan
    structures = [good[0], coincident, good[1], nan_positions, good[2]]
    relaxer = BatchedRelaxer(lj, RelaxSettings(max_steps=50))
    outcomes = dict(relaxer.irelax(structures, errors="yield"))
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    assert isinstance(outcomes[1], RelaxFailure) and "atoms 0 and 1" in str(outcomes[1])
    assert isinstance(outcomes[3], RelaxFailure) and "NaN" in str(outcomes[3]) and outcomes[3].index == 3
    alone = BatchedRelaxer(lj, RelaxSettings(max_steps=50)).relax(good)
    for k, ref in zip((0, 2, 4), alone):
        assert outcomes[k].energy == pytest.approx(ref.energy, abs=1e-10)
    with pytest.raises(RelaxFailure, match=r"structure [13]: "):
        BatchedRelaxer(lj, RelaxSettings(max_steps=50)).relax(structures)


def test_batched_relaxer_drops_a_structure_whose_model_output_is_not_finite(lj, monkeypatch):
    relaxer = BatchedRelaxer(lj, RelaxSettings(max_steps=50))
    compute = relaxer.model.forward

    def poisoned(batch, **kwargs):  # the model returns NaN forces for the 2-atom (bcc Na) structure
        out = compute(batch, **kwargs)
        counts = torch.bincount(batch.batch)
        bad = torch.nonzero(counts == 1).flatten()
        if len(bad):
            out["forces"] = out["forces"].clone()
            out["forces"][torch.isin(batch.batch, bad)] = float("nan")
        return out

    monkeypatch.setattr(relaxer.model, "forward", poisoned)
    outcomes = dict(relaxer.irelax(_crystals(), errors="yield"))
    assert isinstance(outcomes[2], RelaxFailure) and "non-finite" in str(outcomes[2])
    assert not isinstance(outcomes[0], RelaxFailure) and not isinstance(outcomes[1], RelaxFailure)


# ---- inputs and runs ---------------------------------------------------------------------------------------------
def _broken_mp20(tmp_path, truncate_row=1, empty_id_row=None):
    df = pd.read_csv(MP20)
    cif = df.loc[truncate_row, "cif"]
    df.loc[truncate_row, "cif"] = cif[: len(cif) // 2]  # cut mid-way through the atom sites
    if empty_id_row is not None:
        df.loc[empty_id_row, "material_id"] = np.nan
    path = tmp_path / "broken.csv"
    df.to_csv(path, index=False)
    return path, df


def test_a_truncated_cif_becomes_an_error_record_naming_its_row(tmp_path, lj_checkpoint):
    path, df = _broken_mp20(tmp_path)
    pairs = read_structures(path, errors="keep")
    bad = dict(pairs)[df.loc[1, "material_id"]]
    assert isinstance(bad, StructureError) and "row 3" in str(bad) and df.loc[1, "material_id"] in str(bad)
    with pytest.raises(StructureError, match="row 3"):
        read_structures(path)
    out = tmp_path / "run"
    run(path, out, lj_checkpoint, progress=False, limit=6)
    records = merge_records(out)
    assert records.loc[df.loc[1, "material_id"], "status"] == "error"
    assert (records.drop(index=df.loc[1, "material_id"])["status"] == "ok").all()


def test_a_missing_material_id_is_named_not_recorded_as_nan(tmp_path):
    path, _ = _broken_mp20(tmp_path, truncate_row=0, empty_id_row=2)
    with pytest.raises(ValueError, match="row 4: material_id is missing"):
        read_structures(path, errors="keep")


def test_invalid_runs_are_refused_before_anything_is_written(tmp_path, lj_checkpoint, capsys):
    for argv, message in ((["--n-shards", "0"], "n_shards must be an integer >= 1"),
                          (["-c", str(tmp_path / "missing.pt")], "neither 'chgnet'")):
        out = tmp_path / "run"
        args = ["discovery", "run", str(MP20), "-c", lj_checkpoint, "-o", str(out), "--no-progress", *argv]
        assert matkit_main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (out / "run.json").exists()


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, lj_checkpoint):
    out = tmp_path / "run"
    with _RunLock(out):
        with pytest.raises(RuntimeError, match="in use by another run"):
            run(MP20, out, lj_checkpoint, progress=False, limit=2)
    run(MP20, out, lj_checkpoint, progress=False, limit=2)  # free again


def test_unconverged_and_failed_structures_are_flagged_in_the_predictions(tmp_path, lj_checkpoint, capsys):
    path, df = _broken_mp20(tmp_path)
    out, csv = tmp_path / "run", tmp_path / "preds.csv"
    assert matkit_main(["discovery", "run", str(path), "-c", lj_checkpoint, "-o", str(out), "--limit", "6",
                        "--max-steps", "1", "--merge", str(csv), "--model-name", "lj", "--no-progress"]) == 0
    preds = pd.read_csv(csv, index_col="material_id")
    assert preds.loc[df.loc[1, "material_id"], "lj_flags"] == "failed"
    others = preds.drop(index=df.loc[1, "material_id"])
    assert others["lj_flags"].str.contains("not converged").all()
    assert "flagged" in capsys.readouterr().out


def test_killing_the_parent_kills_its_workers(tmp_path, lj_checkpoint):
    """SIGKILL of `matkit discovery run --workers 2`: the pool workers die with it (they used to run on)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "matkit.cli", "discovery", "run", str(MP20), "-c", lj_checkpoint, "-o", str(out),
           "--n-shards", "4", "--workers", "2", "--no-batch", "--no-progress"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children, deadline = [], time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(out.glob("shard-*.jsonl")):
        time.sleep(0.05)
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert proc.poll() is None and children, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    alive = children
    while alive and time.time() < deadline:
        alive = [c for c in alive if Path(f"/proc/{c}").exists()
                 and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]]
        time.sleep(0.1)
    assert not alive, f"workers {alive} outlived their killed parent"
