"""Matbench Discovery-style evaluation: relaxation (ASE path and batched), energies -> stability, metrics,
prediction files, resumable sharded runs, reports. See ``ecosystem.md`` section 3 for the protocol."""
from .relax import RelaxResult, RelaxSettings, relax_atoms

__all__ = ["RelaxSettings", "RelaxResult", "relax_atoms", "BatchedRelaxer"]


def __getattr__(name):
    if name == "BatchedRelaxer":
        from .batched_relax import BatchedRelaxer

        return BatchedRelaxer
    raise AttributeError(name)
