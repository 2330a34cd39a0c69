"""matkit: machine-learned interatomic potentials on PyTorch Geometric and e3nn.

Flow: ``ase.Atoms`` -> :mod:`matkit.neighbors` -> :class:`matkit.graph.AtomicGraph` -> a potential from
:mod:`matkit.models` -> energy -> forces / stress by autograd -> :class:`matkit.calculator.MatkitCalculator`.
"""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .graph import AtomicGraph, atoms_to_graph, batch_graphs, pymatgen_to_graph
from .models import available, build

__version__ = "0.1.0"

__all__ = ["AtomicGraph", "atoms_to_graph", "pymatgen_to_graph", "batch_graphs", "build", "available",
           "save_checkpoint", "load_checkpoint", "CheckpointError", "MatkitCalculator"]


def __getattr__(name):
    if name == "MatkitCalculator":
        from .calculator import MatkitCalculator

        return MatkitCalculator
    raise AttributeError(name)
