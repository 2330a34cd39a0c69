"""Smoke tests of benchmarks/tensor_products.py with tiny settings, so that the benchmark keeps running."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tensor_products.py"


def _run(tmp_path, *args):
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--edges", "100", "--repeats", "1", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())["rows"]


def test_benchmark_all_methods_in_process(tmp_path):
    stdout, rows = _run(tmp_path, "--lmax", "2", "--in-process")
    assert {(r["method"], r["L"]) for r in rows} == {(m, l) for m in ("grid", "fourier", "e3nn") for l in (1, 2)}
    for r in rows:
        assert "error" not in r, r
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["mem_fwdbwd_mb"] >= 0
        assert r["check"] < 1e-4  # e3nn with Gaunt path weights and both Gaunt routes compute the same product
    assert {r["backend"] for r in rows if r["method"] == "fourier"} <= {"dft", "fft"}
    assert next(r for r in rows if r["method"] == "e3nn" and r["L"] == 2)["paths"] == 11
    assert "e3nn/grid" in stdout and "time ~ L^p" in stdout


@pytest.mark.slow  # the default mode: one more interpreter start-up per case
def test_benchmark_subprocess_per_case(tmp_path):
    _, rows = _run(tmp_path, "--lmin", "1", "--lmax", "1", "--methods", "grid")
    assert len(rows) == 1 and rows[0]["fwd_ms"] > 0 and rows[0]["check"] < 1e-4
