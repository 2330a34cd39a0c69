"""Checkpoints that load without executing code, and whose contents are verified on load.

A checkpoint is a plain dictionary saved with ``torch.save``::

    {"format": "matkit-checkpoint", "format_version": 2, "model": <registered name>, "hparams": {...},
     "state_dict": {...}, "species": [Z...], "cutoff": float, "units": {...}, "metadata": {...},
     "checksum_sha256": <hex>}

:func:`read_checkpoint` uses ``torch.load(weights_only=True)``, which only reconstructs tensors and plain
containers; a file carrying arbitrary pickled objects (code) is refused with :class:`CheckpointError`. Every
other problem is a :class:`CheckpointError` naming the file too: not a torch archive (a text file, random bytes),
corrupt or truncated, checksum mismatch, non-finite weights.

``checksum_sha256`` (format version 2) is the sha256 of every other entry of the payload (:func:`payload_checksum`):
``torch.load`` does not check the zip CRCs, so without it a flipped byte in the tensor data loads silently as
different weights. Version-1 files (no checksum) still load; their weights are checked for NaN/inf only.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch

FORMAT = "matkit-checkpoint"
FORMAT_VERSION = 2
CHECKSUM_KEY = "checksum_sha256"
UNITS = {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3"}

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "write_payload", "payload_checksum",
           "CheckpointError"]

# torch's weights-only unpickler messages that mean "the pickle asks for code", as opposed to a damaged pickle
_CODE_REFUSALS = re.compile(r"Unsupported global: GLOBAL (\S+)|unrecognized function (\S+)|unsupported class (\S+)"
                            r"|Can only build Tensor")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, truncated, unsafe, of an unknown format, or cannot be written."""


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


# ---- checksum ---------------------------------------------------------------------------------------------------
def _feed(hasher, value) -> None:
    """Hash ``value`` (nested dicts, lists, tuples, scalars, strings, tensors) with type tags and lengths, so that
    different structures never hash alike. Tensors contribute dtype, shape and their raw bytes (on the CPU)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"T{value.dtype}{tuple(value.shape)}|".encode())
        hasher.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}|".encode())
        for key, item in value.items():
            _feed(hasher, key)
            _feed(hasher, item)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"L{len(value)}|".encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, bool) or value is None:
        hasher.update(f"C{value}|".encode())
    elif isinstance(value, int):
        hasher.update(f"I{int(value)}|".encode())
    elif isinstance(value, float):
        hasher.update(f"F{float(value)!r}|".encode())
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        hasher.update(f"S{len(data)}|".encode() + data)
    else:
        text = f"{type(value).__name__}:{value!r}".encode("utf-8", "backslashreplace")
        hasher.update(f"R{len(text)}|".encode() + text)


def payload_checksum(payload: Dict[str, Any]) -> str:
    """sha256 (hex) over every entry of a checkpoint payload except the checksum itself, in stored order."""
    hasher = hashlib.sha256()
    _feed(hasher, {k: v for k, v in payload.items() if k != CHECKSUM_KEY})
    return hasher.hexdigest()


def _first_non_finite(state_dict) -> Optional[str]:
    """Name of the first floating-point (or complex) tensor holding NaN or inf, or None."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            if not bool(torch.isfinite(value).all()):
                return str(key)
    return None


# ---- writing ----------------------------------------------------------------------------------------------------
def write_payload(payload: Dict[str, Any], path) -> Path:
    """Write a checkpoint dictionary to ``path`` with the current format version and its checksum.

    The file is written to ``<path>.tmp`` and renamed over ``path`` only when complete, so a failed write (full
    disk, file-size limit, read-only folder) leaves any previous ``path`` intact; the partial ``.tmp`` is removed
    and :class:`CheckpointError` names the file. Non-finite weights are refused (the file could not be loaded)."""
    path = Path(path)
    bad = _first_non_finite(payload.get("state_dict") or {})
    if bad is not None:
        raise CheckpointError(f"refusing to write {path}: weight {bad!r} holds non-finite values (NaN or inf)")
    payload = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    payload["format_version"] = FORMAT_VERSION
    payload[CHECKSUM_KEY] = payload_checksum(payload)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not isinstance(err, (OSError, RuntimeError)):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else _one_line(err)
        raise CheckpointError(f"cannot write checkpoint {path}: {reason} (disk full, file-size limit or no write "
                              f"permission?); any previous {path.name} is unchanged") from err
    return path


