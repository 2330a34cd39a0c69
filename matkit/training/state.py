"""Checkpoint and resume state of a training run: what ``latest.pt`` and ``best.pt`` hold, how a run is put back
from ``latest.pt``, the RNG states, and the checks that refuse a resume on other data or seeds.

Both files are matkit checkpoints (:func:`matkit.checkpoint.save_checkpoint`: model name, hyperparameters,
``state_dict``, ``metadata``). ``metadata`` (:func:`checkpoint_metadata`) holds the versions, the full config,
epoch, step, split sizes and the sha256 fingerprints of the datasets.

* ``latest.pt`` holds the raw (not averaged) weights and ``training_state`` (:func:`training_state`), the
  entry that lets a resumed run continue bit for bit: epoch / step / position in the epoch and that epoch's
  batch order, the train / validation indices, optimiser, LR schedule, EMA and RNG states, the best
  validation loss so far, the epoch's running error sums and losses, the elapsed time, the number of ranks and
  the frozen parameter names. Tensors and plain containers only, so it loads with ``weights_only=True``.
* ``best.pt`` holds the EMA weights (the raw ones with ``optim.ema_decay: 0``) at the lowest validation loss so
  far, with ``val_loss``, ``val_metrics`` and the split indices in its metadata (``potentials/publish.py``
  publishes this file).

The functions that read or write a run's state take the :class:`~matkit.training.trainer.Trainer` and use its
attributes of the same names (``epoch``, ``step``, ``optimizer``, ``schedule``, ``ema``, ...).
"""
from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import read_checkpoint, save_checkpoint
from .batching import flatten_batches, unflatten_batches
from .config import ConfigError, TrainConfig, config_to_dict
from .ddp import barrier

log = logging.getLogger("matkit.training")

__all__ = ["TRAINING_STATE_VERSION", "seed_everything", "rng_state", "set_rng_state", "read_resume_checkpoint",
           "check_resume_settings", "check_resume_data", "restored_split", "checkpoint_metadata",
           "training_state", "save_latest", "save_best", "load_training_state"]

TRAINING_STATE_VERSION = 1


# ---- random number generators -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """Restore the generators from :func:`rng_state`'s dictionary (CUDA ones only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- before the model and data exist: is this a checkpoint this run may resume from? ---------------------------
def read_resume_checkpoint(path) -> Dict:
    """Read the ``--resume`` checkpoint; refuse one without a training state (``best.pt``, a published model)."""
    payload = read_checkpoint(path)
    if "training_state" not in payload:
        raise ConfigError(f"--resume {path}: the checkpoint has no training state (use latest.pt, or "
                          f"finetune.from_checkpoint to start a new run from its weights)")
    return payload


def check_resume_settings(config: TrainConfig, payload: Dict, path) -> None:
    """Refuse to resume with a different run.seed (the batch order of later epochs comes from it) or, for a
    random validation split, a different data.seed / data.val_fraction (the split is restored from the
    checkpoint, so the new values would be reported but not used)."""
    old = (payload.get("metadata") or {}).get("config") or {}
    keys = [("run", "seed")]
    if not (old.get("data") or {}).get("val") and not config.data.val:
        keys += [("data", "seed"), ("data", "val_fraction")]
    for section, key in keys:
        if key not in (old.get(section) or {}):
            continue
        before, now = old[section][key], getattr(getattr(config, section), key)
        if before != now:
            raise ConfigError(f"--resume {path}: config key '{section}.{key}' is {now!r} but the checkpoint's "
                              f"run used {before!r}; resume with {section}.{key}={before!r} (or start a new run)")


def check_resume_data(config: TrainConfig, payload: Dict, path, data_hashes: Dict[str, Optional[str]],
                      train_size: int, val_size: int) -> None:
    """Refuse to resume on other data than the checkpoint's run: a different content hash, or (checkpoints
    without a hash, in-memory datasets) a different path; and a split that does not fit the dataset.

    ``data_hashes``: this run's fingerprints by config key (``data.train``, ``data.val``); ``train_size`` /
    ``val_size``: structures in the training dataset and in the one validated on (the training dataset itself
    for a held-out split)."""
    meta = payload.get("metadata") or {}
    old_data = (meta.get("config") or {}).get("data") or {}
    for key, hash_key in (("train", "dataset_sha256"), ("val", "val_dataset_sha256")):
        before_path, now_path = old_data.get(key), getattr(config.data, key)
        before_hash, now_hash = meta.get(hash_key), data_hashes.get(f"data.{key}")
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
    for name, size in (("train_indices", train_size), ("val_indices", val_size)):
        indices = state[name]
        if indices.numel() and int(indices.max()) >= size:
            raise ConfigError(f"--resume {path}: the checkpoint's split refers to structure {int(indices.max())} "
                              f"but the dataset has {size}: not the data the run was trained on")


def restored_split(payload: Dict) -> Tuple[List[int], List[int]]:
    """The checkpoint's ``(train, val)`` dataset indices."""
    state = payload["training_state"]
    return ([int(i) for i in state["train_indices"].tolist()], [int(i) for i in state["val_indices"].tolist()])


