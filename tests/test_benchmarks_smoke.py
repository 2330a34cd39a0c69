"""Smoke tests: the benchmark scripts run end to end with tiny settings (numbers are not checked, only that the
tables come out and, for the SO(2) benchmark, that the SO(2) route equals the e3nn SO(3) convolution)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(name, *options):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *options], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_so2_convolution_benchmark_smoke():
    out = run_script("so2_convolution.py", "--lmax", "1,2", "--edges", "16", "--channels", "2", "--repeats", "1",
                     "--budget", "0.05", "--escn-mmax", "1", "--in-process")
    assert "fitted exponent" in out and "SO(3) e3nn" in out
    rows = [line for line in out.splitlines() if re.match(r"\| [12] \|", line)]
    assert len(rows) == 6, out  # L = 1, 2: times for mmax = L and mmax = 1, memory and check
    relative = [float(v) for v in re.findall(r"\| [0-9.e+-]+ \(([0-9.e+-]+)\)", out)]
    assert len(relative) == 4, out
    assert max(relative) < 1e-10  # the SO(2) route equals the SO(3) convolution (float64 check)


def test_data_loader_benchmark_smoke():
    out = run_script("data_loader.py", "--datasets", "mlearn_si", "--max-frames", "8", "--max-atoms", "100",
                     "--workers", "0,1", "--passes", "1", "--steps", "1", "--models", "tensornet")
    rows = [line for line in out.splitlines() if line.startswith("| mlearn_si | 8 |")]
    assert len(rows) == 2, out  # one row per worker setting
    assert all(float(line.split("|")[-2]) > 0 for line in rows)  # loader/step ratio
    assert "load CPU ms/frame" in out
