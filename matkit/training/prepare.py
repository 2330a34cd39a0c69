"""Everything a run needs before its first step, apart from the optimiser: the device, the model (built from
``model.name`` / ``model.hparams`` or loaded from ``finetune.from_checkpoint``), the datasets (verified and
fingerprinted), the train / validation split, a report of the labels the loss cannot use, the frozen
parameters, and the reference energies / scale / shift fitted on the training split.

Every problem with the configuration or the data is a :class:`~matkit.training.config.ConfigError` naming the
config key (and the file).
"""
from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.dataset import random_split_indices
from ..models import build, get_class
from .config import _YAML11_FLOAT, ConfigError, TrainConfig
from .datasets import dataset_fingerprint, dataset_species, load_dataset, scan_labels, structure_groups
from .stats import collect_statistics, refit_reference_energies, resolve_reference_energies, resolve_scale_shift

log = logging.getLogger("matkit.training")

__all__ = ["resolve_device", "check_hparams", "DatasetFiles", "build_model", "load_datasets", "check_cutoff",
           "random_split", "split_data", "report_labels", "structure_loss_weights", "freeze_parameters",
           "fit_output_transform"]


def _one_line(err: BaseException) -> str:
    """An exception as one line: its message with whitespace collapsed (its type when the message is empty)."""
    return " ".join(str(err).split()) or type(err).__name__


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The device of config key ``run.device`` (``auto``: CUDA when available); ``cuda`` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("config key 'run.device' is 'cuda' but no CUDA device is available")
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


# ---- the model ------------------------------------------------------------------------------------------------
def _model_default_cutoff(name: str) -> Optional[float]:
    params = inspect.signature(get_class(name).__init__).parameters
    for key in ("cutoff", "rc"):
        if key in params and params[key].default not in (inspect.Parameter.empty, None):
            return float(params[key].default)
    return None


_SIMPLE_TYPES = {"float": float, "int": int, "bool": bool, "str": str}


