"""Typed training configuration loaded from YAML.

A configuration is a tree of dataclasses (:class:`TrainConfig` at the root). :func:`load_config` reads a YAML
file, applies dotted ``key=value`` overrides (``optim.lr=1e-3``) and validates every key: an unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key (``optim.lr``) and what was expected.

Example (see ``examples/train_config.yaml``)::

    model: {name: tensornet, hparams: {hidden_channels: 64}}
    data: {train: datasets/si.h5, val_fraction: 0.1, max_atoms_per_batch: 512}
    loss: {energy_weight: 1.0, forces_weight: 10.0, stress_weight: 0.0}
    optim: {lr: 1.0e-3, schedule: cosine, warmup_steps: 100, ema_decay: 0.99, epochs: 100}
    run: {out_dir: runs/si, seed: 0, device: auto, dtype: float32}
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml

__all__ = ["ConfigError", "ModelConfig", "DataConfig", "LossConfig", "OptimConfig", "RunConfig",
           "FinetuneConfig", "TrainConfig", "load_config", "config_from_dict", "config_to_dict",
           "apply_overrides"]


#: validation numbers ``run.select_by`` may pick the best checkpoint by
SELECT_BY = ("loss", "energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "stress_mae", "stress_rmse")


class ConfigError(ValueError):
    """The training configuration is invalid; the message names the offending key."""


@dataclass
class ModelConfig:
    """Which potential to train.

    ``name`` is a registered model name (``matkit.available()``); ``hparams`` its keyword hyperparameters
    (``species`` defaults to the elements of the training data, ``cutoff`` in Å to the model's default).
    ``module`` is an optional Python module imported first, so models defined outside matkit can register.
    ``reference_energies``: ``fit`` (least squares on the training split), ``refit`` (fine-tuning: the
    checkpoint's values corrected by least squares on the loaded model's residuals over the training split, so
    that data on another DFT energy scale starts from matching totals; elements absent from the data keep their
    values), ``keep`` (from the checkpoint when fine-tuning, zeros otherwise) or a mapping
    ``{atomic number or symbol: eV}``.
    ``scale``: ``rms_forces``, ``rms_energy`` (RMS per-atom energy residual after the reference energies),
    ``keep`` or a number. ``shift``: ``mean_energy`` (mean per-atom residual), ``keep`` or a number (eV).
    Unset (null), they default to ``fit`` / ``rms_forces`` / ``mean_energy`` for a new model and to ``refit`` /
    ``keep`` / ``keep`` when fine-tuning (``refit`` falls back to ``keep`` when no training structure has an energy).
    """

    name: Optional[str] = None
    hparams: Dict[str, Any] = field(default_factory=dict)
    module: Optional[str] = None
    reference_energies: Optional[Union[str, Dict[str, float]]] = None
    scale: Optional[Union[str, float]] = None
    shift: Optional[Union[str, float]] = None

    def resolved(self, finetuning: bool):
        """``(reference_energies, scale, shift)`` settings with the defaults filled in."""
        if finetuning:
            defaults = ("refit", "keep", "keep")
        else:
            defaults = ("fit", "rms_forces", "mean_energy")
        values = (self.reference_energies, self.scale, self.shift)
        return tuple(d if v is None else v for v, d in zip(values, defaults))


@dataclass
class DataConfig:
    """Training data. ``train`` is a dataset file (``.h5`` matkit HDF5, or any ASE-readable file such as
    extxyz); the validation set is ``val`` or, if absent, a random ``val_fraction`` of ``train`` (seeded by
    ``seed``) that is held out of training. Batches hold ``batch_size`` structures or, if
    ``max_atoms_per_batch`` is set, as many structures as fit in that many atoms (global batch: with several
    processes each rank gets a disjoint part of it). The graph cutoff is the model's cutoff."""

    train: Optional[str] = None
    val: Optional[str] = None
    val_fraction: float = 0.1
    seed: int = 0
    batch_size: int = 8
    max_atoms_per_batch: Optional[int] = None
    shuffle: bool = True
    num_workers: int = 0


@dataclass
class LossConfig:
    """Weights of the loss terms. Energy: per-atom energy error per structure; forces: per Cartesian
    component; stress: per component of the 3x3 tensor (eV/Å^3). ``kind``: ``mse`` or ``huber``
    (``huber_delta`` in the units of each term).

    ``config_type_weights``: ``{configuration type: weight}`` multiplies every loss term of the training
    structures of that type (e.g. ``{Surface: 10.0}`` for mlearn's surfaces; types not listed keep weight 1), as
    MACE's option of that name. Types are the dataset's (``frames/groups`` of matkit HDF5 files,
    ``atoms.info["config_type"]`` of extxyz); a type the training split lacks is an error. The validation loss
    that picks the best checkpoint stays unweighted, so runs with different weights are compared on one
    objective."""

    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 0.0
    kind: Literal["mse", "huber"] = "mse"
    huber_delta: float = 0.01
    config_type_weights: Dict[str, float] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW optimiser, learning-rate schedule, EMA and stopping.

    ``schedule``: ``cosine`` (decays to ``min_lr_ratio * lr`` at the last step), ``plateau`` (multiplies by
    ``plateau_factor`` when the validation loss has not improved for ``plateau_patience`` epochs) or
    ``constant``; all with a linear warm-up over ``warmup_steps``. Training stops after ``epochs`` epochs or
    ``max_steps`` optimiser steps, whichever comes first. ``ema_decay`` 0 disables the EMA; the EMA warms up
    as ``min(ema_decay, (1 + n) / (10 + n))`` after n steps, so a decay d above 0.99 only takes hold after
    ``(10 d - 1) / (1 - d)`` steps (~4500 for 0.998, ~900 for 0.99). ``grad_clip`` 0 disables clipping (max global
    gradient norm).
    """

    optimizer: Literal["adamw"] = "adamw"
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    amsgrad: bool = False
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    ema_decay: float = 0.99
    grad_clip: float = 10.0
    epochs: int = 10
    max_steps: Optional[int] = None


@dataclass
class RunConfig:
    """Run options. ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    ``deterministic`` turns on ``torch.use_deterministic_algorithms`` (bitwise-reproducible runs and resumes
    on CPU). ``checkpoint_every_steps`` 0 writes ``latest.pt`` only at the end of each epoch.
    ``progress``: tqdm bars (``auto``: only on a terminal). ``keep_freed_memory``: glibc keeps freed memory for
    reuse instead of re-faulting large tensors every step (:func:`matkit.allocator.keep_freed_memory`; 1.5-1.8x
    faster CPU steps, the process keeps its peak memory). ``select_by``: the validation number whose minimum
    picks ``best.pt``: ``loss`` (the configured loss on the validation split), or one of ``energy_mae``,
    ``energy_rmse``, ``forces_mae``, ``forces_rmse``, ``stress_mae``, ``stress_rmse`` (useful when the loss is
    re-weighted or robust and its validation value no longer tracks the errors a card reports)."""

    out_dir: str = "runs/matkit"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    log_every: int = 1
    checkpoint_every_steps: int = 0
    validate_every_epochs: int = 1
    tensorboard: bool = False
    progress: Literal["auto", "on", "off"] = "auto"
    parity_plots: bool = True
    keep_freed_memory: bool = True
    select_by: str = "loss"


@dataclass
class FinetuneConfig:
    """Start from the weights of ``from_checkpoint`` (its model and hyperparameters) and keep the parameters
    whose names start with any prefix in ``freeze`` fixed (e.g. ``[embedding, interactions.0]``).

    ``from_checkpoint`` is a checkpoint path or a bundled potential's name (``tensornet-matpes-pbe``); the
    model keeps all its elements, also those the fine-tuning data lacks."""

    from_checkpoint: Optional[str] = None
    freeze: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> "TrainConfig":
        """Check value ranges and cross-field consistency; raise :class:`ConfigError`."""
        _check(self.model.name is not None or self.finetune.from_checkpoint is not None, "model.name",
               "is required (or give finetune.from_checkpoint)")
        _check(0.0 <= self.data.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        _check(self.data.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.data.max_atoms_per_batch is None or self.data.max_atoms_per_batch >= 1,
               "data.max_atoms_per_batch", "must be >= 1")
        _check(self.data.num_workers >= 0, "data.num_workers", "must be >= 0")
        for key in ("energy_weight", "forces_weight", "stress_weight"):
            _check(getattr(self.loss, key) >= 0, f"loss.{key}", "must be >= 0")
        _check(self.loss.energy_weight + self.loss.forces_weight + self.loss.stress_weight > 0, "loss",
               "at least one of energy_weight, forces_weight, stress_weight must be positive")
        _check(self.loss.huber_delta > 0, "loss.huber_delta", "must be > 0")
        for name, weight in self.loss.config_type_weights.items():
            _check(math.isfinite(weight) and weight >= 0, f"loss.config_type_weights.{name}",
                   f"must be a finite number >= 0, got {weight!r}")
        _check(self.optim.lr > 0, "optim.lr", "must be > 0")
        _check(self.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas), "optim.betas",
               "must be two numbers in [0, 1)")
        _check(0.0 <= self.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
        _check(self.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(self.optim.epochs >= 1, "optim.epochs", "must be >= 1")
        _check(self.optim.max_steps is None or self.optim.max_steps >= 1, "optim.max_steps", "must be >= 1")
        _check(self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(0.0 <= self.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(0.0 < self.optim.plateau_factor < 1.0, "optim.plateau_factor", "must be in (0, 1)")
        _check(self.run.log_every >= 1, "run.log_every", "must be >= 1")
        _check(self.run.checkpoint_every_steps >= 0, "run.checkpoint_every_steps", "must be >= 0")
        _check(self.run.validate_every_epochs >= 1, "run.validate_every_epochs", "must be >= 1")
        _check(self.run.select_by in SELECT_BY, "run.select_by", f"must be one of {', '.join(SELECT_BY)}")
        device = self.run.device
        _check(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), "run.device",
               f"must be auto, cpu, cuda or cuda:N, got {device!r}")
        for key in ("scale", "shift"):
            value = getattr(self.model, key)
            allowed = {"scale": ("rms_forces", "rms_energy", "keep"), "shift": ("mean_energy", "keep")}[key]
            _check(value is None or not isinstance(value, str) or value in allowed, f"model.{key}",
                   f"must be a number or one of {list(allowed)}, got {value!r}")
        cutoff = self.model.hparams.get("cutoff")
        _check(cutoff is None or (isinstance(cutoff, (int, float)) and not isinstance(cutoff, bool)
                                  and math.isfinite(cutoff) and cutoff > 0), "model.hparams.cutoff",
               f"must be a positive number of Å, got {type(cutoff).__name__} {cutoff!r}")
        refs = self.model.reference_energies
        _check(refs is None or not isinstance(refs, str) or refs in ("fit", "refit", "keep"),
               "model.reference_energies", f"must be 'fit', 'refit', 'keep' or a mapping {{element: eV}}, got {refs!r}")
        _check(refs != "refit" or self.finetune.from_checkpoint, "model.reference_energies",
               "'refit' corrects a loaded model's reference energies: give finetune.from_checkpoint (a new model "
               "uses 'fit')")
        return self


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


# ---- generic dataclass <-> dict conversion with type checking --------------------------------------------------
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value, tp, key: str):
    """Return ``value`` checked against type ``tp`` (ints are accepted for floats; bools are not numbers)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping (section), got {type(value).__name__} "
                              f"{value!r}")
        return _dataclass_from_dict(tp, value, key)
    if origin is Union:
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__} {value!r}")
        _, value_type = typing.get_args(tp)
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}' must be null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string; accept it as the number it is
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module, not in the user's file


def _dataclass_from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def config_from_dict(data: Optional[dict]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested mapping (as read from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a training configuration must be a mapping of sections, got {type(data).__name__}")
    return _dataclass_from_dict(TrainConfig, data).validate()


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: List[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value {raw!r} ({_yaml_problem(err)})") from None
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(keys[:depth + 1])}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where (PyYAML's own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def load_config(path, overrides: Optional[List[str]] = None) -> TrainConfig:
    """Read a YAML training configuration, apply dotted overrides and validate it. Every problem, including an
    unreadable, binary or non-UTF-8 file, is a one-line :class:`ConfigError` naming the file or the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration ({err.strerror or err})") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{path}: not a YAML text file (binary content: NUL byte at offset {nul})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file (byte {raw[err.start]:#04x} at offset {err.start} is not "
                          f"UTF-8)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training configuration must be a mapping of sections")
    apply_overrides(data, overrides or [])
    return config_from_dict(data)
