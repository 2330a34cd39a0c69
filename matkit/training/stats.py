"""Statistics of the training split used to initialise a potential's output transform.

``E = sum_i (scale * raw_i + shift + E0[Z_i])``:

* ``E0`` (per element, eV): least-squares fit of the total energies on the element counts,
  ``min || C E0 - E ||^2`` with ``C`` (structures x elements); minimum-norm solution when the compositions
  do not determine every element (elements absent from the data get 0);
* ``shift`` (eV/atom): mean per-atom residual ``(E - C E0) / n``;
* ``scale`` (eV or eV/Å): RMS of the force components (``rms_forces``) or RMS of the per-atom energy residual
  about the shift (``rms_energy``).

After training, :func:`refit_reference_energies` can re-solve the same least-squares problem for ``E0`` on the
residuals of the trained model. When every structure has the same composition (one molecule's MD), the loss
barely constrains the energy zero and it drifts during long force-dominated training; the refit removes that
offset without changing forces or stress.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Sequence, Union

import numpy as np
import torch

log = logging.getLogger("matkit.training")

__all__ = ["DatasetStatistics", "collect_statistics", "fit_reference_energies", "resolve_reference_energies",
           "refit_reference_energies"]


@dataclass
class DatasetStatistics:
    counts: np.ndarray        # (n, S) element counts per structure (structures with an energy label)
    energies: np.ndarray      # (n,) total energies, eV
    force_square_sum: float   # sum of squared force components, (eV/Å)^2
    force_components: int

    @property
    def natoms(self) -> np.ndarray:
        return self.counts.sum(axis=1)

    def per_atom_residuals(self, reference_energies: np.ndarray) -> np.ndarray:
        return (self.energies - self.counts @ reference_energies) / self.natoms

    def rms_forces(self) -> float:
        return float(np.sqrt(self.force_square_sum / self.force_components)) if self.force_components else 0.0


def collect_statistics(dataset, indices: Sequence[int], species: Sequence[int]) -> DatasetStatistics:
    """One pass over ``dataset[indices]`` collecting element counts, energies and force magnitudes."""
    z_to_col = {int(z): k for k, z in enumerate(species)}
    counts, energies = [], []
    square_sum, components = 0.0, 0
    for i in indices:
        graph = dataset[int(i)]
        numbers = graph.atomic_numbers.tolist()
        unknown = sorted(set(numbers) - set(z_to_col))
        if unknown:
            raise ValueError(f"training structure {i} contains elements {unknown} that the model's species "
                             f"{list(species)} do not include")
        energy = getattr(graph, "energy", None)
        has_energy = bool(getattr(graph, "has_energy", torch.tensor([True])).reshape(-1)[0])
        if energy is not None and has_energy and torch.isfinite(energy).all():
            row = np.zeros(len(species))
            for z in numbers:
                row[z_to_col[z]] += 1
            counts.append(row)
            energies.append(float(energy.reshape(-1)[0]))
        forces = getattr(graph, "forces", None)
        has_forces = bool(getattr(graph, "has_forces", torch.tensor([True])).reshape(-1)[0])
        if forces is not None and has_forces:
            f = forces.detach().to(torch.float64)
            f = f[torch.isfinite(f).all(dim=1)]
            square_sum += float((f * f).sum())
            components += f.numel()
    return DatasetStatistics(np.array(counts).reshape(-1, len(species)), np.array(energies), square_sum,
                             components)


def fit_reference_energies(stats: DatasetStatistics) -> np.ndarray:
    """Per-element reference energies (S,) in eV by least squares (see module docstring)."""
    if len(stats.energies) == 0:
        raise ValueError("cannot fit reference energies: no training structure has an energy label")
    solution, *_ = np.linalg.lstsq(stats.counts, stats.energies, rcond=None)
    present = stats.counts.sum(axis=0) > 0
    return np.where(present, solution, 0.0)


def resolve_reference_energies(setting: Union[str, Dict[str, float]], species: Sequence[int],
                               stats: DatasetStatistics, current: np.ndarray) -> np.ndarray:
    """``fit`` -> least squares; ``keep`` -> ``current``; a mapping {symbol or Z: eV} -> those values
    (elements not listed keep ``current``)."""
    if setting == "fit":
        return fit_reference_energies(stats)
    if setting == "keep":
        return np.asarray(current, dtype=float)
    from ase.data import atomic_numbers

    out = np.asarray(current, dtype=float).copy()
    for key, value in setting.items():
        z = int(key) if str(key).isdigit() else atomic_numbers.get(str(key))
        if z is None or z not in species:
            raise ValueError(f"config key 'model.reference_energies.{key}': {key!r} is not one of the model's "
                             f"elements {list(species)}")
        out[list(species).index(z)] = float(value)
    return out


def resolve_scale_shift(scale_setting, shift_setting, stats: DatasetStatistics, reference_energies: np.ndarray,
                        current_scale: float, current_shift: float):
    """Return ``(scale, shift)`` from the config settings (see :class:`~matkit.training.config.ModelConfig`)."""
    residuals = stats.per_atom_residuals(reference_energies) if len(stats.energies) else np.zeros(0)
    if shift_setting == "keep":
        shift = current_shift
    elif shift_setting == "mean_energy":
        shift = float(residuals.mean()) if len(residuals) else 0.0
    else:
        shift = float(shift_setting)
    if scale_setting == "keep":
        scale = current_scale
    elif scale_setting == "rms_forces":
        scale = stats.rms_forces()
        if scale <= 0:
            scale = float(np.sqrt(np.mean((residuals - shift) ** 2))) if len(residuals) else 0.0
            log.warning("no force labels for scale=rms_forces; using the RMS per-atom energy residual %.4g", scale)
    elif scale_setting == "rms_energy":
        scale = float(np.sqrt(np.mean((residuals - shift) ** 2))) if len(residuals) else 0.0
    else:
        scale = float(scale_setting)
    if not np.isfinite(scale) or scale <= 0:
        log.warning("data-derived scale %r is not positive; using 1.0", scale)
        scale = 1.0
    return float(scale), float(shift)


def refit_reference_energies(model, dataset, indices: Sequence[int], batch_size: int = 16,
                             device="cpu") -> np.ndarray:
    """Correct ``model.atomic_reference_energies`` in place by least squares on the trained model's residuals.

    Solves ``min || C dE0 - (E - E_model) ||^2`` over ``dataset[indices]`` (the training split; ``C`` the element
    counts, ``E`` the labelled total energies, eV) and adds ``dE0`` (S,) eV to the reference energies, which are
    per-element constants: forces and stress do not change. The model's residuals are computed in float64.
    Returns ``dE0``.
    """
    import copy

    from .evaluate import evaluate_model

    stats = collect_statistics(dataset, indices, model.species)
    if len(stats.energies) == 0:
        raise ValueError("cannot refit reference energies: no structure in the split has an energy label")
    model64 = copy.deepcopy(model).to(torch.float64)
    result = evaluate_model(model64, dataset, batch_size=batch_size, device=device, dtype=torch.float64,
                            indices=indices, collect=True)
    arrays = result.predictions.arrays()
    natoms = stats.natoms
    labelled = arrays["energy_ref"] * natoms
    if labelled.shape != stats.energies.shape or not np.allclose(labelled, stats.energies, rtol=1e-9, atol=1e-6):
        raise RuntimeError("refit_reference_energies: predicted and labelled energies are not aligned")
    residual = stats.energies - arrays["energy_pred"] * natoms
    delta = fit_reference_energies(DatasetStatistics(stats.counts, residual, 0.0, 0))
    with torch.no_grad():
        refs = model.atomic_reference_energies
        refs += torch.as_tensor(delta, dtype=refs.dtype, device=refs.device)
    log.info("reference energies refitted on %d structures: mean |residual| %.4g -> %.4g eV/atom",
             len(residual), float(np.mean(np.abs(residual / natoms))),
             float(np.mean(np.abs((residual - stats.counts @ delta) / natoms))))
    return delta
