"""Bundled potentials: ``potentials/<name>/model.pt`` with a model card ``README.md``.

Search order: the directories in ``$MATKIT_POTENTIALS`` (``os.pathsep``-separated); the repository's
``potentials/`` folder next to the ``matkit`` package (a source checkout); the package
``matkit.bundled_potentials`` that installs and wheels carry (the same files, see ``pyproject.toml``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

__all__ = ["search_paths", "list_potentials", "checkpoint_path", "DEFAULT_POTENTIAL"]

#: the potential ``matkit demo`` uses when it is bundled
DEFAULT_POTENTIAL = "tensornet-matpes-pbe"


def search_paths() -> List[Path]:
    paths = [Path(p) for p in os.environ.get("MATKIT_POTENTIALS", "").split(os.pathsep) if p]
    checkout = Path(__file__).resolve().parent.parent / "potentials"
    if checkout.is_dir():
        paths.append(checkout)
    from importlib.util import find_spec

    try:  # a namespace package (no __init__.py): its folders are the search locations
        spec = find_spec("matkit.bundled_potentials")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        installed = Path(location).resolve()
        if installed.is_dir() and installed not in [p.resolve() for p in paths]:
            paths.append(installed)
    return paths


def list_potentials() -> List[str]:
    names = set()
    for root in search_paths():
        if root.is_dir():
            names.update(p.parent.name for p in root.glob("*/model.pt"))
    return sorted(names)


def checkpoint_path(name: str) -> Path:
    """Path of the checkpoint of bundled potential ``name``; ``FileNotFoundError`` lists what exists."""
    for root in search_paths():
        candidate = root / name / "model.pt"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no bundled potential named {name!r}; available: {list_potentials()} "
                            f"(searched {[str(p) for p in search_paths()]})")