def check_hparams(name: str, hparams: Dict) -> Dict:
    """Check the scalar hyperparameters in ``hparams`` against the types of model ``name``'s constructor (from its
    annotations, else its defaults) so that a wrong value fails here naming ``model.hparams.<key>``, not deep in the
    model or the data loader. Returns ``hparams`` with YAML 1.1 float strings ("5e-4") converted."""
    params = inspect.signature(get_class(name).__init__).parameters
    checked = dict(hparams)
    for key, value in hparams.items():
        param = params.get(key)
        if param is None:
            continue  # unknown keys: build() names them
        annotation = param.annotation
        annotation = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        optional = annotation.startswith("Optional[")
        annotation = annotation[len("Optional["):-1] if optional else annotation
        kind = _SIMPLE_TYPES.get(annotation)
        if kind is None and param.default not in (inspect.Parameter.empty, None):
            kind = type(param.default) if type(param.default) in (float, int, bool, str) else None
        if kind is None or (value is None and (optional or param.default is None)):
            continue
        where = f"config key 'model.hparams.{key}'"
        if kind is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = checked[key] = float(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {type(value).__name__} {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {type(value).__name__} {value!r}")
        elif not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        if key in ("cutoff", "rc") and value <= 0:
            raise ConfigError(f"{where} must be > 0 (Å), got {value!r}")
    return checked


class DatasetFiles:
    """Opens the dataset files named by config keys (``data.train``, ``data.val``), each once.

    ``hashes``: the content fingerprint (sha256) of each file opened, by config key, recorded in the
    checkpoints and compared on resume."""

    def __init__(self):
        self.hashes: Dict[str, Optional[str]] = {}
        self._opened: Dict[str, object] = {}

    def open(self, path, key: str, cutoff: float):
        """The dataset of config key ``key`` with graphs built at ``cutoff`` (Å); the first call verifies the file
        (an HDF5 file's stored content hash is recomputed) and records its fingerprint, later calls return the
        same dataset. Any failure is a :class:`ConfigError` naming the key and the file."""
        if key in self._opened:
            return self._opened[key]
        if path is None:
            raise ConfigError(f"config key '{key}' is required (path of the dataset)")
        if not Path(path).is_file():
            raise ConfigError(f"config key '{key}': dataset not found: {path}")
        try:
            self.hashes[key] = dataset_fingerprint(path)
        except Exception as err:  # noqa: BLE001 - h5py/ase raise many types for a damaged file
            raise ConfigError(f"config key '{key}': {path} failed verification: {_one_line(err)}") from err
        log.info("%s: %s, content sha256 %s%s", key, path, self.hashes[key][:16],
                 " (stored content hash verified)" if Path(path).suffix.lower() in (".h5", ".hdf5") else "")
        try:
            dataset = load_dataset(path, cutoff)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"config key '{key}': cannot read {path} ({type(err).__name__}: "
                              f"{_one_line(err)})") from err
        if len(dataset) == 0:
            raise ConfigError(f"config key '{key}': {path} contains no structures")
        self._opened[key] = dataset
        return dataset


def build_model(config: TrainConfig, train_dataset, files: DatasetFiles):
    """``(model, finetune_payload)``: the model loaded from ``finetune.from_checkpoint`` with that checkpoint's
    payload, or a new model built from ``model.name`` / ``model.hparams`` and None. A new model without
    ``species`` gets the elements of the training data (``train_dataset``, else ``data.train`` opened through
    ``files``)."""
    if config.finetune.from_checkpoint:
        from ..checkpoint import load_checkpoint

        if config.model.hparams:
            raise ConfigError("config key 'model.hparams' must be empty when fine-tuning: the model's "
                              "hyperparameters come from finetune.from_checkpoint")
        model, payload = load_checkpoint(finetune_source(config.finetune.from_checkpoint), return_payload=True)
        if config.model.name and config.model.name != payload["model"]:
            raise ConfigError(f"config key 'model.name' is {config.model.name!r} but "
                              f"{config.finetune.from_checkpoint} holds a {payload['model']!r} model")
        log.info("fine-tuning from %s (%s)", config.finetune.from_checkpoint, payload["model"])
        model.train()
        return model, payload
    try:
        get_class(config.model.name)
    except KeyError as err:
        raise ConfigError(f"config key 'model.name': {err.args[0]}") from None
    hparams = check_hparams(config.model.name, config.model.hparams)
    if "species" not in hparams:
        if "cutoff" not in hparams and _model_default_cutoff(config.model.name) is None:
            raise ConfigError("config key 'model.hparams.cutoff' is required for this model")
        dataset = train_dataset
        if dataset is None:
            cutoff = hparams.get("cutoff", _model_default_cutoff(config.model.name))
            dataset = files.open(config.data.train, "data.train", cutoff)
        hparams["species"] = dataset_species(dataset)
        log.info("model species from the training data: %s", hparams["species"])
    try:
        model = build(config.model.name, **hparams)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"config key 'model.hparams': {err}") from err
    return model, None


def finetune_source(name_or_path: str) -> Path:
    """The checkpoint file of ``finetune.from_checkpoint``: an existing path, else a bundled potential's name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    from ..potentials import checkpoint_path, list_potentials

    try:
        return checkpoint_path(str(name_or_path))
    except FileNotFoundError:
        raise ConfigError(f"config key 'finetune.from_checkpoint': {name_or_path!r} is neither a file nor a "
                          f"bundled potential ({', '.join(list_potentials())})") from None


# ---- the data ---------------------------------------------------------------------------------------------------
def load_datasets(config: TrainConfig, model, train_dataset, val_dataset, files: DatasetFiles):
    """``(train, val)``: the given datasets, else those of ``data.train`` / ``data.val`` with graphs at the
    model's cutoff; ``val`` is None without a separate validation set."""
    cutoff = model.cutoff
    train = train_dataset
    if train is None:
        train = files.open(config.data.train, "data.train", cutoff)
    val = val_dataset
    if val is None and config.data.val:
        val = files.open(config.data.val, "data.val", cutoff)
    check_cutoff(train, model.cutoff)
    return train, val


