"""Learning-rate schedule and exponential moving average (EMA) of weights, with plain-data state dicts
(safe for ``torch.load(weights_only=True)``)."""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Tuple

import torch

__all__ = ["LRSchedule", "ExponentialMovingAverage"]


class LRSchedule:
    """``lr(step) = base_lr * warmup(step) * decay``.

    ``warmup``: linear from ``1/(warmup_steps+1)`` to 1 over ``warmup_steps`` steps.
    ``cosine``: ``min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of the
    post-warm-up steps done (``total_steps`` in all). ``plateau``: a factor multiplied by ``factor`` each time
    the validation loss has not improved (relative 1e-4) for ``patience`` epochs. ``constant``: 1.

    ``torch.optim.lr_scheduler`` is not used: ``LambdaLR`` computes ``base_lr * (warmup * plateau factor)``, which
    rounds differently from ``(base_lr * warmup) * factor`` here when a plateau cut falls in the warm-up,
    ``ReduceLROnPlateau`` rescales the current rate in place (which the warm-up overwrites every step), and their
    step counters and state dicts would change the ``schedule`` entry of existing checkpoints.
    """

    def __init__(self, optimizer, base_lr: float, kind: str, total_steps: int, warmup_steps: int = 0,
                 min_ratio: float = 0.0, factor: float = 0.5, patience: int = 5):
        self.optimizer = optimizer
        self.base_lr, self.kind = float(base_lr), kind
        self.total_steps, self.warmup_steps = max(int(total_steps), 1), int(warmup_steps)
        self.min_ratio, self.factor, self.patience = float(min_ratio), float(factor), int(patience)
        self.plateau_scale = 1.0
        self.best = math.inf
        self.bad_epochs = 0

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step number ``step`` (0-based)."""
        lr = self.base_lr
        if self.warmup_steps and step < self.warmup_steps:
            lr *= (step + 1) / (self.warmup_steps + 1)
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            t = min(max(step - self.warmup_steps, 0) / span, 1.0)
            lr *= self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.kind == "plateau":
            lr *= self.plateau_scale
        return lr

    def apply(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def observe_validation(self, loss: float) -> None:
        """Plateau bookkeeping after a validation (no effect for other schedules)."""
        if self.kind != "plateau" or not math.isfinite(loss):
            return
        if loss < self.best * (1.0 - 1e-4):
            self.best, self.bad_epochs = loss, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.plateau_scale *= self.factor
                self.bad_epochs = 0

    def state_dict(self) -> Dict:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Dict) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])


class ExponentialMovingAverage:
    """EMA of the trainable parameters: ``shadow <- d * shadow + (1 - d) * param`` after every step with
    ``d = min(decay, (1 + n) / (10 + n))`` (n = updates so far, a warm-up that lets early averages follow
    the fast initial changes).

    ``torch.optim.swa_utils.AveragedModel`` is not used: it copies the weights on its first update instead of
    averaging them with the initial ones, keeps a deep copy of the whole module (frozen parameters and buffers
    included), and its state dict (``module.``-prefixed keys, ``n_averaged``) differs from the ``ema`` entry
    ``{decay, num_updates, shadow}`` of existing checkpoints."""

    def __init__(self, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = float(decay)
        self.params = {name: p for name, p in named_parameters if p.requires_grad}
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for name, p in self.params.items():
            self.shadow[name].mul_(d).add_(p.detach(), alpha=1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self):
        """Temporarily replace the parameters by their averages."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])

    def averaged_state_dict(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged parameters."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, value in self.shadow.items():
            state[name] = value.detach().clone()
        return state

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: Dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks parameters {sorted(missing)[:5]}")
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name].copy_(value)
