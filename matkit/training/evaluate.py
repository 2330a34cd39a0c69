"""Error metrics of a potential on a labelled dataset: ``matkit evaluate CHECKPOINT DATASET``.

Energy errors are per atom (eV/atom), force errors per Cartesian component (eV/Å), stress errors per
component of the 3x3 tensor (eV/Å^3); MAE and RMSE over all labelled items.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..graph import batch_graphs, graph_batch_vector
from .ddp import all_reduce_sum
from .losses import ErrorAccumulator, LossCounts, batch_targets, loss_terms

__all__ = ["Predictions", "InferenceResult", "prepare_batch", "run_inference", "evaluate_model",
           "format_metrics_table", "errors_by_group", "format_group_table", "bootstrap_intervals",
           "format_interval_table"]

_FLOAT_KEYS = ("pos", "cell", "shifts", "forces", "stress")


def prepare_batch(batch, device: torch.device, dtype: torch.dtype):
    """Move a PyG batch to ``device`` and cast positions, cell, shifts and force/stress labels to ``dtype``
    (energies stay float64)."""
    batch = batch.to(device)
    for key in _FLOAT_KEYS:
        value = getattr(batch, key, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            setattr(batch, key, value.to(dtype))
    return batch


def collate(graphs):
    return batch_graphs(graphs)


@dataclass
class Predictions:
    """Collected per-atom energies and force components (model vs reference) for parity plots, with the position
    of their structure in evaluation order (``*_structure``) for errors by configuration type."""

    energy_pred: List[np.ndarray] = field(default_factory=list)
    energy_ref: List[np.ndarray] = field(default_factory=list)
    energy_structure: List[np.ndarray] = field(default_factory=list)
    forces_pred: List[np.ndarray] = field(default_factory=list)
    forces_ref: List[np.ndarray] = field(default_factory=list)
    forces_z: List[np.ndarray] = field(default_factory=list)   # atomic number of each force component
    forces_structure: List[np.ndarray] = field(default_factory=list)
    seen: int = 0                                               # structures added so far

    def add(self, pred, targets, batch) -> None:
        natoms = targets.natoms.to(torch.float64)
        mask = targets.energy_mask
        structure = self.seen + torch.arange(natoms.shape[0], device=mask.device)
        self.energy_pred.append((pred["energy"].detach() / natoms)[mask].cpu().numpy())
        self.energy_ref.append((targets.energy / natoms)[mask].cpu().numpy())
        self.energy_structure.append(structure[mask].cpu().numpy())
        if "forces" in pred:
            fmask = targets.forces_mask
            self.forces_pred.append(pred["forces"].detach()[fmask].reshape(-1).double().cpu().numpy())
            self.forces_ref.append(targets.forces[fmask].reshape(-1).double().cpu().numpy())
            self.forces_z.append(np.repeat(batch.atomic_numbers[fmask].cpu().numpy(), 3))
            self.forces_structure.append(np.repeat(structure[graph_batch_vector(batch)][fmask].cpu().numpy(), 3))
        self.seen += int(natoms.shape[0])

    def arrays(self) -> Dict[str, np.ndarray]:
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        return {"energy_pred": cat(self.energy_pred), "energy_ref": cat(self.energy_ref),
                "energy_structure": cat(self.energy_structure).astype(np.int64),
                "forces_pred": cat(self.forces_pred), "forces_ref": cat(self.forces_ref),
                "forces_z": cat(self.forces_z).astype(np.int64),
                "forces_structure": cat(self.forces_structure).astype(np.int64)}


def _mae_rmse(diff: np.ndarray):
    """(MAE, RMSE) of an array of differences, ``(None, None)`` when it is empty."""
    if diff.size == 0:
        return None, None
    return float(np.abs(diff).mean()), float(np.sqrt((diff ** 2).mean()))


def force_errors_by_element(arrays: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    """Force-component errors split by the element of the atom: ``{symbol: {components, mae, rmse}}`` (eV/Å),
    from :meth:`Predictions.arrays`. Shows which species carry the error (e.g. the heavy atoms of a molecule)."""
    from ase.data import chemical_symbols

    diff = arrays["forces_pred"] - arrays["forces_ref"]
    out = {}
    for z in np.unique(arrays["forces_z"]):
        d = diff[arrays["forces_z"] == z]
        mae, rmse = _mae_rmse(d)
        out[chemical_symbols[int(z)]] = {"components": int(d.size), "mae": mae, "rmse": rmse}
    return out


def format_element_table(by_element: Dict[str, Dict[str, float]]) -> str:
    """A fixed-width text table of :func:`force_errors_by_element` in meV/Å."""
    lines = [f"{'forces of':<10}{'components':>12}{'MAE':>12}{'RMSE':>12}   (meV/Å)"]
    for symbol, row in by_element.items():
        lines.append(f"{symbol:<10}{row['components']:>12d}{1000 * row['mae']:12.3f}{1000 * row['rmse']:12.3f}")
    return "\n".join(lines)


def errors_by_group(arrays: Dict[str, np.ndarray], groups: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Energy (eV/atom) and force-component (eV/Å) errors split by configuration type: ``{group: {structures,
    energy_mae, energy_rmse, forces_mae, forces_rmse}}`` from :meth:`Predictions.arrays`, ``groups[k]`` being the
    type of the k-th evaluated structure. Shows where the error sits (e.g. hot MD frames vs strained crystals)
    and whether a small validation split over-represents one type."""
    groups = np.asarray(list(groups), dtype=object)
    e_diff = arrays["energy_pred"] - arrays["energy_ref"]
    f_diff = arrays["forces_pred"] - arrays["forces_ref"]
    e_group, f_group = groups[arrays["energy_structure"]], groups[arrays["forces_structure"]]
    out = {}
    for name in sorted(set(groups.tolist())):
        row = {"structures": int((groups == name).sum())}
        for key, diff, where in (("energy", e_diff, e_group == name), ("forces", f_diff, f_group == name)):
            row[f"{key}_mae"], row[f"{key}_rmse"] = _mae_rmse(diff[where])
        out[name] = row
    return out


