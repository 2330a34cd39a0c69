"""The training loop: ``Trainer(config).fit()``.

What a run does, in order:

1. distributed set-up (torchrun / SLURM env, :mod:`matkit.training.ddp`), seeds, deterministic mode;
2. builds the model (or loads ``finetune.from_checkpoint`` and freezes the named parameters);
3. loads the data (an HDF5 file's content hash is verified first; the file's sha256 is recorded in the
   checkpoints), holds out a validation split (logged), reports frames whose labels the loss cannot use (NaN/inf
   or missing), fits reference energies / scale / shift on the training split (:mod:`matkit.training.stats`);
4. AdamW + LR schedule + EMA + gradient clipping; force (and stress) losses through
   ``model(batch, forces=..., stress=..., training=True)`` so that they train the weights (forces and
   stress are computed only when their loss weight is positive);
5. writes ``metrics.csv`` (one row per logged step and per epoch), ``train.log``, ``latest.pt`` (raw weights
   plus the full training state: optimiser, schedule, EMA, RNG states, epoch, step, the epoch's batch order
   and position) and ``best.pt`` (EMA weights with the lowest validation loss), and parity plots at the end.

Resuming from ``latest.pt`` restores everything, so a run stopped at any step and resumed reproduces the
uninterrupted run bit for bit on CPU with ``run.deterministic: true``. A resume is refused when the dataset
(content hash, or path for checkpoints without one) or a seed / split setting differs from the checkpoint's run.

Data parallelism: each optimiser step takes one *global* batch, split over the ranks; every loss is a sum
over the local structures/atoms divided by the global count, multiplied by the number of ranks because DDP
averages gradients: the averaged gradient is the gradient of the global-batch loss, so R processes follow
the same trajectory as one process (to floating-point summation order).
"""
from __future__ import annotations

import csv
import gc
import importlib
import inspect
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..allocator import keep_freed_memory
from ..checkpoint import read_checkpoint, save_checkpoint
from ..models import build, get_class
from .batching import epoch_batches, flatten_batches, unflatten_batches
from .config import _YAML11_FLOAT, ConfigError, TrainConfig, config_to_dict
from .datasets import dataset_fingerprint, dataset_species, load_dataset, scan_labels, structure_sizes
from .ddp import (all_reduce_sum, barrier, cleanup_distributed, detect_distributed, init_distributed,
                  split_global_batch)
from .evaluate import collate, prepare_batch, run_inference
from .losses import ErrorAccumulator, LossCounts, batch_targets, loss_counts, loss_terms
from .schedule import ExponentialMovingAverage, LRSchedule
from .stats import collect_statistics, resolve_reference_energies, resolve_scale_shift

log = logging.getLogger("matkit.training")

__all__ = ["Trainer", "train", "random_split", "freeze_parameters", "rng_state", "set_rng_state"]

CSV_COLUMNS = ["kind", "epoch", "step", "lr", "time_s", "loss", "loss_energy", "loss_forces", "loss_stress",
               "train_energy_mae", "train_energy_rmse", "train_forces_mae", "train_forces_rmse",
               "train_stress_mae", "train_stress_rmse", "val_loss", "val_energy_mae", "val_energy_rmse",
               "val_forces_mae", "val_forces_rmse", "val_stress_mae", "val_stress_rmse"]
TRAINING_STATE_VERSION = 1


