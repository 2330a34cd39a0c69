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

Steps 2-3 live in :mod:`matkit.training.prepare`, the checkpoints and resuming in :mod:`matkit.training.state`,
the log files and plots in :mod:`matkit.training.run_log`; this module holds the loop (epochs, optimiser steps,
validation, stopping) and the :class:`Trainer` that ties them together.

Resuming from ``latest.pt`` restores everything, so a run stopped at any step and resumed reproduces the
uninterrupted run bit for bit on CPU with ``run.deterministic: true``. A resume is refused when the dataset
(content hash, or path for checkpoints without one) or a seed / split setting differs from the checkpoint's run.

Data parallelism: each optimiser step takes one *global* batch, split over the ranks; every loss is a sum
over the local structures/atoms divided by the global count, multiplied by the number of ranks because DDP
averages gradients: the averaged gradient is the gradient of the global-batch loss, so R processes follow
the same trajectory as one process (to floating-point summation order).
"""
from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..allocator import keep_freed_memory
from .batching import epoch_batches
from .config import ConfigError, TrainConfig
from .datasets import StructureWeights, structure_sizes
from .ddp import (all_reduce_sum, barrier, cleanup_distributed, detect_distributed, init_distributed,
                  split_global_batch)
from .evaluate import collate, prepare_batch, run_inference
from .losses import ErrorAccumulator, LossCounts, batch_targets, loss_counts, loss_terms
from .prepare import (DatasetFiles, build_model, check_hparams, fit_output_transform, freeze_parameters,
                      load_datasets, random_split, report_labels, resolve_device, split_data,
                      structure_loss_weights)
from .run_log import CSV_COLUMNS, Progress, RunLog, parity_plots
from .schedule import ExponentialMovingAverage, LRSchedule
from .state import (TRAINING_STATE_VERSION, check_resume_data, check_resume_settings, load_training_state,
                    read_resume_checkpoint, restored_split, rng_state, save_best, save_latest, seed_everything,
                    set_rng_state, training_state)

log = logging.getLogger("matkit.training")

# random_split ... TRAINING_STATE_VERSION are defined in prepare / run_log / state and importable from here too
__all__ = ["Trainer", "train", "random_split", "freeze_parameters", "rng_state", "set_rng_state", "check_hparams",
           "CSV_COLUMNS", "TRAINING_STATE_VERSION"]


class Trainer:
    """Train a potential according to a :class:`~matkit.training.config.TrainConfig`.

    ``train_dataset`` / ``val_dataset``: optional datasets of labelled graphs (built with the model's
    cutoff) used instead of ``config.data.train`` / ``config.data.val``. ``resume``: a ``latest.pt`` path
    to continue from. ``callbacks``: functions ``f(trainer)`` called after every optimiser step.

    Loop state (saved in ``latest.pt``): ``epoch`` (epochs finished), ``step`` (optimiser steps done),
    ``step_in_epoch``, ``current_batches`` (the epoch's global batches, None between epochs), ``best_val_loss`` /
    ``best_score`` / ``best_val_metrics``, ``epoch_errors`` / ``epoch_loss`` (running sums of the epoch),
    ``elapsed`` (seconds in optimiser steps).
    """

    def __init__(self, config: TrainConfig, train_dataset=None, val_dataset=None, resume: Optional[str] = None,
                 callbacks: Sequence[Callable] = ()):
        self.config = config
        self.callbacks = list(callbacks)
        if config.run.keep_freed_memory:
            keep_freed_memory()
        self.dist = detect_distributed()
        self.device = resolve_device(config.run.device, self.dist.local_rank)
        init_distributed(self.dist, self.device)
        self.out_dir = Path(config.run.out_dir)
        self.run_log = RunLog(self.out_dir, self.dist.is_main)
        self.run_log.open()
        if self.dist.enabled:
            log.info("distributed: %d ranks (%s launcher), backend %s", self.dist.world_size, self.dist.launcher,
                     "nccl" if self.device.type == "cuda" else "gloo")
        try:
            self._setup(train_dataset, val_dataset, resume)
        except BaseException:
            self.close()
            raise

    def _setup(self, train_dataset, val_dataset, resume) -> None:
        config = self.config
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[config.run.dtype]
        seed_everything(config.run.seed)
        self._set_deterministic(config.run.deterministic)
        if config.model.module:
            importlib.import_module(config.model.module)

        # model and data (matkit.training.prepare); a resume is checked against the checkpoint's run first
        resume_payload = read_resume_checkpoint(resume) if resume else None
        if resume_payload is not None:
            check_resume_settings(config, resume_payload, resume)
        files = DatasetFiles()
        self.data_hashes = files.hashes
        self.model, self.finetune_payload = build_model(config, train_dataset, files)
        self.train_full, self.val_full = load_datasets(config, self.model, train_dataset, val_dataset, files)
        if resume_payload is not None:
            val_size = len(self.val_full) if self.val_full is not None else len(self.train_full)
            check_resume_data(config, resume_payload, resume, self.data_hashes, len(self.train_full), val_size)
        restored = restored_split(resume_payload) if resume_payload is not None else None
        self.train_indices, self.val_indices, self.val_set = split_data(config, self.train_full, self.val_full,
                                                                        restored)
        report_labels(config, self.train_full, self.train_indices, self.val_set, self.val_indices,
                      separate_val=self.val_full is not None)
        loss_weights = structure_loss_weights(config, self.train_full, self.train_indices)
        # what training batches are read from: the training data, with per-structure loss weights if any
        self.train_source = self.train_full if loss_weights is None else StructureWeights(self.train_full,
                                                                                         loss_weights)
        self.frozen = freeze_parameters(self.model, config.finetune.freeze)
        if self.frozen:
            log.info("frozen parameters (%d): %s", len(self.frozen), ", ".join(self.frozen))
        if resume_payload is None:
            fit_output_transform(config, self.model, self.train_full, self.train_indices,
                                 finetuning=self.finetune_payload is not None)
        self.model.to(device=self.device, dtype=self.dtype)

        # optimiser, schedule, EMA, DDP
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
        self.best_val_loss = math.inf    # the validation loss of best.pt
        self.best_score = math.inf       # the run.select_by number of best.pt (its validation loss by default)
        self.best_val_metrics: Dict = {}
        self.epoch_errors = ErrorAccumulator(self.device)
        self.epoch_loss = torch.zeros(2, dtype=torch.float64)  # sum of step losses, number of steps
        self.elapsed = 0.0
        self.last_step_loss: Optional[Dict[str, float]] = None
        self.history: List[Dict] = []
        if resume_payload is not None:
            load_training_state(self, resume_payload, resume)
        self.run_log.open_tensorboard(config.run.tensorboard)

    # ---- set-up and tear-down -----------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def writer(self):
        """The TensorBoard ``SummaryWriter`` (rank 0 with ``run.tensorboard: true``), else None."""
        return self.run_log.writer

    def close(self) -> None:
        """Release log handlers, TensorBoard writer and the process group."""
        run_log = getattr(self, "run_log", None)
        if run_log is not None:
            run_log.close_tensorboard()
        self._free_ddp_wrapper()
        cleanup_distributed()  # before the log handlers go: it may warn
        if run_log is not None:
            run_log.close()
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

    def _set_deterministic(self, enabled: bool) -> None:
        self._previous_deterministic = torch.are_deterministic_algorithms_enabled()
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            if torch.backends.cudnn.is_available():
                torch.backends.cudnn.benchmark = False
            log.info("deterministic mode: torch.use_deterministic_algorithms(True)")

    def _wrap_ddp(self):
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=False)

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

    def _val_loader(self, all_ranks: bool = False) -> DataLoader:
        """Batches of ``data.batch_size`` over this rank's share of the validation split (the whole split with
        ``all_ranks``)."""
        indices = self.val_indices if all_ranks else self.val_indices[self.dist.rank::self.dist.world_size]
        bs = self.config.data.batch_size
        return self._loader(self.val_set, [indices[k:k + bs] for k in range(0, len(indices), bs)])

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
        progress = Progress(self.is_main and (cfg.run.progress == "on" or
                                              (cfg.run.progress == "auto" and sys.stderr.isatty())))
        self.run_log.prepare_csv(self.step, epoch_done=self.current_batches is None)
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
            bar = progress(self._loader(self.train_source, local), total=len(local),
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
                    self.run_log.log_step(self.epoch + 1, self.step, self.elapsed, result)
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
        self._log_epoch(train_metrics, val_loss, val_metrics)
        if val_loss is not None:
            self.schedule.observe_validation(val_loss)
            self._keep_if_best(val_loss, val_metrics)
        self.current_batches = None
        self.step_in_epoch = 0
        self.save_latest()

    def _end_of_training_validation(self) -> None:
        """``max_steps`` reached mid-epoch: validate and save (the position in the epoch is kept)."""
        val_loss, val_metrics = self.validate()
        self._log_epoch(self._train_epoch_metrics(), val_loss, val_metrics, kind="final")
        if val_loss is not None:
            self._keep_if_best(val_loss, val_metrics)
        self.save_latest()

    def _keep_if_best(self, val_loss: float, val_metrics: Dict) -> None:
        """Save ``best.pt`` when the ``run.select_by`` number of this validation is the lowest so far."""
        select_by = self.config.run.select_by
        score = val_loss if select_by == "loss" else val_metrics[select_by]  # labels checked by report_labels
        if score < self.best_score:
            self.best_score = score
            self.best_val_loss = val_loss
            self.best_val_metrics = val_metrics
            self.save_best(val_metrics)

    def _train_epoch_metrics(self) -> Dict:
        sums = self.epoch_errors.sums.clone()
        all_reduce_sum(sums)
        acc = ErrorAccumulator()
        acc.sums = sums
        metrics = acc.metrics()
        steps = float(self.epoch_loss[1])
        metrics["loss"] = float(self.epoch_loss[0]) / steps if steps else None
        return metrics

    def _log_epoch(self, train_metrics: Dict, val_loss, val_metrics: Dict, kind: str = "epoch") -> None:
        """The epoch's row in ``metrics.csv`` and the console, with the learning rate of its last step."""
        lr = self.schedule.lr_at(max(self.step - 1, 0))
        self.history.append(self.run_log.log_epoch(kind, self.epoch, self.step, lr, self.elapsed, train_metrics,
                                                   val_loss, val_metrics))

    def _finish(self) -> Dict:
        summary = {"epochs": self.epoch, "steps": self.step, "best_val_loss": self.best_val_loss,
                   "best_val_metrics": self.best_val_metrics, "out_dir": str(self.out_dir),
                   "history": self.history}
        best = self.out_dir / "best.pt"
        if self.config.run.parity_plots and self.val_indices and self.is_main and best.exists():
            paths = parity_plots(self.model, best, self._val_loader(all_ranks=True), self.device, self.dtype,
                                 self.out_dir)
            if paths:
                summary["plots"] = [str(p) for p in paths]
        # all ranks leave together: a rank that tears the process group down while rank 0 is still plotting can
        # leave rank 0 waiting forever in destroy_process_group (seen with gloo under load)
        barrier()
        log.info("finished after %d epochs, %d steps; best validation loss %.6g; checkpoints in %s",
                 self.epoch, self.step, self.best_val_loss, self.out_dir)
        return summary

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self, collect: bool = False):
        """Validation loss and metrics with the EMA weights (None, {} without a validation set)."""
        if not self.val_indices:
            return None, {}
        with self.ema.applied() if self.ema is not None else nullcontext():
            result = run_inference(self.model, self._val_loader(), self.device, self.dtype,
                                   stress=None, kind=self.config.loss.kind, huber_delta=self.config.loss.huber_delta,
                                   collect=collect)
        self.model.train()
        loss = result.loss(self.weights)
        metrics = result.metrics()
        if collect:
            return loss, metrics, result
        return loss, metrics

    # ---- checkpoints (matkit.training.state) ------------------------------------------------------------------
    def training_state(self) -> Dict:
        """Everything needed to continue exactly (the ``training_state`` entry of ``latest.pt``)."""
        return training_state(self)

    def save_latest(self) -> Optional[Path]:
        """Write ``latest.pt`` (rank 0; all ranks wait)."""
        return save_latest(self)

    def save_best(self, val_metrics: Dict) -> None:
        """Write ``best.pt`` with the EMA weights (rank 0; all ranks wait)."""
        save_best(self, val_metrics)


def train(config: TrainConfig, train_dataset=None, val_dataset=None, resume: Optional[str] = None,
          callbacks: Sequence[Callable] = ()) -> Dict:
    """Build a :class:`Trainer` and run it; returns the summary of :meth:`Trainer.fit`."""
    trainer = Trainer(config, train_dataset, val_dataset, resume=resume, callbacks=callbacks)
    return trainer.fit()