def _one_line(err: BaseException) -> str:
    """The informative part of an exception message on one line (torch prefixes C++ locations)."""
    text = " ".join(str(err).split())
    return re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", text) or type(err).__name__


def save_checkpoint(model, path, metadata: Optional[Dict[str, Any]] = None, extra: Optional[Dict] = None) -> Path:
    """Write ``model`` (a registered :class:`~matkit.models.Potential`) to ``path`` atomically, with a checksum.

    ``metadata`` holds training information (dataset, epochs, errors...); ``extra`` optional plain-data entries
    (e.g. optimizer state for resuming training). Raises :class:`CheckpointError` when the write fails.
    """
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
    return write_payload(payload, path)


# ---- reading ----------------------------------------------------------------------------------------------------
def _torch_load(path: Path, map_location):
    """``torch.load(weights_only=True)`` with every failure turned into a :class:`CheckpointError` that says what
    the file is: not a torch archive, corrupt or truncated, or a pickle that asks for code."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        what = "an empty file" if not head else "not a zip archive as written by torch.save (a text file, random " \
                                                "bytes or another format)"
        raise CheckpointError(f"{path} is not a matkit checkpoint: {what}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        match = _CODE_REFUSALS.search(str(err))
        if match:
            name = next((g for g in match.groups() if g), None)
            what = f" (global {name.rstrip('.')!r})" if name else ""
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects that could execute code{what}; "
                f"only tensors and plain containers are allowed") from None
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated (damaged pickle: "
                              f"{_weights_only_detail(err)})") from None
    except Exception as err:  # noqa: BLE001 - a damaged archive fails in many ways inside torch
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                              f"({type(err).__name__}: {_one_line(err)[:200]})") from None


def _weights_only_detail(err: BaseException) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(err), re.S)
    return " ".join((match.group(1) if match else str(err)).split())[:200]


def read_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Read and verify a checkpoint dictionary (no code execution); raise :class:`CheckpointError` on problems:
    missing, not a checkpoint, corrupt or truncated, unsafe, newer format, checksum mismatch, NaN/inf weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = _torch_load(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a matkit checkpoint (missing 'format': '{FORMAT}')")
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"cannot read checkpoint {path}: bad format_version {version!r} (corrupt file?)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}, newer than this matkit supports "
                              f"({FORMAT_VERSION}); upgrade matkit")
    stored = payload.get(CHECKSUM_KEY)
    if stored is None and version >= 2:
        raise CheckpointError(f"cannot read checkpoint {path}: format version {version} but no checksum "
                              f"(corrupt file?)")
    if stored is not None and stored != payload_checksum(payload):
        raise CheckpointError(f"cannot read checkpoint {path}: checksum mismatch, the file is corrupt (its contents "
                              f"changed after it was written)")
    missing = [k for k in ("model", "hparams", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks required entries {missing}")
    if not isinstance(payload["state_dict"], dict) or not isinstance(payload["hparams"], dict):
        raise CheckpointError(f"cannot read checkpoint {path}: 'state_dict' and 'hparams' must be mappings")
    bad = _first_non_finite(payload["state_dict"])
    if bad is not None:
        raise CheckpointError(f"refusing to load {path}: weight {bad!r} holds non-finite values (NaN or inf)")
    return payload


def load_checkpoint(path, map_location="cpu", return_payload: bool = False):
    """Rebuild the model stored in ``path`` (see :func:`save_checkpoint`) in eval mode."""
    from .models import build

    payload = read_checkpoint(path, map_location=map_location)
    try:
        model = build(payload["model"], **payload["hparams"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot build model {payload['model']!r} from its hparams: "
                              f"{_one_line(err)}") from None
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
