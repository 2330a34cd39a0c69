"""Bundled trained potentials: ``potentials/<name>/model.pt`` with a model card ``README.md``.

Search order: the directories in ``$MATKIT_POTENTIALS`` (``os.pathsep``-separated), then the repository's
``potentials/`` folder next to the ``matkit`` package.
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
    paths.append(Path(__file__).resolve().parent.parent / "potentials")
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
