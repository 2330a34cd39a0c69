"""matkit works when installed from a built wheel, outside the source tree: bundled potentials load by name and
``matkit demo`` runs. Also: the explicit package list of pyproject.toml covers every package of the source tree."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    in_tree = {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "matkit").rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))}
    assert in_tree | {"matkit", "matkit.bundled_potentials"} == listed
    assert config["package-dir"]["matkit.bundled_potentials"] == "potentials"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """``pip wheel .`` then ``pip install --no-deps --target`` of that wheel (dependencies from this venv)."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(work / "dist")],
                   check=True, capture_output=True)
    (wheel,) = (work / "dist").glob("matkit-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(work / "site"),
                    str(wheel)], check=True, capture_output=True)
    return work


def _run(work, code=None, args=None):
    env = dict(os.environ, PYTHONPATH=str(work / "site"), OMP_NUM_THREADS="1", MATKIT_POTENTIALS="")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "matkit.cli", *args]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_loads_every_bundled_potential_by_name(installed_wheel):
    names = sorted(p.parent.name for p in (ROOT / "potentials").glob("*/model.pt"))
    code = ("import matkit, matkit.potentials as p; from matkit.calculator import MatkitCalculator\n"
            "print(matkit.__file__); print(p.search_paths())\n"
            "for name in p.list_potentials(): MatkitCalculator.from_pretrained(name); print('ok', name)\n")
    out = _run(installed_wheel, code)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(installed_wheel / "site"))  # the wheel's matkit, not the checkout's
    assert str(ROOT) not in lines[1]
    assert [line.split()[1] for line in lines[2:]] == names


def test_wheel_runs_the_demo_outside_the_checkout(installed_wheel):
    out = _run(installed_wheel, args=["demo", "--nvt-steps", "10", "--nve-steps", "20", "--out", "demo"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tensornet-matpes-pbe" in out.stdout and "drift" in out.stdout
    assert (installed_wheel / "demo" / "demo_nve.png").is_file()


def test_no_machine_paths_in_the_repository():
    """Inputs come from the repository, a CLI argument or an environment variable, never a folder of one machine."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    prefixes = tuple("/" + p + "/" for p in ("work", "home", "root", "Users", "tmp/pytest"))
    offenders = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary files (weights, plots, HDF5)
        offenders += [f"{name}: {line.strip()[:80]}" for line in text.splitlines()
                      if any(f'"{p}' in line or f"'{p}" in line or f" {p}" in line or f"={p}" in line
                             for p in prefixes)]
    assert not offenders, offenders[:10]