def format_group_table(by_group: Dict[str, Dict[str, float]]) -> str:
    """A fixed-width text table of :func:`errors_by_group` (energy in meV/atom, forces in meV/Å)."""
    fmt = lambda x: f"{1000.0 * x:10.2f}" if x is not None else f"{'n/a':>10}"  # noqa: E731
    width = max([len("group")] + [len(name or "(none)") for name in by_group]) + 2
    lines = [f"{'group':<{width}}{'structures':>11}{'E MAE':>10}{'E RMSE':>10}{'F MAE':>10}{'F RMSE':>10}"
             "   (meV/atom, meV/Å)"]
    for name, row in by_group.items():
        lines.append(f"{name or '(none)':<{width}}{row['structures']:>11d}{fmt(row['energy_mae'])}"
                     f"{fmt(row['energy_rmse'])}{fmt(row['forces_mae'])}{fmt(row['forces_rmse'])}")
    return "\n".join(lines)


def _structure_sums(arrays: Dict[str, np.ndarray], key: str, units: np.ndarray) -> Optional[np.ndarray]:
    """(3, n) sums of |error|, squared error and labelled items of ``key`` per structure of ``units``; None
    without labels."""
    diff = arrays[f"{key}_pred"] - arrays[f"{key}_ref"]
    if diff.size == 0:
        return None
    where = np.searchsorted(units, arrays[f"{key}_structure"])
    n = units.size
    return np.stack([np.bincount(where, np.abs(diff), minlength=n), np.bincount(where, diff ** 2, minlength=n),
                     np.bincount(where, minlength=n).astype(float)])


