"""Sharded, resumable runs: kill and resume, truncated records, strict merge, process pool, Ray, CLI."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import matkit
from matkit.checkpoint import save_checkpoint
from matkit.discovery.io import read_labels, read_predictions, read_structures
from matkit.discovery.metrics import discovery_metrics
from matkit.discovery.runner import (MergeError, append_record, merge_records, read_records, run, shard_of,
                                     shard_path)

FIXTURES = Path(__file__).parent / "fixtures" / "discovery"
MP20 = FIXTURES / "mp20-mini.csv"
ROOT = Path(__file__).resolve().parent.parent
N_SHARDS = 3
PINNED = [3, 4, 0, 6, 2, 0, 1, 4, 3, 1]  # shard_of(f"wbm-1-{k}", 7), k = 1..10


@pytest.fixture(scope="module")
def lj_checkpoint(tmp_path_factory):
    """An LJ potential saved as a matkit checkpoint, declared as trained on MP2020-corrected energies."""
    path = tmp_path_factory.mktemp("ckpt") / "lj.pt"
    save_checkpoint(matkit.build("lj", sigma=2.0, epsilon=0.05, rc=5.0, smooth=True), path,
                    metadata={"energy_scale": "mp2020"})
    return str(path)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, lj_checkpoint):
    """An uninterrupted run (ASE path, in-process)."""
    out = tmp_path_factory.mktemp("ref")
    run(MP20, out, lj_checkpoint, n_shards=N_SHARDS, batched=False, progress=False)
    return merge_records(out)


def test_shards_are_deterministic_and_cover_everything():
    ids = [f"wbm-{s}-{k}" for s in range(1, 6) for k in range(200)]
    shards = [shard_of(i, 7) for i in ids]
    assert shards == [shard_of(i, 7) for i in ids]
    assert set(shards) == set(range(7)) and max(np.bincount(shards)) < 2 * len(ids) / 7
    # pinned values: changing the hashing scheme would silently break the resumption of existing runs
    assert [shard_of(f"wbm-1-{k}", 7) for k in range(1, 11)] == PINNED


def test_reference_run_records(reference_run):
    ids = [mid for mid, _ in read_structures(MP20)]
    assert list(reference_run.index) == ids
    assert (reference_run["status"] == "ok").all() and reference_run["converged"].all()
    assert reference_run["e_form_per_atom"].notna().all()
    # e_form = (E - sum n mu)/N with E on the mp2020 scale (no correction for this model)
    np.testing.assert_allclose(reference_run["energy_mp2020"], reference_run["energy"], rtol=0, atol=0)


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, lj_checkpoint, reference_run):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "matkit.cli", "discovery", "run", str(MP20), "-c", lj_checkpoint, "-o", str(out),
           "--n-shards", str(N_SHARDS), "--no-batch", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n_done, deadline = 0, time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        n_done = sum(len(read_records(shard_path(out, s, N_SHARDS))) for s in range(N_SHARDS))
        if n_done >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = sum(len(read_records(shard_path(out, s, N_SHARDS))) for s in range(N_SHARDS))
    assert 3 <= n_done < len(reference_run), f"the run was not killed half-way ({n_done} records)"
    # a crash in the middle of a write leaves a truncated last line: simulate it on one shard
    victim = next(shard_path(out, s, N_SHARDS) for s in range(N_SHARDS) if shard_path(out, s, N_SHARDS).exists())
    with open(victim, "ab") as handle:
        handle.write(b'{"material_id": "mp-0", "status": "o')
    with pytest.raises(MergeError, match="expected ids have no record"):
        merge_records(out)
    counts = run(MP20, out, lj_checkpoint, n_shards=N_SHARDS, batched=False, progress=False)
    assert sum(c["skipped"] for c in counts) == n_done
    assert sum(c["done"] for c in counts) == len(reference_run) - n_done
    assert not victim.read_bytes().count(b'"status": "o')  # the torn line was cut off before appending
    resumed = merge_records(out)
    assert list(resumed.index) == list(reference_run.index)
    np.testing.assert_allclose(resumed["e_form_per_atom"], reference_run["e_form_per_atom"], rtol=0, atol=1e-12)
    labels = read_labels(MP20)
    m_resumed = discovery_metrics(labels, resumed["e_form_per_atom"])["full_test_set"]
    m_ref = discovery_metrics(labels, reference_run["e_form_per_atom"])["full_test_set"]
    for key, value in m_ref.items():
        assert m_resumed[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    # running again does nothing
    assert sum(c["done"] for c in run(MP20, out, lj_checkpoint, n_shards=N_SHARDS, batched=False,
                                      progress=False)) == 0


def test_merge_is_strict(tmp_path, reference_run, lj_checkpoint):
    out = tmp_path / "run"
    run(MP20, out, lj_checkpoint, n_shards=N_SHARDS, progress=False, limit=4)
    merged = merge_records(out)
    assert len(merged) == 4
    first = merged.index[0]
    path = shard_path(out, shard_of(first, N_SHARDS), N_SHARDS)
    duplicate = read_records(path)[0]
    append_record(path, duplicate)
    wrong = next(s for s in range(N_SHARDS) if s != shard_of("mp-999", N_SHARDS))
    append_record(shard_path(out, wrong, N_SHARDS), {"material_id": "mp-999", "status": "ok"})
    with pytest.raises(MergeError) as info:
        merge_records(out, expected_ids=list(merged.index) + ["mp-1000"])
    message = str(info.value)
    assert "1 ids recorded more than once: " + duplicate["material_id"] in message
    assert "1 of 5 expected ids have no record: mp-1000" in message
    assert "1 recorded ids are not expected: mp-999" in message
    assert "mp-999 recorded in shard" in message
    # a corrupt line that is not the last one is an error, not silently skipped
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([b"{broken"] + lines) )
    with pytest.raises(ValueError, match="corrupt record on line 1"):
        read_records(path)


def test_resume_refuses_different_settings(tmp_path, lj_checkpoint):
    out = tmp_path / "run"
    run(MP20, out, lj_checkpoint, n_shards=2, progress=False, limit=2)
    with pytest.raises(ValueError, match="different settings"):
        run(MP20, out, lj_checkpoint, n_shards=3, progress=False, limit=2)


def test_batched_process_pool_matches_reference(tmp_path, lj_checkpoint, reference_run):
    out = tmp_path / "run"
    counts = run(MP20, out, lj_checkpoint, n_shards=N_SHARDS, workers=2, progress=False)
    assert [c["shard"] for c in counts] == list(range(N_SHARDS))
    merged = merge_records(out)
    # batched relaxer vs ASE path, both float64
    np.testing.assert_allclose(merged["e_form_per_atom"], reference_run["e_form_per_atom"], atol=1e-9)
    assert (merged["n_steps"] == reference_run["n_steps"]).all()


def test_ray_backend_two_workers(tmp_path, lj_checkpoint, reference_run, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'matkit[ray]')")
    # Ray runs its workers at niceness 15 by default; next to the other pytest-xdist worker on a 2-core CI box they
    # would get almost no CPU and this test would take many minutes
    monkeypatch.setenv("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = run(MP20, tmp_path / "run", lj_checkpoint, n_shards=N_SHARDS, workers=2, backend="ray",
                     progress=False)
    finally:
        ray.shutdown()
    assert sum(c["done"] for c in counts) == len(reference_run)
    merged = merge_records(tmp_path / "run")
    np.testing.assert_allclose(merged["e_form_per_atom"], reference_run["e_form_per_atom"], atol=1e-9)


def test_wbm_formats_end_to_end_with_cli(tmp_path, lj_checkpoint):
    """WBM initial-structures JSON -> run -> prediction CSV -> metrics against the WBM summary (CLI)."""
    from matkit.cli import main

    preds_csv = tmp_path / "preds.csv"
    assert main(["discovery", "run", str(FIXTURES / "wbm-init-structs-mini.json.bz2"), "-c", lj_checkpoint,
                 "-o", str(tmp_path / "run"), "--n-shards", "2", "--merge", str(preds_csv), "--model-name", "lj",
                 "--no-progress"]) == 0
    preds = read_predictions(preds_csv)
    assert preds.name == "e_form_per_atom_lj" and len(preds) == 8 and preds.notna().all()
    report = tmp_path / "report"
    assert main(["discovery", "metrics", str(preds_csv), "-l", str(FIXTURES / "wbm-summary-mini.csv.gz"),
                 "-o", str(report)]) == 0
    table = pd.read_csv(report / "metrics.csv", index_col=0)
    assert list(table.index) == ["full_test_set", "unique_prototypes"]
    expected = discovery_metrics(read_labels(FIXTURES / "wbm-summary-mini.csv.gz"), preds)
    assert table.loc["unique_prototypes", "MAE"] == pytest.approx(expected["unique_prototypes"]["MAE"], abs=1e-12)
    for name in ("e_form_parity.png", "hull_error_hist.png", "cumulative_precision_daf.png", "metrics.md"):
        assert (report / name).stat().st_size > 0
    # the extxyz-zip layout gives the same structures
    a = read_structures(FIXTURES / "wbm-initial-atoms-mini.extxyz.zip")
    b = read_structures(FIXTURES / "wbm-init-structs-mini.json.bz2")
    assert [m for m, _ in a] == [m for m, _ in b]
    for (_, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x.positions, y.positions, atol=1e-8)
        assert (x.numbers == y.numbers).all()
