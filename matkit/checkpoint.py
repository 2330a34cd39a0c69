"""Checkpoints that load without executing code.

A checkpoint is a plain dictionary saved with ``torch.save``::

    {"format": "matkit-checkpoint", "format_version": 1, "model": <registered name>, "hparams": {...},
     "state_dict": {...}, "species": [Z...], "cutoff": float, "units": {...}, "metadata": {...}}

:func:`load_checkpoint` uses ``torch.load(weights_only=True)``, which only reconstructs tensors and plain
containers; a file carrying arbitrary pickled objects (code) is refused with :class:`CheckpointError`.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

FORMAT = "matkit-checkpoint"
FORMAT_VERSION = 1
UNITS = {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3"}

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, truncated, unsafe or of an unknown format."""


def _to_plain(value):
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_checkpoint(model, path, metadata: Optional[Dict[str, Any]] = None, extra: Optional[Dict] = None) -> Path:
    """Write ``model`` (a registered :class:`~matkit.models.Potential`) to ``path`` atomically.

    ``metadata`` holds training information (dataset, epochs, errors...); ``extra`` optional plain-data entries
    (e.g. optimizer state for resuming training).
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.model_name,
        "hparams": _to_plain(getattr(model, "hparams", {})),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "species": list(model.species),
        "cutoff": float(model.cutoff),
        "units": dict(UNITS),
        "metadata": _to_plain(metadata or {}),
    }
    if extra:
        payload.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint dictionary safely (no code execution); raise :class:`CheckpointError` on problems."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled Python objects that could execute code "
            f"(only tensors and plain containers are allowed). Details: {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a matkit checkpoint (missing 'format': '{FORMAT}')")
    if int(payload.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {payload['format_version']}, newer than this matkit "
                              f"supports ({FORMAT_VERSION}); upgrade matkit")
    missing = [k for k in ("model", "hparams", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks required entries {missing}")
    return payload


def load_checkpoint(path, map_location="cpu", return_payload: bool = False):
    """Rebuild the model stored in ``path`` (see :func:`save_checkpoint`) in eval mode."""
    from .models import build

    payload = read_checkpoint(path, map_location=map_location)
    model = build(payload["model"], **payload["hparams"])
    # a float64 checkpoint must not pass through float32 parameters (only up-cast: a down-cast would also round
    # the float64 constant tables some models build)
    keep = set(getattr(model, "_FLOAT64_BUFFERS", ()))
    saved = {v.dtype for k, v in payload["state_dict"].items()
             if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in keep}
    if torch.float64 in saved and any(p.dtype != torch.float64 for p in model.parameters()):
        model = model.double()
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match model {payload['model']!r}: {err}") from None
    model.eval()
    return (model, payload) if return_payload else model