def bootstrap_intervals(arrays: Dict[str, np.ndarray], resamples: int = 2000, level: float = 0.95,
                        seed: int = 0, baseline: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, List[float]]:
    """Percentile bootstrap intervals of the energy (eV/atom) and force-component (eV/Å) MAE and RMSE, from
    :meth:`Predictions.arrays`: ``{"energy_mae": [low, high], "energy_rmse": ..., "forces_mae": ...,
    "forces_rmse": ...}`` (a quantity without labels is left out).

    The evaluated structures are drawn ``resamples`` times with replacement (seeded) and the errors recomputed
    on each draw, so an interval says how far the errors of a small split (a ~20-structure validation split) could
    move with another draw of structures like these. Structures, not force components, are resampled: the
    components of one structure share its configuration and are correlated.

    ``baseline``: the arrays of a second model on the same structures and labels. The result then also holds
    ``"energy_mae_difference"`` etc.: intervals of this model's error minus the baseline's on the same draws (a
    paired comparison, much narrower than the two intervals, since both models err on the same structures)."""
    units = np.union1d(arrays["energy_structure"], arrays["forces_structure"])
    n = units.size
    if n == 0:
        return {}
    models = [arrays] if baseline is None else [arrays, baseline]
    if baseline is not None:
        for key in ("energy", "forces"):
            same = (np.array_equal(arrays[f"{key}_{part}"], baseline[f"{key}_{part}"]) for part in ("structure", "ref"))
            if not all(same):
                raise ValueError(f"bootstrap_intervals: the baseline's {key} labels are not those of the same "
                                 "structures")
    tables = {key: [_structure_sums(m, key, units) for m in models] for key in ("energy", "forces")}
    tables = {key: t for key, t in tables.items() if t[0] is not None}
    rng = np.random.default_rng(seed)
    sums = {key: [] for key in tables}
    chunk = max(1, min(resamples, 2 ** 22 // n))   # (chunk, n) draw counts at a time, ~32 MB
    for start in range(0, resamples, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, resamples - start)).astype(float)
        for key, per_model in tables.items():
            sums[key].append([counts @ table.T for table in per_model])   # each (chunk, 3)
    tail = 100.0 * (1.0 - level) / 2.0
    interval = lambda values: [float(v) for v in np.percentile(values, [tail, 100.0 - tail])]  # noqa: E731
    out = {}
    for key, parts in sums.items():
        errors = []
        for m in range(len(models)):
            abs_sum, sq_sum, items = np.concatenate([part[m] for part in parts]).T
            drawn = items > 0   # a draw without any labelled structure of this kind has no error
            errors.append({"mae": abs_sum[drawn] / items[drawn], "rmse": np.sqrt(sq_sum[drawn] / items[drawn])})
        for name in ("mae", "rmse"):
            out[f"{key}_{name}"] = interval(errors[0][name])
            if baseline is not None:
                out[f"{key}_{name}_difference"] = interval(errors[0][name] - errors[1][name])
    return out


def format_interval_table(intervals: Dict[str, List[float]], resamples: int, structures: int,
                          level: float = 0.95) -> str:
    """A fixed-width text table of :func:`bootstrap_intervals` (energy in meV/atom, forces in meV/Å), with rows
    "... - baseline" for the paired differences when it has them."""
    lines = [f"{100 * level:g} % intervals from {resamples} resamplings of the {structures} structures",
             f"{'quantity':<20}{'unit':>10}{'MAE':>24}{'RMSE':>24}"]
    for suffix, label in (("", ""), ("_difference", " - baseline")):
        for key, unit in (("energy", "meV/atom"), ("forces", "meV/Å")):
            cells = [intervals.get(f"{key}_{name}{suffix}") for name in ("mae", "rmse")]
            if suffix and not any(cells):
                continue
            cells = [f"{1000 * c[0]:.3f} - {1000 * c[1]:.3f}" if c else "n/a" for c in cells]
            lines.append(f"{key + label:<20}{unit:>10}{cells[0]:>24}{cells[1]:>24}")
    return "\n".join(lines)


@dataclass
class InferenceResult:
    errors: ErrorAccumulator
    loss_sums: torch.Tensor      # (3,) summed penalties: energy, forces, stress
    counts: torch.Tensor         # (3,) labelled items: structures with energy, force and stress components
    predictions: Optional[Predictions] = None

    def metrics(self) -> Dict[str, Optional[float]]:
        return self.errors.metrics()

    def loss(self, weights: Dict[str, float]) -> float:
        total = 0.0
        for k, key in enumerate(("energy", "forces", "stress")):
            if weights.get(key, 0.0) > 0 and float(self.counts[k]) > 0:
                total += weights[key] * float(self.loss_sums[k]) / float(self.counts[k])
        return total


def run_inference(model, loader, device: torch.device, dtype: torch.dtype, stress: Optional[bool] = None,
                  weights: Optional[Dict[str, float]] = None, kind: str = "mse", huber_delta: float = 0.01,
                  collect: bool = False, reduce: bool = True, progress=None) -> InferenceResult:
    """Predict every batch of ``loader`` and accumulate errors (and loss sums with ``weights``).

    ``stress=None`` computes stress only for batches that carry stress labels. With ``reduce`` the sums are
    added over ranks (each rank passes its own shard).
    """
    model.eval()
    errors = ErrorAccumulator(device)
    loss_sums = torch.zeros(3, dtype=torch.float64, device=device)
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    weights = weights or {"energy": 1.0, "forces": 1.0, "stress": 1.0}
    predictions = Predictions() if collect else None
    unit = LossCounts(1.0, 1.0, 1.0)  # raw sums; divided by the totals at the end
    for batch in (progress(loader) if progress else loader):
        batch = prepare_batch(batch, device, dtype)
        want_stress = stress if stress is not None else getattr(batch, "stress", None) is not None
        with torch.enable_grad():
            pred = model(batch, forces=True, stress=want_stress, training=False)
        pred = {k: v.detach() for k, v in pred.items()}
        targets = batch_targets(batch)
        errors.update(pred, targets)
        terms = loss_terms(pred, targets, unit, {k: 1.0 for k in ("energy", "forces", "stress")
                                                 if k != "stress" or want_stress}, kind, huber_delta)
        for k, key in enumerate(("energy", "forces", "stress")):
            if key in terms:
                loss_sums[k] += terms[key].detach()
        counts += torch.tensor([float(targets.energy_mask.sum()), 3.0 * float(targets.forces_mask.sum()),
                                9.0 * float(targets.stress_mask.sum()) if want_stress else 0.0],
                               dtype=torch.float64, device=device)
        if predictions is not None:
            predictions.add(pred, targets, batch)
    if reduce:
        all_reduce_sum(errors.sums)
        all_reduce_sum(loss_sums)
        all_reduce_sum(counts)
    return InferenceResult(errors, loss_sums, counts, predictions)


def evaluate_model(model, dataset, batch_size: int = 16, device="cpu", dtype: Optional[torch.dtype] = None,
                   stress: Optional[bool] = None, indices: Optional[Sequence[int]] = None,
                   collect: bool = False, progress=None) -> InferenceResult:
    """Errors of ``model`` on ``dataset`` (optionally only ``indices``) in one process."""
    device = torch.device(device)
    model = model.to(device)
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    batches = [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    return run_inference(model, loader, device, dtype, stress=stress, collect=collect, reduce=False,
                         progress=progress)


def format_metrics_table(metrics: Dict[str, Optional[float]], n_structures: Optional[int] = None) -> str:
    """A fixed-width text table of MAE/RMSE (energy in meV/atom, forces in meV/Å, stress in meV/Å^3)."""
    rows = [("energy", "meV/atom"), ("forces", "meV/Å"), ("stress", "meV/Å^3")]
    lines = [f"{'quantity':<10}{'unit':>10}{'MAE':>12}{'RMSE':>12}"]
    for key, unit in rows:
        mae, rmse = metrics.get(f"{key}_mae"), metrics.get(f"{key}_rmse")
        fmt = lambda x: f"{1000.0 * x:12.3f}" if x is not None else f"{'n/a':>12}"  # noqa: E731
        lines.append(f"{key:<10}{unit:>10}{fmt(mae)}{fmt(rmse)}")
    if n_structures is not None:
        lines.append(f"({n_structures} structures)")
    return "\n".join(lines)


def metrics_json(metrics: Dict[str, Optional[float]], **info) -> str:
    return json.dumps({"units": {"energy": "eV/atom", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3"},
                       **info, "metrics": metrics}, indent=2)