# ---- helpers ------------------------------------------------------------------------------------------------
def random_split(n: int, val_fraction: float, seed: int):
    """``(train, val)`` index lists: a seeded permutation, the first ``round(val_fraction * n)`` (at least 1
    when ``val_fraction > 0``) held out for validation. Uses :func:`matkit.data.random_split_indices` when the
    data package is installed, so that ``matkit data`` tools and training agree on the split."""
    try:
        from ..data.dataset import random_split_indices
    except ImportError:
        random_split_indices = None
    if random_split_indices is not None:
        if val_fraction > 0 and n < 2:
            raise ConfigError(f"config key 'data.val_fraction': cannot hold out a validation split from {n} "
                              f"structure(s)")
        train, val = random_split_indices(n, val_fraction, seed)
        return [int(i) for i in train], [int(i) for i in val]
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise ConfigError(f"config key 'data.val_fraction' {val_fraction} leaves no training structures "
                          f"out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


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


def rng_state() -> Dict:
    """torch / numpy / python RNG states as tensors and plain lists (loadable with ``weights_only``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("config key 'run.device' is 'cuda' but no CUDA device is available")
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


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


class _SimpleProgress:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, iterable, **kwargs):
        if not self.enabled:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)


# ---- trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """Train a potential according to a :class:`~matkit.training.config.TrainConfig`.

    ``train_dataset`` / ``val_dataset``: optional datasets of labelled graphs (built with the model's
    cutoff) used instead of ``config.data.train`` / ``config.data.val``. ``resume``: a ``latest.pt`` path
    to continue from. ``callbacks``: functions ``f(trainer)`` called after every optimiser step.
    """

    def __init__(self, config: TrainConfig, train_dataset=None, val_dataset=None, resume: Optional[str] = None,
                 callbacks: Sequence[Callable] = ()):
        self.config = config
        self.callbacks = list(callbacks)
        if config.run.keep_freed_memory:
            keep_freed_memory()
        self.dist = detect_distributed()
        self.device = _resolve_device(config.run.device, self.dist.local_rank)
        init_distributed(self.dist, self.device)
        self.out_dir = Path(config.run.out_dir)
        self._handlers: List[logging.Handler] = []
        self.writer = None
        self._setup_logging()
        try:
            self._setup(train_dataset, val_dataset, resume)
        except BaseException:
            self.close()
            raise

    def _setup(self, train_dataset, val_dataset, resume) -> None:
        config = self.config
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[config.run.dtype]
        self._seed_everything(config.run.seed)
        self._set_deterministic(config.run.deterministic)
        if config.model.module:
            importlib.import_module(config.model.module)

        resume_payload = read_checkpoint(resume) if resume else None
        if resume_payload is not None and "training_state" not in resume_payload:
            raise ConfigError(f"--resume {resume}: the checkpoint has no training state (use latest.pt, or "
                              f"finetune.from_checkpoint to start a new run from its weights)")
        if resume_payload is not None:
            self._check_resume_settings(resume_payload, resume)
        self.data_hashes: Dict[str, Optional[str]] = {}
        self.model, self.finetune_payload = self._build_model(train_dataset)
        self.train_full, self.val_full = self._load_datasets(train_dataset, val_dataset)
        if resume_payload is not None:
            self._check_resume_data(resume_payload, resume)
        self._split(resume_payload)
        self._report_labels()
        self.frozen = freeze_parameters(self.model, config.finetune.freeze)
        if self.frozen:
            log.info("frozen parameters (%d): %s", len(self.frozen), ", ".join(self.frozen))
        if resume_payload is None:
            self._fit_output_transform()
        self.model.to(device=self.device, dtype=self.dtype)
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ConfigError("config key 'finetune.freeze' freezes every parameter: nothing to train")
        o = config.optim
        self.optimizer = torch.optim.AdamW([p for _, p in self.trainable], lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay, amsgrad=o.amsgrad)
        self.sizes = structure_sizes(self.train_full)
        self.steps_per_epoch = len(self._make_epoch_batches(0))
        total = self.steps_per_epoch * o.epochs
        self.total_steps = min(total, o.max_steps) if o.max_steps else total
        self.schedule = LRSchedule(self.optimizer, o.lr, o.schedule, self.total_steps, o.warmup_steps,
                                   o.min_lr_ratio, o.plateau_factor, o.plateau_patience)
        self.ema = ExponentialMovingAverage(self.trainable, o.ema_decay) if o.ema_decay > 0 else None
        self.ddp_model = self._wrap_ddp()
        self.weights = {"energy": config.loss.energy_weight, "forces": config.loss.forces_weight,
                        "stress": config.loss.stress_weight}
        # loop state
        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.current_batches: Optional[List[List[int]]] = None
        self.best_val_loss = math.inf
        self.best_val_metrics: Dict = {}
        self.epoch_errors = ErrorAccumulator(self.device)
        self.epoch_loss = torch.zeros(2, dtype=torch.float64)  # sum of step losses, number of steps
        self.elapsed = 0.0
        self.last_step_loss: Optional[Dict[str, float]] = None
        self.history: List[Dict] = []
        if resume_payload is not None:
            self._load_training_state(resume_payload, resume)
        self.writer = self._tensorboard()

    # ---- set-up ---------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def _setup_logging(self) -> None:
        log.setLevel(logging.INFO)
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        file_handler = logging.FileHandler(self.out_dir / "train.log")
        stream = logging.StreamHandler(sys.stderr)
        for handler in (file_handler, stream):
            handler.setFormatter(fmt)
            log.addHandler(handler)
            self._handlers.append(handler)
        log.propagate = False
        if self.dist.enabled:
            log.info("distributed: %d ranks (%s launcher), backend %s", self.dist.world_size, self.dist.launcher,
                     "nccl" if self.device.type == "cuda" else "gloo")

    def close(self) -> None:
        """Release log handlers, TensorBoard writer and the process group."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
            self.writer = None
        self._free_ddp_wrapper()
        cleanup_distributed()  # before the log handlers go: it may warn
        for handler in self._handlers:
            log.removeHandler(handler)
            handler.close()
        self._handlers = []
        if hasattr(self, "_previous_deterministic"):
            torch.use_deterministic_algorithms(self._previous_deterministic)

    def _free_ddp_wrapper(self) -> None:
        """Free the DDP wrapper while the process group is still registered with ``torch.distributed``.

        The wrapper's C++ ``Reducer`` holds a reference to the process group. Were it the last one, the gloo
        process group would be destroyed with the GIL held, and its destructor waits for a worker thread
        that may itself wait for the GIL to free a finished collective's tensors: a deadlock
        (pytorch/pytorch#56297). Freed first,
        the wrapper leaves the process group to ``destroy_process_group``, whose Python references release the
        GIL before destroying it; :func:`~matkit.training.ddp.all_reduce_sum` also keeps its tensors referenced
        so that the worker threads' clean-up never needs the GIL."""
        wrapper = getattr(self, "ddp_model", None)
        if wrapper is None or wrapper is getattr(self, "model", None):
            return
        self.ddp_model = self.model
        del wrapper
        gc.collect()  # in case the wrapper is part of a reference cycle

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _set_deterministic(self, enabled: bool) -> None:
        self._previous_deterministic = torch.are_deterministic_algorithms_enabled()
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            if torch.backends.cudnn.is_available():
                torch.backends.cudnn.benchmark = False
            log.info("deterministic mode: torch.use_deterministic_algorithms(True)")

    def _build_model(self, train_dataset):
        cfg = self.config
        if cfg.finetune.from_checkpoint:
            from ..checkpoint import load_checkpoint

            if cfg.model.hparams:
                raise ConfigError("config key 'model.hparams' must be empty when fine-tuning: the model's "
                                  "hyperparameters come from finetune.from_checkpoint")
            model, payload = load_checkpoint(cfg.finetune.from_checkpoint, return_payload=True)
            if cfg.model.name and cfg.model.name != payload["model"]:
                raise ConfigError(f"config key 'model.name' is {cfg.model.name!r} but "
                                  f"{cfg.finetune.from_checkpoint} holds a {payload['model']!r} model")
            log.info("fine-tuning from %s (%s)", cfg.finetune.from_checkpoint, payload["model"])
            model.train()
            return model, payload
        try:
            get_class(cfg.model.name)
        except KeyError as err:
            raise ConfigError(f"config key 'model.name': {err.args[0]}") from None
        hparams = check_hparams(cfg.model.name, cfg.model.hparams)
        if "species" not in hparams:
            if "cutoff" not in hparams and _model_default_cutoff(cfg.model.name) is None:
                raise ConfigError("config key 'model.hparams.cutoff' is required for this model")
            dataset = train_dataset
            if dataset is None:
                cutoff = hparams.get("cutoff", _model_default_cutoff(cfg.model.name))
                dataset = self._open(cfg.data.train, "data.train", cutoff)
                self._opened_train = dataset
            hparams["species"] = dataset_species(dataset)
            log.info("model species from the training data: %s", hparams["species"])
        try:
            model = build(cfg.model.name, **hparams)
        except (TypeError, ValueError, KeyError) as err:
            raise ConfigError(f"config key 'model.hparams': {err}") from err
        return model, None

    def _open(self, path, key: str, cutoff: float):
        """Open the dataset file of config key ``key``; its content is verified first (an HDF5 file's stored
        content hash is recomputed) and its fingerprint kept in ``self.data_hashes`` for the checkpoints. Any
        failure is a :class:`ConfigError` naming the key and the file."""
        if path is None:
            raise ConfigError(f"config key '{key}' is required (path of the dataset)")
        if not Path(path).is_file():
            raise ConfigError(f"config key '{key}': dataset not found: {path}")
        if key not in self.data_hashes:
            try:
                self.data_hashes[key] = dataset_fingerprint(path)
            except Exception as err:  # noqa: BLE001 - h5py/ase raise many types for a damaged file
                raise ConfigError(f"config key '{key}': {path} failed verification: {_one_line(err)}") from err
            log.info("%s: %s, content sha256 %s%s", key, path, self.data_hashes[key][:16],
                     " (stored content hash verified)" if Path(path).suffix.lower() in (".h5", ".hdf5") else "")
        try:
            dataset = load_dataset(path, cutoff)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"config key '{key}': cannot read {path} ({type(err).__name__}: "
                              f"{_one_line(err)})") from err
        if len(dataset) == 0:
            raise ConfigError(f"config key '{key}': {path} contains no structures")
        return dataset

    def _load_datasets(self, train_dataset, val_dataset):
        cutoff = self.model.cutoff
        train = train_dataset
        if train is None:
            train = getattr(self, "_opened_train", None) or self._open(self.config.data.train, "data.train", cutoff)
        val = val_dataset
        if val is None and self.config.data.val:
            val = self._open(self.config.data.val, "data.val", cutoff)
        self._check_cutoff(train)
        return train, val

    def _check_cutoff(self, dataset) -> None:
        """Refuse graphs built with a larger cutoff than the model's (the model would see extra pairs)."""
        if len(dataset) == 0:
            raise ConfigError("the training dataset is empty")
        graph = dataset[0]
        if graph.edge_index.numel():
            from ..graph import edge_vectors, graph_batch_vector

            vec = edge_vectors(graph.pos.double(), graph.cell.double(), graph.edge_index, graph.shifts,
                               graph_batch_vector(graph))
            longest = float(vec.norm(dim=1).max())
            if longest > self.model.cutoff + 1e-6:
                raise ConfigError(f"the training graphs contain pairs up to {longest:.3f} Å but the model cutoff "
                                  f"is {self.model.cutoff} Å: build the graphs with the model's cutoff")

    def _split(self, resume_payload) -> None:
        cfg = self.config.data
        n = len(self.train_full)
        split_from = "seed"
        if resume_payload is not None:
            state = resume_payload["training_state"]
            self.train_indices = [int(i) for i in state["train_indices"].tolist()]
            self.val_indices = [int(i) for i in state["val_indices"].tolist()]
            split_from = "restored from the checkpoint, made with seed"  # data.seed is checked to be the same
        elif self.val_full is not None:
            self.train_indices, self.val_indices = list(range(n)), list(range(len(self.val_full)))
        else:
            self.train_indices, self.val_indices = random_split(n, cfg.val_fraction, cfg.seed)
        if self.val_full is not None:
            self.val_set = self.val_full
            log.info("training on %d structures; validation on %d structures of %s", len(self.train_indices),
                     len(self.val_indices), self.config.data.val or "the given validation dataset")
        else:
            self.val_set = self.train_full
            log.info("training on %d structures; validation split: %d structures (%.1f%%, %s %d) held out "
                     "of the training data and never trained on", len(self.train_indices), len(self.val_indices),
                     100.0 * len(self.val_indices) / max(n, 1), split_from, cfg.seed)
        if not self.train_indices:
            raise ConfigError("no training structures left after the validation split")

    def _report_labels(self) -> None:
        """Log one line per split saying how many frames carry NaN/inf labels (ignored by the loss) or no label
        the weighted loss terms can use (dropped), with a few frame ids; refuse a training split where no frame
        has a usable label."""
        weights = {"energy": self.config.loss.energy_weight, "forces": self.config.loss.forces_weight,
                   "stress": self.config.loss.stress_weight}
        train_name = self.config.data.train or "the training data"
        val_name = (self.config.data.val or "the validation data") if self.val_full is not None else train_name
        for what, dataset, indices in ((f"training split of {train_name}", self.train_full, self.train_indices),
                                       (f"validation split of {val_name}", self.val_set, self.val_indices)):
            if not indices:
                continue
            scan = scan_labels(dataset, indices, weights)
            line = scan.summary(dataset)
            if line:
                log.warning("%s: %s", what, line)
            if what.startswith("training") and len(scan.unusable) == len(indices):
                used = [k for k, w in weights.items() if w > 0]
                raise ConfigError(f"{what}: none of the {len(indices)} frames has a usable (finite) label for the "
                                  f"weighted loss terms {used}")

    def _check_resume_settings(self, payload: Dict, path) -> None:
        """Refuse to resume with a different run.seed (the batch order of later epochs comes from it) or, for a
        random validation split, a different data.seed / data.val_fraction (the split is restored from the
        checkpoint, so the new values would be reported but not used)."""
        old = (payload.get("metadata") or {}).get("config") or {}
        keys = [("run", "seed")]
        if not (old.get("data") or {}).get("val") and not self.config.data.val:
            keys += [("data", "seed"), ("data", "val_fraction")]
        for section, key in keys:
            if key not in (old.get(section) or {}):
                continue
            before, now = old[section][key], getattr(getattr(self.config, section), key)
            if before != now:
                raise ConfigError(f"--resume {path}: config key '{section}.{key}' is {now!r} but the checkpoint's "
                                  f"run used {before!r}; resume with {section}.{key}={before!r} (or start a new run)")

    def _check_resume_data(self, payload: Dict, path) -> None:
        """Refuse to resume on other data than the checkpoint's run: a different content hash, or (checkpoints
        without a hash, in-memory datasets) a different path; and a split that does not fit the dataset."""
        meta = payload.get("metadata") or {}
        old_data = (meta.get("config") or {}).get("data") or {}
        for key, hash_key in (("train", "dataset_sha256"), ("val", "val_dataset_sha256")):
            before_path, now_path = old_data.get(key), getattr(self.config.data, key)
            before_hash, now_hash = meta.get(hash_key), self.data_hashes.get(f"data.{key}")
            if before_hash and now_hash:
                same = before_hash == now_hash
            else:
                same = before_path == now_path or (before_path is not None and now_path is not None
                                                   and Path(before_path).resolve() == Path(now_path).resolve())
            if not same:
                described = [f"{p} (sha256 {h[:16]}...)" if h else str(p) for p, h in
                             ((now_path, now_hash), (before_path, before_hash))]
                raise ConfigError(f"--resume {path}: config key 'data.{key}' is {described[0]} but the checkpoint "
                                  f"was trained on {described[1]}; resume on the same data, or start a new run "
                                  f"from its weights with finetune.from_checkpoint")
        state = payload["training_state"]
        val_size = len(self.val_full) if self.val_full is not None else len(self.train_full)
        for name, size in (("train_indices", len(self.train_full)), ("val_indices", val_size)):
            indices = state[name]
            if indices.numel() and int(indices.max()) >= size:
                raise ConfigError(f"--resume {path}: the checkpoint's split refers to structure {int(indices.max())} "
                                  f"but the dataset has {size}: not the data the run was trained on")

    def _fit_output_transform(self) -> None:
        refs_setting, scale_setting, shift_setting = self.config.model.resolved(self.finetune_payload is not None)
        try:  # the data or the settings do not fit the model (unknown elements, no energy labels, bad names)
            stats = collect_statistics(self.train_full, self.train_indices, self.model.species)
            current = self.model.atomic_reference_energies.detach().cpu().numpy()
            refs = resolve_reference_energies(refs_setting, self.model.species, stats, current)
            scale, shift = resolve_scale_shift(scale_setting, shift_setting, stats, refs,
                                               float(self.model.scale), float(self.model.shift))
        except (ValueError, KeyError) as err:
            message = _one_line(err).strip("'\"")
            where = "" if message.startswith("config key") else \
                f"training split of {self.config.data.train or 'the training data'}: "
            raise ConfigError(where + message) from err
        with torch.no_grad():
            self.model.atomic_reference_energies.copy_(torch.as_tensor(refs, dtype=torch.float64))
            self.model.scale.fill_(scale)
            self.model.shift.fill_(shift)
        from ase.data import chemical_symbols

        log.info("reference energies (%s, eV): %s", refs_setting,
                 ", ".join(f"{chemical_symbols[z]} {e:.6f}" for z, e in zip(self.model.species, refs)))
        log.info("output scale %.6g (%s), shift %.6g eV/atom (%s)", scale, scale_setting, shift, shift_setting)

    def _wrap_ddp(self):
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=False)

    def _tensorboard(self):
        if not (self.config.run.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("config key 'run.tensorboard' is true but the tensorboard package is not "
                              "installed (pip install tensorboard)") from None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    # ---- batching ---------------------------------------------------------------------------------------------
    def _make_epoch_batches(self, epoch: int) -> List[List[int]]:
        d = self.config.data
        return epoch_batches(self.train_indices, self.sizes, self.config.run.seed, epoch, d.batch_size,
                             d.max_atoms_per_batch, d.shuffle)

    def _local(self, global_batch: List[int]):
        """This rank's part of a global batch: ``(indices, padding)``. A rank left without structures (global
        batch smaller than the number of ranks) computes on the batch's first structure with every label
        masked: its gradient is exactly zero but it joins the all-reduce."""
        if not self.dist.enabled:
            return global_batch, False
        parts = split_global_batch(global_batch, [int(self.sizes[i]) for i in global_batch], self.dist.world_size)
        part = parts[self.dist.rank]
        return (part, False) if part else ([global_batch[0]], True)

    def _loader(self, dataset, batches: List[List[int]]) -> DataLoader:
        workers = self.config.data.num_workers
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                          generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
                          persistent_workers=False)

    # ---- one optimiser step -------------------------------------------------------------------------------------
    def train_step(self, batch, padding: bool = False) -> Dict[str, float]:
        """Forward, loss, backward, clip, AdamW step and EMA update on this rank's part of a global batch
        (``padding``: the part is a stand-in whose labels are all masked)."""
        self.model.train()
        # forces/stress only when their loss uses them: a gradient taken without create_graph would free the
        # graph that the energy loss still needs (energy-only training)
        need_forces = self.weights["forces"] > 0
        need_stress = self.weights["stress"] > 0
        lr = self.schedule.apply(self.step)
        pred = self.ddp_model(batch, forces=need_forces, stress=need_stress, training=need_forces or need_stress)
        targets = batch_targets(batch)
        if padding:
            for name in ("energy_mask", "forces_mask", "stress_mask"):
                getattr(targets, name).zero_()
        counts = loss_counts(targets).as_tensor()
        all_reduce_sum(counts)
        terms = loss_terms(pred, targets, LossCounts.from_tensor(counts), self.weights, self.config.loss.kind,
                           self.config.loss.huber_delta)
        loss = terms["total"]
        if self.dist.enabled:
            # DDP averages gradients over ranks: scale so the average is the global-batch gradient, and touch
            # every parameter (exact zeros) so DDP's reducer sees them all even if a term does not use one.
            loss = loss * self.dist.world_size + sum(p.reshape(-1)[0] * 0.0 for _, p in self.trainable)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = math.nan
        if self.config.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable],
                                                             self.config.optim.grad_clip))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.epoch_errors.update({k: v.detach() for k, v in pred.items()}, targets)
        names = ("total", "energy", "forces", "stress")
        logged = torch.tensor([float(terms[k].detach()) if k in terms else 0.0 for k in names], dtype=torch.float64)
        all_reduce_sum(logged)  # per-rank terms are already normalised by global counts: the sum is global
        result = dict(zip(("loss", "loss_energy", "loss_forces", "loss_stress"), logged.tolist()))
        result.update(lr=lr, grad_norm=grad_norm)
        return result

    # ---- main loop ------------------------------------------------------------------------------------------------
    def fit(self) -> Dict:
        """Train until ``optim.epochs`` or ``optim.max_steps``; returns a summary (best validation metrics,
        paths). Always releases logging handlers and the process group, even on errors."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> Dict:
        cfg = self.config
        progress = _SimpleProgress(self.is_main and (cfg.run.progress == "on" or
                                                     (cfg.run.progress == "auto" and sys.stderr.isatty())))
        self._prepare_csv()
        log.info("model %s: %d parameters (%d trainable); %d optimiser steps planned (%d per epoch), "
                 "device %s, dtype %s", self.model.model_name, sum(p.numel() for p in self.model.parameters()),
                 sum(p.numel() for _, p in self.trainable), self.total_steps, self.steps_per_epoch, self.device,
                 cfg.run.dtype)
        stopped = self._reached_max_steps()  # e.g. resuming a run that already reached optim.max_steps
        while self.epoch < cfg.optim.epochs and not stopped:
            if self.current_batches is None:
                self.current_batches = self._make_epoch_batches(self.epoch)
                self.step_in_epoch = 0
                self.epoch_errors = ErrorAccumulator(self.device)
                self.epoch_loss.zero_()
            parts = [self._local(b) for b in self.current_batches[self.step_in_epoch:]]
            local = [indices for indices, _ in parts]
            padded = [pad for _, pad in parts]
            bar = progress(self._loader(self.train_full, local), total=len(local),
                           desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}", leave=False)
            for position, batch in enumerate(bar):
                t0 = time.perf_counter()
                result = self.train_step(prepare_batch(batch, self.device, self.dtype), padded[position])
                self.elapsed += time.perf_counter() - t0
                self.step += 1
                self.step_in_epoch += 1
                self.epoch_loss += torch.tensor([result["loss"], 1.0], dtype=torch.float64)
                self.last_step_loss = result
                if not math.isfinite(result["loss"]):
                    raise FloatingPointError(f"training loss is {result['loss']} at step {self.step}; lower "
                                             f"optim.lr or check the labels")
                if self.step % cfg.run.log_every == 0:
                    self._log_step(result)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{result['loss']:.4g}", lr=f"{result['lr']:.2e}")
                if cfg.run.checkpoint_every_steps and self.step % cfg.run.checkpoint_every_steps == 0:
                    self.save_latest()
                for callback in self.callbacks:
                    callback(self)
                if self._reached_max_steps():
                    break
            stopped = self._reached_max_steps()
            if stopped and self.step_in_epoch < len(self.current_batches):
                self._end_of_training_validation()
                break
            self._end_epoch()
        return self._finish()

    def _reached_max_steps(self) -> bool:
        return bool(self.config.optim.max_steps) and self.step >= self.config.optim.max_steps

    def _end_epoch(self) -> None:
        self.epoch += 1
        validate = self.epoch % self.config.run.validate_every_epochs == 0 or self.epoch == self.config.optim.epochs
        val_loss, val_metrics = self.validate() if validate else (None, {})
        train_metrics = self._train_epoch_metrics()
        self._write_epoch_row(train_metrics, val_loss, val_metrics)
        if val_loss is not None:
            self.schedule.observe_validation(val_loss)
            if val_loss < self.best_val_loss:
                self.best_val_loss = val_loss
                self.best_val_metrics = val_metrics
                self.save_best(val_metrics)
        self.current_batches = None
        self.step_in_epoch = 0
        self.save_latest()

    def _end_of_training_validation(self) -> None:
        """``max_steps`` reached mid-epoch: validate and save (the position in the epoch is kept)."""
        val_loss, val_metrics = self.validate()
        self._write_epoch_row(self._train_epoch_metrics(), val_loss, val_metrics, kind="final")
        if val_loss is not None and val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.best_val_metrics = val_metrics
            self.save_best(val_metrics)
        self.save_latest()

    def _train_epoch_metrics(self) -> Dict:
        sums = self.epoch_errors.sums.clone()
        all_reduce_sum(sums)
        acc = ErrorAccumulator()
        acc.sums = sums
        metrics = acc.metrics()
        steps = float(self.epoch_loss[1])
        metrics["loss"] = float(self.epoch_loss[0]) / steps if steps else None
        return metrics

    # ---- validation -----------------------------------------------------------------------------------------
    def _val_loader(self):
        indices = self.val_indices[self.dist.rank::self.dist.world_size]
        bs = self.config.data.batch_size
        return self._loader(self.val_set, [indices[k:k + bs] for k in range(0, len(indices), bs)])

    def validate(self, collect: bool = False):
        """Validation loss and metrics with the EMA weights (None, {} without a validation set)."""
        if not self.val_indices:
            return None, {}
        context = self.ema.applied() if self.ema is not None else _nullcontext()
        with context:
            result = run_inference(self.model, self._val_loader(), self.device, self.dtype,
                                   stress=None, kind=self.config.loss.kind, huber_delta=self.config.loss.huber_delta,
                                   collect=collect)
        self.model.train()
        loss = result.loss(self.weights)
        metrics = result.metrics()
        if collect:
            return loss, metrics, result
        return loss, metrics

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _metadata(self, **extra) -> Dict:
        import matkit

        return {"matkit_version": matkit.__version__, "torch_version": str(torch.__version__),
                "config": config_to_dict(self.config), "epoch": self.epoch, "step": self.step,
                "train_structures": len(self.train_indices), "val_structures": len(self.val_indices),
                "dataset": self.config.data.train, "dataset_sha256": self.data_hashes.get("data.train"),
                "val_dataset_sha256": self.data_hashes.get("data.val"), **extra}

    def training_state(self) -> Dict:
        """Everything needed to continue exactly (tensors and plain containers only)."""
        flat, lengths = flatten_batches(self.current_batches or [])
        return {
            "version": TRAINING_STATE_VERSION,
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "epoch_batches": torch.tensor(flat, dtype=torch.int64),
            "epoch_batch_lengths": torch.tensor(lengths, dtype=torch.int64),
            "has_epoch_batches": self.current_batches is not None,
            "train_indices": torch.tensor(self.train_indices, dtype=torch.int64),
            "val_indices": torch.tensor(self.val_indices, dtype=torch.int64),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "best_val_loss": self.best_val_loss,
            "best_val_metrics": {k: v for k, v in self.best_val_metrics.items() if v is not None},
            "epoch_errors": self.epoch_errors.sums.detach().cpu().clone(),
            "epoch_loss": self.epoch_loss.clone(),
            "elapsed_s": self.elapsed,
            "world_size": self.dist.world_size,
            "frozen": list(self.frozen),
        }

    def save_latest(self) -> Optional[Path]:
        """Write ``latest.pt`` (rank 0; all ranks wait)."""
        path = None
        if self.is_main:
            path = save_checkpoint(self.model, self.out_dir / "latest.pt", self._metadata(kind="latest"),
                                   extra={"training_state": self.training_state()})
        barrier()
        return path

    def save_best(self, val_metrics: Dict) -> None:
        """Write ``best.pt`` with the EMA weights (rank 0)."""
        if self.is_main:
            context = self.ema.applied() if self.ema is not None else _nullcontext()
            with context:
                save_checkpoint(self.model, self.out_dir / "best.pt",
                                self._metadata(kind="best", val_loss=self.best_val_loss, val_metrics=val_metrics,
                                               ema=self.ema is not None, train_indices=self.train_indices,
                                               val_indices=self.val_indices))
            log.info("new best validation loss %.6g: saved %s", self.best_val_loss, self.out_dir / "best.pt")
        barrier()

    def _load_training_state(self, payload: Dict, path) -> None:
        state = payload["training_state"]
        if int(state["version"]) > TRAINING_STATE_VERSION:
            raise ConfigError(f"{path}: training state version {state['version']} is newer than this matkit")
        try:
            self.model.load_state_dict(payload["state_dict"])
        except RuntimeError as err:
            raise ConfigError(f"--resume {path}: weights do not match the configured model: {err}") from None
        self.model.to(device=self.device, dtype=self.dtype)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ConfigError(f"--resume {path}: the run had no EMA but optim.ema_decay > 0 now")
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.current_batches = (unflatten_batches(state["epoch_batches"].tolist(),
                                                  state["epoch_batch_lengths"].tolist())
                                if state["has_epoch_batches"] else None)
        self.best_val_loss = float(state["best_val_loss"])
        self.best_val_metrics = dict(state.get("best_val_metrics") or {})
        self.epoch_errors.sums.copy_(state["epoch_errors"])
        self.epoch_loss.copy_(state["epoch_loss"])
        self.elapsed = float(state["elapsed_s"])
        if int(state["world_size"]) != self.dist.world_size:
            log.warning("resuming a %d-rank run with %d ranks: same global batches, different summation order",
                        int(state["world_size"]), self.dist.world_size)
        set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d, step %d (step %d of the epoch)", path, self.epoch + 1, self.step,
                 self.step_in_epoch)

    # ---- logging ------------------------------------------------------------------------------------------------
    def _prepare_csv(self) -> None:
        """Create ``metrics.csv``; on resume keep only the rows written up to the checkpoint (later rows are
        written again by the resumed run)."""
        if not self.is_main:
            return
        path = self.out_dir / "metrics.csv"
        rows = []
        if path.exists() and self.step > 0:
            epoch_done = self.current_batches is None
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    step = int(row["step"])
                    if step < self.step or (step == self.step and (row["kind"] == "step" or epoch_done)):
                        rows.append(row)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def _append_csv(self, row: Dict) -> None:
        if not self.is_main:
            return
        with open(self.out_dir / "metrics.csv", "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})

    def _log_step(self, result: Dict) -> None:
        row = {"kind": "step", "epoch": self.epoch + 1, "step": self.step, "lr": result["lr"],
               "time_s": round(self.elapsed, 4), "loss": result["loss"], "loss_energy": result["loss_energy"],
               "loss_forces": result["loss_forces"], "loss_stress": result["loss_stress"]}
        self._append_csv(row)
        if self.writer is not None:
            for key in ("loss", "loss_energy", "loss_forces", "loss_stress", "lr"):
                self.writer.add_scalar(f"train/{key}", result[key], self.step)

    def _write_epoch_row(self, train_metrics: Dict, val_loss, val_metrics: Dict, kind: str = "epoch") -> None:
        row = {"kind": kind, "epoch": self.epoch, "step": self.step, "lr": self.schedule.lr_at(max(self.step - 1, 0)),
               "time_s": round(self.elapsed, 4), "loss": train_metrics.get("loss"), "val_loss": val_loss}
        for key in ("energy", "forces", "stress"):
            for stat in ("mae", "rmse"):
                row[f"train_{key}_{stat}"] = train_metrics.get(f"{key}_{stat}")
                row[f"val_{key}_{stat}"] = val_metrics.get(f"{key}_{stat}")
        self._append_csv(row)
        self.history.append(row)
        fmt = lambda x, s=1000.0: "n/a" if x is None else f"{s * x:.2f}"  # noqa: E731
        log.info("epoch %d step %d: train loss %s | val loss %s, E MAE %s meV/atom, F MAE %s meV/Å, "
                 "S MAE %s meV/Å^3 (validation split, EMA weights)", self.epoch, self.step,
                 "n/a" if row["loss"] is None else f"{row['loss']:.5g}",
                 "n/a" if val_loss is None else f"{val_loss:.5g}", fmt(val_metrics.get("energy_mae")),
                 fmt(val_metrics.get("forces_mae")), fmt(val_metrics.get("stress_mae")))
        if self.writer is not None:
            for key, value in row.items():
                if key.startswith(("val_", "train_")) and value is not None:
                    self.writer.add_scalar(key.replace("_", "/", 1), value, self.step)

    def _finish(self) -> Dict:
        summary = {"epochs": self.epoch, "steps": self.step, "best_val_loss": self.best_val_loss,
                   "best_val_metrics": self.best_val_metrics, "out_dir": str(self.out_dir),
                   "history": self.history}
        best = self.out_dir / "best.pt"
        if self.config.run.parity_plots and self.val_indices and self.is_main and best.exists():
            paths = self._parity_plots(best)
            if paths:
                summary["plots"] = [str(p) for p in paths]
        # all ranks leave together: a rank that tears the process group down while rank 0 is still plotting can
        # leave rank 0 waiting forever in destroy_process_group (seen with gloo under load)
        barrier()
        log.info("finished after %d epochs, %d steps; best validation loss %.6g; checkpoints in %s",
                 self.epoch, self.step, self.best_val_loss, self.out_dir)
        return summary

    def _parity_plots(self, best: Path):
        """Parity plots of the best (EMA) weights on the whole validation split, computed by rank 0 alone
        (no collectives, so other ranks may already have finished)."""
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("matplotlib is not installed: no parity plots")
            return []
        from .plots import write_parity_plots

        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(read_checkpoint(best)["state_dict"])
        bs = self.config.data.batch_size
        indices = self.val_indices
        loader = self._loader(self.val_set, [indices[k:k + bs] for k in range(0, len(indices), bs)])
        try:
            result = run_inference(self.model, loader, self.device, self.dtype, collect=True, reduce=False)
        finally:
            self.model.load_state_dict(current)
            self.model.train()
        paths = write_parity_plots(result.predictions.arrays(), self.out_dir, "validation split")
        log.info("parity plots (validation split, best model): %s", ", ".join(map(str, paths)))
        return paths


def _one_line(err: BaseException) -> str:
    """An exception as one line: its message with whitespace collapsed (its type when the message is empty)."""
    return " ".join(str(err).split()) or type(err).__name__


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(config: TrainConfig, train_dataset=None, val_dataset=None, resume: Optional[str] = None,
          callbacks: Sequence[Callable] = ()) -> Dict:
    """Build a :class:`Trainer` and run it; returns the summary of :meth:`Trainer.fit`."""
    trainer = Trainer(config, train_dataset, val_dataset, resume=resume, callbacks=callbacks)
    return trainer.fit()
