"""Potentials registered by name: ``matkit.models.build("tensornet", **hparams)``.

A model module in this package registers its class with ``@register("name")``; every module here is imported on
first use of the registry (no list to keep up to date), so ``build`` and ``available`` see every model. Adding a
model: one file ``matkit/models/<name>.py``, one decorator, one harness subclass in ``tests/`` (see the README).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Potential, register, registry

__all__ = ["Potential", "register", "build", "available", "get_class"]

_imported = False


def _import_models() -> None:
    """Import every module of this package once (each registers its model)."""
    global _imported
    if _imported:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _imported = True


def get_class(name: str) -> type:
    _import_models()
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {sorted(registry)}") from None


def build(name: str, **hparams) -> Potential:
    """Instantiate the potential registered as ``name`` with keyword hyperparameters.

    Parameters are in ``torch.get_default_dtype()``; constant tables (grids, radial-basis centres) are built in
    float64 and cast to the input's dtype where they are used, so ``.double()`` later loses no precision.
    """
    return get_class(name)(**hparams)


def available() -> list[str]:
    _import_models()
    return sorted(registry)