# ---- writing latest.pt / best.pt -----------------------------------------------------------------------------
def checkpoint_metadata(trainer, **extra) -> Dict:
    """The ``metadata`` entry of both checkpoints, plus ``extra``."""
    import matkit

    return {"matkit_version": matkit.__version__, "torch_version": str(torch.__version__),
            "config": config_to_dict(trainer.config), "epoch": trainer.epoch, "step": trainer.step,
            "train_structures": len(trainer.train_indices), "val_structures": len(trainer.val_indices),
            "dataset": trainer.config.data.train, "dataset_sha256": trainer.data_hashes.get("data.train"),
            "val_dataset_sha256": trainer.data_hashes.get("data.val"), **extra}


def training_state(trainer) -> Dict:
    """Everything needed to continue exactly (tensors and plain containers only)."""
    flat, lengths = flatten_batches(trainer.current_batches or [])
    return {
        "version": TRAINING_STATE_VERSION,
        "epoch": trainer.epoch, "step": trainer.step, "step_in_epoch": trainer.step_in_epoch,
        "epoch_batches": torch.tensor(flat, dtype=torch.int64),
        "epoch_batch_lengths": torch.tensor(lengths, dtype=torch.int64),
        "has_epoch_batches": trainer.current_batches is not None,
        "train_indices": torch.tensor(trainer.train_indices, dtype=torch.int64),
        "val_indices": torch.tensor(trainer.val_indices, dtype=torch.int64),
        "optimizer": trainer.optimizer.state_dict(),
        "schedule": trainer.schedule.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "rng": rng_state(),
        "best_val_loss": trainer.best_val_loss,
        "best_score": trainer.best_score,
        "best_val_metrics": {k: v for k, v in trainer.best_val_metrics.items() if v is not None},
        "epoch_errors": trainer.epoch_errors.sums.detach().cpu().clone(),
        "epoch_loss": trainer.epoch_loss.clone(),
        "elapsed_s": trainer.elapsed,
        "world_size": trainer.dist.world_size,
        "frozen": list(trainer.frozen),
    }


def save_latest(trainer) -> Optional[Path]:
    """Write ``latest.pt`` (rank 0; all ranks wait)."""
    path = None
    if trainer.is_main:
        path = save_checkpoint(trainer.model, trainer.out_dir / "latest.pt",
                               checkpoint_metadata(trainer, kind="latest"),
                               extra={"training_state": training_state(trainer)})
    barrier()
    return path


def save_best(trainer, val_metrics: Dict) -> None:
    """Write ``best.pt`` with the EMA weights (rank 0; all ranks wait)."""
    if trainer.is_main:
        path = trainer.out_dir / "best.pt"
        with trainer.ema.applied() if trainer.ema is not None else nullcontext():
            save_checkpoint(trainer.model, path,
                            checkpoint_metadata(trainer, kind="best", val_loss=trainer.best_val_loss,
                                                val_metrics=val_metrics, ema=trainer.ema is not None,
                                                train_indices=trainer.train_indices,
                                                val_indices=trainer.val_indices))
        log.info("new best validation %s %.6g: saved %s", trainer.config.run.select_by, trainer.best_score, path)
    barrier()


# ---- reading latest.pt back ------------------------------------------------------------------------------------
def load_training_state(trainer, payload: Dict, path) -> None:
    """Put the weights and the whole training state of ``payload`` (a ``latest.pt``) into ``trainer``, whose
    model, optimiser, schedule, EMA and error accumulator already exist; restores the RNG states last."""
    state = payload["training_state"]
    if int(state["version"]) > TRAINING_STATE_VERSION:
        raise ConfigError(f"{path}: training state version {state['version']} is newer than this matkit")
    try:
        trainer.model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"--resume {path}: weights do not match the configured model: {err}") from None
    trainer.model.to(device=trainer.device, dtype=trainer.dtype)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.schedule.load_state_dict(state["schedule"])
    if trainer.ema is not None:
        if state["ema"] is None:
            raise ConfigError(f"--resume {path}: the run had no EMA but optim.ema_decay > 0 now")
        trainer.ema.load_state_dict(state["ema"])
    trainer.epoch, trainer.step = int(state["epoch"]), int(state["step"])
    trainer.step_in_epoch = int(state["step_in_epoch"])
    trainer.current_batches = (unflatten_batches(state["epoch_batches"].tolist(),
                                                 state["epoch_batch_lengths"].tolist())
                               if state["has_epoch_batches"] else None)
    trainer.best_val_loss = float(state["best_val_loss"])
    trainer.best_score = float(state.get("best_score", state["best_val_loss"]))  # runs saved before select_by
    trainer.best_val_metrics = dict(state.get("best_val_metrics") or {})
    trainer.epoch_errors.sums.copy_(state["epoch_errors"])
    trainer.epoch_loss.copy_(state["epoch_loss"])
    trainer.elapsed = float(state["elapsed_s"])
    if int(state["world_size"]) != trainer.dist.world_size:
        log.warning("resuming a %d-rank run with %d ranks: same global batches, different summation order",
                    int(state["world_size"]), trainer.dist.world_size)
    set_rng_state(state["rng"])
    log.info("resumed from %s at epoch %d, step %d (step %d of the epoch)", path, trainer.epoch + 1, trainer.step,
             trainer.step_in_epoch)
