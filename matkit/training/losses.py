"""Training targets, losses and error metrics.

Labels on a batch (PyG ``Batch`` of :class:`~matkit.graph.AtomicGraph`):

* ``energy`` (B,) or (B, 1) total energy, eV;
* ``forces`` (N, 3) eV/Å;
* ``stress`` (B, 3, 3) or (B, 6) in ASE Voigt order (xx, yy, zz, yz, xz, xy), eV/Å^3, tensile positive.

A label is missing for a structure when its presence mask (``has_energy`` / ``has_forces`` / ``has_stress``,
(B,) bool, optional) is false, when the attribute is absent, or when its values are NaN. An optional
``loss_weight`` (B,) scales each structure's terms in the loss (its energy, its atoms' forces, its stress; 1 when
absent): per-configuration-type weights (``loss.config_type_weights``) travel this way.

Losses are *sums* over the structures/atoms of the local batch divided by counts over the *global* batch, so
that with data parallelism the per-rank losses add up to the loss of the global batch (see :func:`loss_terms`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..graph import graph_batch_vector, num_graphs

__all__ = ["Targets", "batch_targets", "voigt_to_matrix", "LossCounts", "loss_counts", "loss_terms",
           "ErrorAccumulator"]

_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def voigt_to_matrix(voigt: torch.Tensor) -> torch.Tensor:
    """(B, 6) ASE Voigt (xx, yy, zz, yz, xz, xy) -> (B, 3, 3) symmetric tensors."""
    out = voigt.new_zeros(voigt.shape[0], 3, 3)
    for k, (a, b) in enumerate(_VOIGT):
        out[:, a, b] = voigt[:, k]
        out[:, b, a] = voigt[:, k]
    return out


@dataclass
class Targets:
    """Labels of a batch with presence masks. ``natoms`` (B,) atoms per structure, ``batch`` (N,) structure
    index of each atom. Missing labels are replaced by zeros and masked out."""

    natoms: torch.Tensor
    batch: torch.Tensor
    energy: torch.Tensor          # (B,) float64 eV
    energy_mask: torch.Tensor     # (B,) bool
    forces: torch.Tensor          # (N, 3) eV/Å
    forces_mask: torch.Tensor     # (N,) bool (per atom, from its structure)
    stress: torch.Tensor          # (B, 3, 3) eV/Å^3
    stress_mask: torch.Tensor     # (B,) bool
    weight: Optional[torch.Tensor] = None  # (B,) float64 loss weight per structure; None: all 1


def _structure_mask(graph, name: str, n: int, device) -> torch.Tensor:
    mask = getattr(graph, f"has_{name}", None)
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return mask.reshape(n).to(device=device, dtype=torch.bool)


def batch_targets(graph) -> Targets:
    """Collect the labels of a graph or batch into a :class:`Targets` (see module docstring for layouts)."""
    device = graph.pos.device
    n_graphs = num_graphs(graph)
    batch = graph_batch_vector(graph)
    natoms = torch.bincount(batch, minlength=n_graphs)
    n_atoms = graph.pos.shape[0]

    energy = getattr(graph, "energy", None)
    if energy is None:
        energy = torch.zeros(n_graphs, dtype=torch.float64, device=device)
        e_mask = torch.zeros(n_graphs, dtype=torch.bool, device=device)
    else:
        energy = energy.reshape(-1).to(torch.float64)
        if energy.shape[0] != n_graphs:
            raise ValueError(f"energy labels have shape {tuple(graph.energy.shape)}; expected one per structure "
                             f"({n_graphs})")
        e_mask = _structure_mask(graph, "energy", n_graphs, device) & torch.isfinite(energy)
        energy = torch.where(e_mask, energy, torch.zeros_like(energy))

    forces = getattr(graph, "forces", None)
    if forces is None:
        forces = graph.pos.new_zeros(n_atoms, 3)
        f_mask = torch.zeros(n_atoms, dtype=torch.bool, device=device)
    else:
        if tuple(forces.shape) != (n_atoms, 3):
            raise ValueError(f"forces labels have shape {tuple(forces.shape)}; expected ({n_atoms}, 3)")
        forces = forces.to(graph.pos.dtype)
        f_mask = _structure_mask(graph, "forces", n_graphs, device)[batch] & torch.isfinite(forces).all(dim=1)
        forces = torch.where(f_mask[:, None], forces, torch.zeros_like(forces))

    stress = getattr(graph, "stress", None)
    if stress is None:
        stress = graph.pos.new_zeros(n_graphs, 3, 3)
        s_mask = torch.zeros(n_graphs, dtype=torch.bool, device=device)
    else:
        stress = stress.to(graph.pos.dtype)
        if stress.shape[-1] == 6 and stress.numel() == 6 * n_graphs:
            stress = voigt_to_matrix(stress.reshape(n_graphs, 6))
        elif stress.numel() == 9 * n_graphs:
            stress = stress.reshape(n_graphs, 3, 3)
        else:
            raise ValueError(f"stress labels have shape {tuple(stress.shape)}; expected ({n_graphs}, 6) Voigt or "
                             f"({n_graphs}, 3, 3)")
        s_mask = _structure_mask(graph, "stress", n_graphs, device) & torch.isfinite(stress).flatten(1).all(dim=1)
        stress = torch.where(s_mask[:, None, None], stress, torch.zeros_like(stress))
    weight = getattr(graph, "loss_weight", None)
    if weight is not None:
        weight = weight.reshape(-1).to(device=device, dtype=torch.float64)
        if weight.shape[0] != n_graphs:
            raise ValueError(f"loss_weight has shape {tuple(graph.loss_weight.shape)}; expected one per structure "
                             f"({n_graphs})")
    return Targets(natoms, batch, energy, e_mask, forces, f_mask, stress, s_mask, weight)


@dataclass
class LossCounts:
    """Number of labelled items of the global batch: structures with energy, force components, stress
    components. Used as the denominators of the losses."""

    energy: float
    forces: float
    stress: float

    def as_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor([self.energy, self.forces, self.stress], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "LossCounts":
        return cls(*[float(x) for x in t.tolist()])


def loss_counts(targets: Targets) -> LossCounts:
    """Counts of the *local* batch; with several ranks, sum them over ranks (all-reduce) before use."""
    return LossCounts(float(targets.energy_mask.sum()), 3.0 * float(targets.forces_mask.sum()),
                      9.0 * float(targets.stress_mask.sum()))


def _penalty(diff: torch.Tensor, kind: str, delta: float) -> torch.Tensor:
    if kind == "mse":
        return diff * diff
    if kind == "huber":
        return torch.nn.functional.huber_loss(diff, torch.zeros_like(diff), reduction="none", delta=delta)
    raise ValueError(f"unknown loss kind {kind!r}; use 'mse' or 'huber'")


def loss_terms(pred: Dict[str, torch.Tensor], targets: Targets, counts: LossCounts, weights: Dict[str, float],
               kind: str = "mse", huber_delta: float = 0.01) -> Dict[str, torch.Tensor]:
    """Weighted loss of the local batch normalised by the global ``counts``.

    ``energy``: mean over structures of ``rho(E_pred/n - E/n)`` (per-atom energy, eV/atom);
    ``forces``: mean over force components of ``rho(F_pred - F)`` (eV/Å);
    ``stress``: mean over the 9 stress components of ``rho(S_pred - S)`` (eV/Å^3);
    ``rho`` is the square (``mse``) or the Huber function. With ``targets.weight`` each structure's penalties are
    multiplied by its weight (the denominators stay the label counts, as MACE's ``config_type_weights`` do).
    Returns the float64 terms and ``total`` = sum of ``weights[k] * term[k]``; terms without labels in the global
    batch are zero.
    """
    terms = {}
    zero = pred["energy"].new_zeros(())
    per_structure = torch.ones_like(targets.energy) if targets.weight is None else targets.weight
    if weights.get("energy", 0.0) > 0 and counts.energy > 0:
        diff = (pred["energy"] - targets.energy) / targets.natoms.clamp(min=1).to(torch.float64)
        mask = targets.energy_mask * per_structure
        terms["energy"] = (_penalty(diff, kind, huber_delta) * mask).sum() / counts.energy
    if weights.get("forces", 0.0) > 0 and counts.forces > 0:
        diff = (pred["forces"] - targets.forces).to(torch.float64)
        mask = targets.forces_mask * per_structure[targets.batch]
        terms["forces"] = (_penalty(diff, kind, huber_delta) * mask[:, None]).sum() / counts.forces
    if weights.get("stress", 0.0) > 0 and counts.stress > 0:
        diff = (pred["stress"] - targets.stress).to(torch.float64)
        diff = torch.where(targets.stress_mask[:, None, None], diff, torch.zeros_like(diff))  # NaN-safe
        terms["stress"] = (_penalty(diff, kind, huber_delta) * per_structure[:, None, None]).sum() / counts.stress
    total = zero
    for key, value in terms.items():
        total = total + weights[key] * value
    terms["total"] = total
    return terms


class ErrorAccumulator:
    """Running sums for MAE and RMSE of per-atom energy (eV/atom), force components (eV/Å) and stress
    components (eV/Å^3). Sums live in one float64 tensor so that ranks can all-reduce them at once."""

    KEYS = ("energy", "forces", "stress")

    def __init__(self, device=None):
        # rows: abs-sum, square-sum, count ; columns: energy, forces, stress
        self.sums = torch.zeros(3, 3, dtype=torch.float64, device=device)

    def update(self, pred: Dict[str, torch.Tensor], targets: Targets) -> None:
        with torch.no_grad():
            if targets.energy_mask.any():
                diff = ((pred["energy"].detach() - targets.energy) / targets.natoms.to(torch.float64))
                self._add(0, diff[targets.energy_mask])
            if "forces" in pred and targets.forces_mask.any():
                self._add(1, (pred["forces"].detach() - targets.forces)[targets.forces_mask].to(torch.float64))
            if "stress" in pred and targets.stress_mask.any():
                self._add(2, (pred["stress"].detach() - targets.stress)[targets.stress_mask].to(torch.float64))

    def _add(self, column: int, diff: torch.Tensor) -> None:
        diff = diff.reshape(-1)
        self.sums[0, column] += diff.abs().sum()
        self.sums[1, column] += (diff * diff).sum()
        self.sums[2, column] += diff.numel()

    def metrics(self) -> Dict[str, Optional[float]]:
        """``{energy_mae, energy_rmse, forces_mae, ...}``; None where nothing was labelled."""
        out = {}
        for column, key in enumerate(self.KEYS):
            count = float(self.sums[2, column])
            out[f"{key}_mae"] = float(self.sums[0, column]) / count if count else None
            out[f"{key}_rmse"] = (float(self.sums[1, column]) / count) ** 0.5 if count else None
        return out
