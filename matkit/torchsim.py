"""torch-sim interface: batched MD and relaxation of many structures with any matkit potential.

Example::

    import torch_sim as ts
    from matkit.torchsim import MatkitTorchSimModel

    model = MatkitTorchSimModel("tensornet-matpes-pbe", device="cpu")
    relaxed = ts.optimize([atoms_1, atoms_2], model, optimizer=ts.frechet_cell_fire,
                          convergence_fn=ts.generate_force_convergence_fn(0.05))

Needs the optional package torch-sim (``pip install 'matkit[torchsim]'``); ``import matkit`` never imports it.
"""
from __future__ import annotations

import os

import numpy as np
import torch

try:
    from torch_sim.models.interface import ModelInterface
    from torch_sim.state import SimState
except ImportError as err:  # pragma: no cover - exercised only without torch-sim
    raise ImportError("matkit.torchsim needs torch-sim: pip install 'matkit[torchsim]'") from err

from .graph import batch_graphs, centred_positions, check_atoms, check_pair_distances, graph_from_pairs
from .neighbors import batched_neighbor_list

__all__ = ["MatkitTorchSimModel"]


class MatkitTorchSimModel(ModelInterface):
    """A matkit potential as a torch-sim ``ModelInterface``.

    Parameters
    ----------
    model : a matkit :class:`~matkit.models.Potential`, a checkpoint path, or the name of a bundled potential
        (:func:`matkit.potentials.checkpoint_path`, e.g. ``"tensornet-matpes-pbe"``). A Potential is moved and
        cast in place, as by :class:`~matkit.calculator.MatkitCalculator`.
    device : torch device; default CUDA when available, else CPU (torch-sim's convention).
    dtype : ``torch.float64`` (default, as torch-sim's models) or ``torch.float32``.
    compute_forces, compute_stress : which properties :meth:`forward` returns besides the energy.

    ``forward(state)`` takes a ``SimState`` (positions (N, 3) Å, cell (B, 3, 3) Å with lattice vectors as
    *columns*, pbc, atomic_numbers (N,), system_idx (N,)) and returns, detached, in ``dtype``:

    * ``energy`` (B,) eV;
    * ``forces`` (N, 3) eV/Å, ``-dE/dr``;
    * ``stress`` (B, 3, 3) eV/Å^3, ``(1/V) dE/d(strain)``: tensile positive, the sign of ASE's ``get_stress``
      and of torch-sim's own models (its cell optimisers use ``virial = -V * (stress + pressure)``). NaN for a
      structure without volume.

    Every call builds the graph of all structures with matkit's batched Numba neighbour list (on the CPU) and
    evaluates them in one model call, exactly as :class:`~matkit.calculator.MatkitCalculator` does for one
    structure: the same input checks, and positions wrapped and centred in float64
    (:func:`~matkit.graph.centred_positions`) before the cast to ``dtype``.
    """

    def __init__(self, model, device=None, dtype: torch.dtype = torch.float64, *, compute_forces: bool = True,
                 compute_stress: bool = True):
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self._dtype = dtype
        self._compute_forces = bool(compute_forces)
        self._compute_stress = bool(compute_stress)
        self.model = _as_potential(model).to(device=self._device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def forward(self, state: SimState | dict, **kwargs) -> dict[str, torch.Tensor]:
        if isinstance(state, dict):
            state = SimState(**{"masses": torch.ones_like(state["positions"][:, 0]), **state})
        self.model.species_index(state.atomic_numbers.detach().to(self._device))  # unknown elements: fail early
        n_systems = state.cell.shape[0]
        counts = torch.bincount(state.system_idx.detach(), minlength=n_systems).cpu().numpy()
        ptr = np.concatenate([[0], np.cumsum(counts)])
        positions = state.positions.detach().to("cpu", torch.float64).numpy()
        numbers = state.atomic_numbers.detach().cpu().numpy()
        cells = state.row_vector_cell.detach().to("cpu", torch.float64).numpy()  # rows = lattice vectors
        pbc = np.array(np.broadcast_to(np.asarray(torch.as_tensor(state.pbc).cpu(), dtype=bool), (n_systems, 3)))
        for b in range(n_systems):
            check_atoms(positions[ptr[b]:ptr[b + 1]], cells[b], pbc[b])

        i, j, S, pair_counts = batched_neighbor_list(positions, cells, pbc, ptr, cutoff=self.model.cutoff)
        pair_ptr = np.concatenate([[0], np.cumsum(pair_counts)])
        graphs = []
        for b in range(n_systems):
            atoms, pairs = slice(ptr[b], ptr[b + 1]), slice(pair_ptr[b], pair_ptr[b + 1])
            ib, jb, Sb = i[pairs] - ptr[b], j[pairs] - ptr[b], S[pairs]
            check_pair_distances(positions[atoms], cells[b], ib, jb, Sb)
            pos_b, Sb = centred_positions(positions[atoms], cells[b], pbc[b], Sb, ib, jb)
            graphs.append(graph_from_pairs(pos_b, numbers[atoms], cells[b], pbc[b], ib, jb, Sb,
                                           self._dtype, self._device))

        with torch.enable_grad():  # forces and stress are autograd gradients, also inside torch.no_grad()
            out = self.model(batch_graphs(graphs), forces=self._compute_forces, stress=self._compute_stress)
        results = {"energy": out["energy"].detach().to(self._dtype)}
        if self._compute_forces:
            results["forces"] = out["forces"].detach()
        if self._compute_stress:
            results["stress"] = out["stress"].detach()
        return results


def _as_potential(model):
    """A Potential from a Potential, a checkpoint path or a bundled potential's name."""
    if isinstance(model, torch.nn.Module):
        return model
    from .checkpoint import load_checkpoint

    if isinstance(model, str) and not os.path.exists(model):
        from .potentials import checkpoint_path

        model = checkpoint_path(model)
    return load_checkpoint(model)