def check_cutoff(dataset, cutoff: float) -> None:
    """Refuse graphs built with a larger cutoff (Å) than the model's (the model would see extra pairs)."""
    if len(dataset) == 0:
        raise ConfigError("the training dataset is empty")
    graph = dataset[0]
    if graph.edge_index.numel():
        from ..graph import edge_vectors, graph_batch_vector

        vec = edge_vectors(graph.pos.double(), graph.cell.double(), graph.edge_index, graph.shifts,
                           graph_batch_vector(graph))
        longest = float(vec.norm(dim=1).max())
        if longest > cutoff + 1e-6:
            raise ConfigError(f"the training graphs contain pairs up to {longest:.3f} Å but the model cutoff "
                              f"is {cutoff} Å: build the graphs with the model's cutoff")


def random_split(n: int, val_fraction: float, seed: int):
    """``(train, val)`` index lists of :func:`matkit.data.random_split_indices` (so that ``matkit data`` tools,
    scripts and training agree on the split), with a config error when ``n`` is too small to hold one out."""
    if val_fraction > 0 and n < 2:
        raise ConfigError(f"config key 'data.val_fraction': cannot hold out a validation split from {n} "
                          f"structure(s)")
    train, val = random_split_indices(n, val_fraction, seed)
    return [int(i) for i in train], [int(i) for i in val]


def split_data(config: TrainConfig, train_full, val_full,
               restored: Optional[Tuple[List[int], List[int]]] = None) -> Tuple[List[int], List[int], object]:
    """``(train_indices, val_indices, val_set)``: with a separate validation dataset ``val_full``, all of
    ``train_full`` against all of ``val_full``; otherwise the seeded hold-out split of ``train_full``
    (:func:`random_split`), or ``restored`` (the split of the checkpoint a run resumes from)."""
    cfg = config.data
    n = len(train_full)
    split_from = "seed"
    if restored is not None:
        train_indices, val_indices = restored
        split_from = "restored from the checkpoint, made with seed"  # data.seed is checked to be the same
    elif val_full is not None:
        train_indices, val_indices = list(range(n)), list(range(len(val_full)))
    else:
        train_indices, val_indices = random_split(n, cfg.val_fraction, cfg.seed)
    if val_full is not None:
        val_set = val_full
        log.info("training on %d structures; validation on %d structures of %s", len(train_indices),
                 len(val_indices), cfg.val or "the given validation dataset")
    else:
        val_set = train_full
        log.info("training on %d structures; validation split: %d structures (%.1f%%, %s %d) held out "
                 "of the training data and never trained on", len(train_indices), len(val_indices),
                 100.0 * len(val_indices) / max(n, 1), split_from, cfg.seed)
    if not train_indices:
        raise ConfigError("no training structures left after the validation split")
    return train_indices, val_indices, val_set


def report_labels(config: TrainConfig, train_full, train_indices: Sequence[int], val_set,
                  val_indices: Sequence[int], separate_val: bool) -> None:
    """Log one line per split saying how many frames carry NaN/inf labels (ignored by the loss) or no label
    the weighted loss terms can use (dropped), with a few frame ids; refuse a training split where no frame
    has a usable label, and a validation split without the labels ``run.select_by`` needs. ``separate_val``:
    ``val_set`` is a validation dataset of its own."""
    weights = {"energy": config.loss.energy_weight, "forces": config.loss.forces_weight,
               "stress": config.loss.stress_weight}
    train_name = config.data.train or "the training data"
    val_name = (config.data.val or "the validation data") if separate_val else train_name
    for is_val, what, dataset, indices in ((False, f"training split of {train_name}", train_full, train_indices),
                                           (True, f"validation split of {val_name}", val_set, val_indices)):
        if not indices:
            continue
        scan = scan_labels(dataset, indices, weights)
        line = scan.summary(dataset)
        if line:
            log.warning("%s: %s", what, line)
        if not is_val and len(scan.unusable) == len(indices):
            used = [k for k, w in weights.items() if w > 0]
            raise ConfigError(f"{what}: none of the {len(indices)} frames has a usable (finite) label for the "
                              f"weighted loss terms {used}")
        select_by = config.run.select_by
        if is_val and select_by != "loss":
            label = select_by.split("_")[0]
            if scan.labelled[label] == 0:
                raise ConfigError(f"config key 'run.select_by': {select_by} needs {label} labels, and none of "
                                  f"the {len(indices)} frames of the {what} has one")


