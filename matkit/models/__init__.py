"""Potentials registered by name: ``matkit.models.build("tensornet", **hparams)``.

A model module registers its class with ``@register("name")``; the modules below are imported on first use
of the registry so that ``build`` and ``available`` see every model.
"""
from __future__ import annotations

import importlib

from .base import Potential, register, registry

__all__ = ["Potential", "register", "build", "available", "get_class"]

_MODEL_MODULES = ["lj", "tensornet", "escn", "faenet", "gaunt_mace"]
_imported = False


def _import_models() -> None:
    global _imported
    if _imported:
        return
    for name in _MODEL_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:  # the module itself is absent; a missing dependency must still raise
            if err.name != f"{__name__}.{name}":
                raise
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
