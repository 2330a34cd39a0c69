"""What a training run writes for people to read: ``train.log`` and the console lines, ``metrics.csv`` (one row
per logged step and per epoch), TensorBoard scalars, progress bars and, at the end, parity plots of the best
weights. Only rank 0 writes; the other ranks' :class:`RunLog` methods do nothing.

Units in ``metrics.csv``: energy MAE / RMSE in eV/atom, force components in eV/Å, stress components in eV/Å^3
(:class:`~matkit.training.losses.ErrorAccumulator`); ``time_s``: seconds spent in optimiser steps since the
start of the run.
"""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..checkpoint import read_checkpoint
from .config import ConfigError
from .evaluate import run_inference

log = logging.getLogger("matkit.training")

__all__ = ["CSV_COLUMNS", "RunLog", "Progress", "parity_plots"]

CSV_COLUMNS = ["kind", "epoch", "step", "lr", "time_s", "loss", "loss_energy", "loss_forces", "loss_stress",
               "train_energy_mae", "train_energy_rmse", "train_forces_mae", "train_forces_rmse",
               "train_stress_mae", "train_stress_rmse", "val_loss", "val_energy_mae", "val_energy_rmse",
               "val_forces_mae", "val_forces_rmse", "val_stress_mae", "val_stress_rmse"]


class RunLog:
    """The log files of the run in ``out_dir``. ``is_main``: this process is rank 0 (the only one that writes).

    :meth:`open` attaches ``train.log`` and stderr to the ``matkit.training`` logger; :meth:`open_tensorboard`
    starts the TensorBoard writer (``writer``, else None); :meth:`close_tensorboard` / :meth:`close` release them.
    """

    def __init__(self, out_dir: Path, is_main: bool):
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self.writer = None
        self._handlers: List[logging.Handler] = []

    def open(self) -> None:
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

    def open_tensorboard(self, enabled: bool) -> None:
        """Start a ``SummaryWriter`` in ``out_dir/tensorboard`` (config key ``run.tensorboard``)."""
        if not (enabled and self.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("config key 'run.tensorboard' is true but the tensorboard package is not "
                              "installed (pip install tensorboard)") from None
        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def close_tensorboard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        """Detach and close the log handlers (after :meth:`close_tensorboard`)."""
        for handler in self._handlers:
            log.removeHandler(handler)
            handler.close()
        self._handlers = []

    # ---- metrics.csv ------------------------------------------------------------------------------------------
    def prepare_csv(self, step: int, epoch_done: bool) -> None:
        """Create ``metrics.csv``. Resuming at optimiser step ``step`` (``epoch_done``: at an epoch's end), keep
        only the rows written up to that point: the resumed run writes the later rows again."""
        if not self.is_main:
            return
        path = self.out_dir / "metrics.csv"
        rows = []
        if path.exists() and step > 0:
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    row_step = int(row["step"])
                    if row_step < step or (row_step == step and (row["kind"] == "step" or epoch_done)):
                        rows.append(row)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def append_csv(self, row: Dict) -> None:
        """Append ``row`` (missing or None columns are left empty)."""
        if not self.is_main:
            return
        with open(self.out_dir / "metrics.csv", "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})

    # ---- rows -------------------------------------------------------------------------------------------------
    def log_step(self, epoch: int, step: int, elapsed: float, result: Dict) -> None:
        """A ``step`` row: the losses and learning rate of optimiser step ``step`` (``result`` of
        :meth:`~matkit.training.trainer.Trainer.train_step`) in 1-based epoch ``epoch``."""
        row = {"kind": "step", "epoch": epoch, "step": step, "lr": result["lr"],
               "time_s": round(elapsed, 4), "loss": result["loss"], "loss_energy": result["loss_energy"],
               "loss_forces": result["loss_forces"], "loss_stress": result["loss_stress"]}
        self.append_csv(row)
        if self.writer is not None:
            for key in ("loss", "loss_energy", "loss_forces", "loss_stress", "lr"):
                self.writer.add_scalar(f"train/{key}", result[key], step)

    def log_epoch(self, kind: str, epoch: int, step: int, lr: float, elapsed: float, train_metrics: Dict,
                  val_loss: Optional[float], val_metrics: Dict) -> Dict:
        """An ``epoch`` row (``final``: training stopped mid-epoch) with the epoch's mean training loss and
        errors and the validation loss and errors (EMA weights); also a console line. Returns the row."""
        row = {"kind": kind, "epoch": epoch, "step": step, "lr": lr,
               "time_s": round(elapsed, 4), "loss": train_metrics.get("loss"), "val_loss": val_loss}
        for key in ("energy", "forces", "stress"):
            for stat in ("mae", "rmse"):
                row[f"train_{key}_{stat}"] = train_metrics.get(f"{key}_{stat}")
                row[f"val_{key}_{stat}"] = val_metrics.get(f"{key}_{stat}")
        self.append_csv(row)
        fmt = lambda x, s=1000.0: "n/a" if x is None else f"{s * x:.2f}"  # noqa: E731
        log.info("epoch %d step %d: train loss %s | val loss %s, E MAE %s meV/atom, F MAE %s meV/Å, "
                 "S MAE %s meV/Å^3 (validation split, EMA weights)", epoch, step,
                 "n/a" if row["loss"] is None else f"{row['loss']:.5g}",
                 "n/a" if val_loss is None else f"{val_loss:.5g}", fmt(val_metrics.get("energy_mae")),
                 fmt(val_metrics.get("forces_mae")), fmt(val_metrics.get("stress_mae")))
        if self.writer is not None:
            for key, value in row.items():
                if key.startswith(("val_", "train_")) and value is not None:
                    self.writer.add_scalar(key.replace("_", "/", 1), value, step)
        return row


class Progress:
    """tqdm progress bars when ``enabled``; otherwise the iterable is returned unchanged."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, iterable, **kwargs):
        if not self.enabled:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)


def parity_plots(model: torch.nn.Module, best: Path, loader, device: torch.device, dtype: torch.dtype,
                 out_dir: Path) -> List[Path]:
    """Parity plots of the weights in ``best`` (``best.pt``) on ``loader`` (the whole validation split), written
    to ``out_dir``. ``model`` gets its own weights back afterwards. No collectives: rank 0 calls it alone.
    Returns the PNG paths (none without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no parity plots")
        return []
    from .plots import write_parity_plots

    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(read_checkpoint(best)["state_dict"])
    try:
        result = run_inference(model, loader, device, dtype, collect=True, reduce=False)
    finally:
        model.load_state_dict(current)
        model.train()
    paths = write_parity_plots(result.predictions.arrays(), out_dir, "validation split")
    log.info("parity plots (validation split, best model): %s", ", ".join(map(str, paths)))
    return paths
