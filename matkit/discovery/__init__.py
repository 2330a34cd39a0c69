"""Matbench Discovery-style evaluation: relaxation (ASE path and batched), energies -> stability, metrics,
prediction files, resumable sharded runs, reports.

The protocol (Riebesell et al., "A framework to evaluate machine learning crystal stability predictions",
Nat. Mach. Intell. 2025; https://github.com/janosh/matbench-discovery): relax each initial structure with FIRE +
FrechetCellFilter (fmax 0.05 eV/Å, at most 500 steps), put the energy on the MP2020-corrected scale, form the
formation energy from MP's elemental references, and classify stability by the hull distance
``e_hull_dft + e_form_pred - e_form_dft`` (:mod:`.energies`, :mod:`.metrics`). Models on another energy scale
use fitted references (:mod:`.references`); materials without labels get hull distances from known entries
(:mod:`.hull`)."""
from .relax import RelaxResult, RelaxSettings, relax_atoms

__all__ = ["RelaxSettings", "RelaxResult", "relax_atoms", "BatchedRelaxer"]


def __getattr__(name):
    if name == "BatchedRelaxer":
        from .batched_relax import BatchedRelaxer

        return BatchedRelaxer
    raise AttributeError(name)
