"""ASE calculator for matkit potentials."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .graph import centred_positions, check_atoms, check_pair_distances, graph_from_pairs
from .neighbors import VerletNeighborList

__all__ = ["MatkitCalculator"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: knots of the radial tables in float32 (see ``radial_table``)
DEFAULT_RADIAL_TABLE_KNOTS = 2048


class MatkitCalculator(Calculator):
    """ASE calculator for any matkit :class:`~matkit.models.Potential`.

    Parameters
    ----------
    model : a Potential, or a path to a matkit checkpoint.
    device : torch device ("cpu", "cuda", ...).
    dtype : "float32" (fast default for MD) or "float64" (relaxations, phonons).
    skin : Verlet skin in Å; the neighbour list is rebuilt only when an atom moved more than skin/2 or the cell
        changed, and reused across MD steps otherwise. 0 rebuilds every call.
    radial_table : knots of the splines that replace radial MLPs at inference in models that have them
        (:mod:`matkit.nn.radial_table`; TensorNet, Gaunt-MACE). Default: 2048 in float32, where the spline's error
        is below the rounding of the exact MLP; 0 (the exact MLPs) in float64. 0 switches them off.

    Properties: energy and free_energy (eV), forces (eV/Å), stress (eV/Å^3, Voigt xx yy zz yz xz xy, tensile
    positive; needs a 3D periodic cell), energies (per-atom, eV). Forces and stress are gradients of the energy.

    Structures with NaN/inf positions, a degenerate periodic cell or atoms closer than 0.1 Å
    (:data:`~matkit.graph.MIN_PAIR_DISTANCE`) raise ``ValueError`` naming the atoms. Positions are wrapped into
    the cell and centred in float64 before the model sees them (:func:`~matkit.graph.centred_positions`), so
    float32 keeps its precision for atoms far from the origin.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model, device: str = "cpu", dtype: str = "float32", skin: float = 0.5,
                 radial_table: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from .checkpoint import load_checkpoint

            model = load_checkpoint(model)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if radial_table is None:
            radial_table = DEFAULT_RADIAL_TABLE_KNOTS if self.dtype == torch.float32 else 0
        if int(radial_table) < 0 or int(radial_table) == 1:
            raise ValueError(f"radial_table must be 0 (off) or at least 2 knots, got {radial_table}")
        self.model.radial_table_knots = int(radial_table)
        self.neighbors = VerletNeighborList(self.model.cutoff, skin)

    @classmethod
    def from_checkpoint(cls, path, **kwargs) -> "MatkitCalculator":
        from .checkpoint import load_checkpoint

        return cls(load_checkpoint(path), **kwargs)

    @classmethod
    def from_pretrained(cls, name: str, **kwargs) -> "MatkitCalculator":
        """Load a bundled potential from ``potentials/<name>/`` (see :func:`matkit.potentials.find`)."""
        from .potentials import checkpoint_path

        return cls.from_checkpoint(checkpoint_path(name), **kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        want_stress = "stress" in properties
        if want_stress and not atoms.pbc.all():
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        check_atoms(atoms.positions, atoms.cell.array, atoms.pbc)
        self.model.species_index(torch.as_tensor(atoms.numbers))  # unknown elements: clear error before any work
        i, j, S = self.neighbors.update(atoms.positions, atoms.cell.array, atoms.pbc)
        check_pair_distances(atoms.positions, atoms.cell.array, i, j, S)
        positions, S = centred_positions(atoms.positions, atoms.cell.array, atoms.pbc, S, i, j)
        graph = graph_from_pairs(positions, atoms.numbers, atoms.cell.array, atoms.pbc, i, j, S, self.dtype,
                                 self.device)
        out = self.model(graph, forces=True, stress=want_stress)
        energy = float(out["energy"][0].detach())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out["energies"].detach().cpu().numpy().astype(np.float64)
        self.results["forces"] = out["forces"].detach().cpu().numpy().astype(np.float64)
        if want_stress:
            stress = out["stress"][0].detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