def structure_loss_weights(config: TrainConfig, train_full, train_indices: Sequence[int]) -> Optional[np.ndarray]:
    """Loss weight of every structure of ``train_full`` from ``loss.config_type_weights`` (1 for types not
    listed), or None when the mapping is empty. Raises ConfigError when the dataset records no configuration
    types or a listed type has no structure in the training split (a misspelt type would otherwise weigh
    nothing); logs how many training structures each weight applies to."""
    wanted = config.loss.config_type_weights
    if not wanted:
        return None
    key = "config key 'loss.config_type_weights'"
    try:
        groups = structure_groups(train_full)
    except ValueError as err:
        raise ConfigError(f"{key}: {config.data.train or 'the training data'} {_one_line(err)}") from None
    in_split = sorted({groups[i] for i in train_indices})
    missing = [name for name in wanted if name not in in_split]
    if missing:
        raise ConfigError(f"{key}: no training structure of type {', '.join(repr(m) for m in missing)} in "
                          f"{config.data.train or 'the training data'}; its types are {in_split}")
    weights = np.array([wanted.get(group, 1.0) for group in groups], dtype=np.float64)
    counts = {name: sum(groups[i] == name for i in train_indices) for name in wanted}
    log.info("loss weights by configuration type: %s; the other %d training structures weigh 1",
             ", ".join(f"{name} x{wanted[name]:g} ({counts[name]} structures)" for name in wanted),
             len(train_indices) - sum(counts.values()))
    return weights


# ---- parameters and output transform ------------------------------------------------------------------------------
def freeze_parameters(model: torch.nn.Module, prefixes: Sequence[str]) -> List[str]:
    """Set ``requires_grad=False`` on parameters whose names start with any of ``prefixes``; return their
    names. A prefix that matches nothing raises ``ConfigError`` listing the model's modules."""
    frozen = []
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        matched = [n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not matched:
            modules = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"config key 'finetune.freeze': {prefix!r} matches no parameter; the model's "
                              f"top-level modules are {modules}")
        frozen.extend(matched)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return sorted(set(frozen))


def fit_output_transform(config: TrainConfig, model, train_full, train_indices: Sequence[int],
                         finetuning: bool) -> None:
    """Set the model's per-element reference energies (eV), output scale and shift (eV/atom) as
    config keys ``model.reference_energies`` / ``model.scale`` / ``model.shift`` say: fitted on the training
    split, refitted, kept, or given. ``finetuning``: the model came from ``finetune.from_checkpoint``."""
    refs_setting, scale_setting, shift_setting = config.model.resolved(finetuning)
    try:  # the data or the settings do not fit the model (unknown elements, no energy labels, bad names)
        stats = collect_statistics(train_full, train_indices, model.species)
        if refs_setting == "refit" and len(stats.energies) == 0:
            log.warning("model.reference_energies: refit needs energy labels; none in the training split, keeping "
                        "the checkpoint's reference energies")
            refs_setting = "keep"
        if refs_setting == "refit":
            refit_reference_energies(model, train_full, train_indices)
        current = model.atomic_reference_energies.detach().cpu().numpy()
        refs = resolve_reference_energies("keep" if refs_setting == "refit" else refs_setting, model.species,
                                          stats, current)
        scale, shift = resolve_scale_shift(scale_setting, shift_setting, stats, refs,
                                           float(model.scale), float(model.shift))
    except (ValueError, KeyError) as err:
        message = _one_line(err).strip("'\"")
        where = "" if message.startswith("config key") else \
            f"training split of {config.data.train or 'the training data'}: "
        raise ConfigError(where + message) from err
    with torch.no_grad():
        model.atomic_reference_energies.copy_(torch.as_tensor(refs, dtype=torch.float64))
        model.scale.fill_(scale)
        model.shift.fill_(shift)
    from ase.data import chemical_symbols

    in_data = stats.counts.sum(axis=0) > 0 if len(stats.energies) else np.ones(len(refs), dtype=bool)
    others = int((~in_data).sum())
    log.info("reference energies (%s, eV): %s%s", refs_setting,
             ", ".join(f"{chemical_symbols[z]} {e:.6f}" for z, e, shown in zip(model.species, refs, in_data) if shown),
             f" (and {others} elements not in the training data)" if others else "")
    log.info("output scale %.6g (%s), shift %.6g eV/atom (%s)", scale, scale_setting, shift, shift_setting)
