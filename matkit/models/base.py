"""Base class for potentials and the shared energy -> forces / stress autograd.

A potential maps an :class:`~matkit.graph.AtomicGraph` (or a PyG batch of them) to per-atom energies.
Subclasses implement :meth:`Potential.raw_atomic_energies`; the base class adds

* element handling: a fixed list of supported atomic numbers (``species``) and a clear error for others;
* the output transform ``E_i = scale * raw_i + shift + E0[Z_i]`` (eV), with ``E0`` the per-element reference
  energies (float64 buffers, fitted by least squares in training);
* calling the model (``model(graph, forces=True, stress=False)``): total energy (accumulated in float64),
  conservative forces ``-dE/dr`` and the
  stress ``(1/V) dE/d(eps)`` from a symmetric strain applied to positions and cell, all by autograd.
"""
from __future__ import annotations

import functools
import inspect
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..graph import edge_vectors, graph_batch_vector, num_graphs
from ..nn.precision import KeepsFloat64

registry: Dict[str, type] = {}

__all__ = ["Potential", "register", "registry", "compute_properties"]


def register(name: str):
    """Class decorator: register a :class:`Potential` subclass under ``name``."""

    def decorator(cls):
        if name in registry and registry[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {registry[name]}")
        cls.model_name = name
        registry[name] = cls
        return cls

    return decorator


def _element_symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


class Potential(KeepsFloat64):
    """Base class of all matkit potentials.

    Parameters
    ----------
    species : atomic numbers the potential supports (order defines the species index used by embeddings).
    cutoff : radial cutoff in Å; the neighbour list uses it.

    Hyperparameters given to the subclass constructor are recorded in ``self.hparams`` (keyword arguments;
    they must be plain Python values) so that :func:`matkit.save_checkpoint` can rebuild the model.
    """

    model_name: str = "potential"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__init__

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if not hasattr(self, "_recording_hparams"):
                object.__setattr__(self, "_recording_hparams", True)
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                hp = {k: v for k, v in bound.arguments.items() if k != "self"}
                extra = hp.pop("kwargs", {}) if "kwargs" in inspect.signature(init).parameters else {}
                hp.update(extra)
                init(self, *args, **kw)
                self.hparams = _plain(hp)
                object.__delattr__(self, "_recording_hparams")
            else:
                init(self, *args, **kw)

        cls.__init__ = recording_init

    def __init__(self, species: Sequence[int], cutoff: float):
        super().__init__()
        species = [int(z) for z in species]
        if len(set(species)) != len(species) or not species:
            raise ValueError(f"species must be a non-empty list of distinct atomic numbers, got {species}")
        if not (np.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.species = species
        self.cutoff = float(cutoff)
        z_to_index = torch.full((119,), -1, dtype=torch.long)
        z_to_index[torch.tensor(species)] = torch.arange(len(species))
        self.register_buffer("z_to_index", z_to_index, persistent=False)
        self.register_buffer("atomic_reference_energies", torch.zeros(len(species), dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(0.0, dtype=torch.float64))

    #: reference energies, scale and shift stay float64 when the model is cast (energies accumulate in float64)
    _FLOAT64_BUFFERS = ("atomic_reference_energies", "scale", "shift")

    #: knots of the radial tables (:mod:`matkit.nn.radial_table`) that models with radial MLPs use at inference
    #: (eval mode, frozen weights) instead of evaluating the MLPs; 0 = exact MLPs. Set by the calculator.
    radial_table_knots: int = 0

    def __getstate__(self):
        # the radial tables are a cache of the weights (closures, not picklable): rebuilt on demand after unpickling
        state = dict(super().__getstate__())
        state.pop("_radial_table_cache", None)
        return state

    @property
    def num_species(self) -> int:
        return len(self.species)

    # ---- to be implemented by models -------------------------------------------------------------------------
    def raw_atomic_energies(self, graph, species: torch.Tensor, edge_vec: torch.Tensor) -> torch.Tensor:
        """Per-atom model outputs (N,) before scale/shift/reference energies.

        graph : AtomicGraph or PyG Batch (``edge_index`` (2, E), ``batch`` (N,) when batched).
        species : (N,) int64 species index into ``self.species``.
        edge_vec : (E, 3) neighbour-minus-centre vectors in Å (differentiable w.r.t. positions and strain).
        """
        raise NotImplementedError

    # ---- shared machinery ----------------------------------------------------------------------------------
    def species_index(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """Map atomic numbers (N,) to species indices, raising ``ValueError`` for unsupported elements."""
        if atomic_numbers.numel() and (atomic_numbers.min() < 1 or atomic_numbers.max() > 118):
            raise ValueError(f"invalid atomic numbers {atomic_numbers.unique().tolist()}")
        index = self.z_to_index[atomic_numbers]
        if (index < 0).any():
            unknown = sorted(set(atomic_numbers[index < 0].tolist()))
            names = ", ".join(f"{_element_symbol(z)} (Z={z})" for z in unknown)
            known = ", ".join(_element_symbol(z) for z in self.species)
            raise ValueError(f"unknown element(s) for this {self.model_name} potential: {names}; "
                             f"it was trained on: {known}")
        return index

    def atomic_energies(self, graph, edge_vec: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-atom energies (N,) in eV, float64: ``scale * raw + shift + E0[Z]``."""
        species = self.species_index(graph.atomic_numbers)
        if edge_vec is None:
            edge_vec = edge_vectors(graph.pos, graph.cell, graph.edge_index, graph.shifts, graph_batch_vector(graph))
        raw = self.raw_atomic_energies(graph, species, edge_vec)
        return raw.to(torch.float64) * self.scale + self.shift + self.atomic_reference_energies[species]

    def forward(self, graph, forces: bool = True, stress: bool = False, training: bool = False):
        """Energy (B,) eV float64, ``energies`` (N,) eV, ``forces`` (N, 3) eV/Å, ``stress`` (B, 3, 3) eV/Å^3
        (see :func:`compute_properties`)."""
        return compute_properties(self, graph, forces=forces, stress=stress, training=training)


def _plain(value):
    """Convert hyperparameters to plain Python values (lists instead of tuples/arrays)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def compute_properties(model: Potential, graph, forces: bool = True, stress: bool = False,
                       training: bool = False) -> Dict[str, torch.Tensor]:
    """Energy, forces and stress of a graph or batch by autograd of the total energy.

    A symmetric strain ``eps`` (B, 3, 3) is applied as ``r -> r (1 + eps)`` and ``cell -> cell (1 + eps)``
    (row vectors), so ``stress = (1/V) dE/d(eps)`` (ASE sign: tensile positive).

    Returns a dict with ``energy`` (B,) float64 eV, ``energies`` (N,) float64 eV, and when requested
    ``forces`` (N, 3) eV/Å and ``stress`` (B, 3, 3) eV/Å^3 (NaN for structures with zero volume), in the dtype
    of ``graph.pos``. With ``training=True`` the graph is kept for a second backward pass (force losses).
    """
    batch = graph_batch_vector(graph)
    n_graphs = num_graphs(graph)
    pos, cell = graph.pos, graph.cell
    if forces:
        pos = pos.detach().requires_grad_(True)
    strain = None
    if stress:
        strain = torch.zeros((n_graphs, 3, 3), dtype=pos.dtype, device=pos.device, requires_grad=True)
        symmetric = 0.5 * (strain + strain.transpose(1, 2))
        pos_for_model = pos + torch.einsum("ni,nij->nj", pos, symmetric[batch])
        cell = cell + torch.matmul(cell, symmetric)
    else:
        pos_for_model = pos
    edge_vec = edge_vectors(pos_for_model, cell, graph.edge_index, graph.shifts, batch)
    energies = model.atomic_energies(graph, edge_vec)
    energy = torch.zeros(n_graphs, dtype=torch.float64, device=pos.device).index_add_(0, batch, energies)
    out = {"energy": energy, "energies": energies}
    inputs = ([pos] if forces else []) + ([strain] if stress else [])
    if inputs:
        if energy.requires_grad:
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=training, allow_unused=True)
        else:
            grads = [None] * len(inputs)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
        if forces:
            out["forces"] = -grads[0]
        if stress:
            volume = torch.linalg.det(graph.cell).abs()
            has_volume = (volume > 0).view(-1, 1, 1)
            # divide by 1 where there is no volume, then put NaN there: a NaN divisor would make the gradient of
            # a (masked) stress loss NaN for the whole batch when molecules and crystals are trained together
            divisor = torch.where(has_volume, volume.view(-1, 1, 1), torch.ones_like(volume.view(-1, 1, 1)))
            stress = grads[-1] / divisor
            out["stress"] = torch.where(has_volume, stress, torch.full_like(stress, float("nan")))
    return out
