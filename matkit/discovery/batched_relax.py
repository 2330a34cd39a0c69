"""Batched FIRE + Frechet-cell relaxation of many structures as one PyG batch on one device.

The algorithm is ASE's ``FIRE(FrechetCellFilter(atoms))`` applied to every structure independently, but with one
model call per step for all structures in flight:

* degrees of freedom per structure (same as ``ase.filters.FrechetCellFilter``): the atom positions in the
  undeformed cell ``x = r F^{-T}`` (N, 3) and the scaled log-deformation ``X = c log(F)`` (3, 3) of the cell,
  with ``F`` the deformation gradient (``cell = cell0 F^T``) and ``c`` the ``exp_cell_factor`` (number of atoms);
* generalised forces: ``f F`` on the atoms and ``(1/c) dE/dlog(F)`` on the cell, the latter being the
  adjoint Frechet derivative of the matrix exponential applied to ``-V sigma F^{-T}`` (obtained by autograd
  through ``torch.linalg.matrix_exp``, i.e. ASE's ``expm_frechet`` loop in one batched call);
* FIRE state (velocity, dt, mixing a, steps since the last uphill move) is per structure; the step length is
  clipped per structure to ``maxstep`` over all its degrees of freedom, as in ASE;
* convergence per structure: the largest row norm of its generalised forces (atoms and the 3 cell rows) is
  below ``fmax``; converged structures (or those that reached ``max_steps``) leave the pool and waiting ones
  take their place (an "in-flight" pool bounded by an atom budget).

The FIRE state is kept in float64 whatever the model's dtype.

One bad structure never stops the others: a structure whose state or model output stops being finite, whose atoms
come closer than :data:`~matkit.graph.MIN_PAIR_DISTANCE`, or whose own evaluation raises, leaves the pool as a
:class:`RelaxFailure` (naming its input index and the cause), yielded by ``irelax(..., errors="yield")`` or raised
by default.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torch_geometric.data import Batch

from ..graph import MIN_PAIR_DISTANCE
from ..neighbors import batched_neighbor_list
from .relax import RelaxResult, RelaxSettings

__all__ = ["BatchedRelaxer", "batched_relax", "RelaxFailure"]


class RelaxFailure(ValueError):
    """A structure that could not be relaxed: ``index`` is its position in the input, ``reason`` says why."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"structure {index}: {reason}")
        self.index, self.reason = index, reason


class _Pool:
    """Concatenated state of the structures in flight (all float64 tensors on one device).

    Atom-level: ``x`` (N, 3) positions in the undeformed cell, ``v_atoms`` (N, 3) FIRE velocities,
    ``numbers`` (N,), ``seg`` (N,) structure slot of each atom. Structure-level (B, ...): ``cell0``, ``log_f``
    (log-deformation, unscaled), ``v_cell`` (3, 3) velocities of the scaled cell DOF, ``dt``, ``a``,
    ``n_since_reset`` (FIRE's ``Nsteps``), ``n_steps``, ``started`` (FIRE has taken its first step),
    ``ids`` (input index), ``natoms``, ``pbc``, ``t0`` (wall time at insertion).
    """

    def __init__(self, device):
        self.device = device
        f64 = dict(dtype=torch.float64, device=device)
        self.x = torch.zeros((0, 3), **f64)
        self.v_atoms = torch.zeros((0, 3), **f64)
        self.numbers = torch.zeros(0, dtype=torch.long, device=device)
        self.cell0 = torch.zeros((0, 3, 3), **f64)
        self.log_f = torch.zeros((0, 3, 3), **f64)
        self.v_cell = torch.zeros((0, 3, 3), **f64)
        self.dt = torch.zeros(0, **f64)
        self.a = torch.zeros(0, **f64)
        self.n_since_reset = torch.zeros(0, dtype=torch.long, device=device)
        self.n_steps = torch.zeros(0, dtype=torch.long, device=device)
        self.started = torch.zeros(0, dtype=torch.bool, device=device)
        self.natoms = torch.zeros(0, dtype=torch.long, device=device)
        self.pbc = np.zeros((0, 3), dtype=bool)
        self.ids: List[int] = []
        self.t0: List[float] = []
        # Verlet lists (cutoff + skin), local atom indices, per structure; geometry at the last build
        self.edge_src = torch.zeros(0, dtype=torch.long, device=device)
        self.edge_dst = torch.zeros(0, dtype=torch.long, device=device)
        self.edge_shift = torch.zeros((0, 3), **f64)
        self.edge_seg = torch.zeros(0, dtype=torch.long, device=device)
        self.x_built = torch.zeros((0, 3), **f64)
        self.deform_built = torch.zeros((0, 3, 3), **f64)
        self.built = torch.zeros(0, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def total_atoms(self) -> int:
        return int(self.x.shape[0])

    @property
    def seg(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self), device=self.device), self.natoms)

    @property
    def ptr(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.natoms.cpu().numpy())])

    def add(self, index: int, atoms, settings: RelaxSettings) -> None:
        f64 = dict(dtype=torch.float64, device=self.device)
        n = len(atoms)
        self.x = torch.cat([self.x, torch.as_tensor(atoms.positions, **f64)])
        self.v_atoms = torch.cat([self.v_atoms, torch.zeros((n, 3), **f64)])
        self.numbers = torch.cat([self.numbers, torch.as_tensor(atoms.numbers, dtype=torch.long,
                                                                device=self.device)])
        self.cell0 = torch.cat([self.cell0, torch.as_tensor(atoms.cell.array, **f64)[None]])
        self.log_f = torch.cat([self.log_f, torch.zeros((1, 3, 3), **f64)])
        self.v_cell = torch.cat([self.v_cell, torch.zeros((1, 3, 3), **f64)])
        self.dt = torch.cat([self.dt, torch.tensor([settings.dt], **f64)])
        self.a = torch.cat([self.a, torch.tensor([settings.astart], **f64)])
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        self.n_since_reset = torch.cat([self.n_since_reset, zero])
        self.n_steps = torch.cat([self.n_steps, zero])
        self.started = torch.cat([self.started, torch.zeros(1, dtype=torch.bool, device=self.device)])
        self.natoms = torch.cat([self.natoms, torch.tensor([n], dtype=torch.long, device=self.device)])
        self.pbc = np.concatenate([self.pbc, np.asarray(atoms.pbc, dtype=bool)[None]])
        self.x_built = torch.cat([self.x_built, torch.zeros((n, 3), **f64)])
        self.deform_built = torch.cat([self.deform_built, torch.eye(3, **f64)[None]])
        self.built = torch.cat([self.built, torch.zeros(1, dtype=torch.bool, device=self.device)])
        self.ids.append(int(index))
        self.t0.append(time.perf_counter())

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the structures whose ``keep`` entry (B,) is False."""
        atom_keep = keep[self.seg]
        for name in ("x", "v_atoms", "numbers", "x_built"):
            setattr(self, name, getattr(self, name)[atom_keep])
        for name in ("cell0", "log_f", "v_cell", "dt", "a", "n_since_reset", "n_steps", "started", "natoms",
                     "deform_built", "built"):
            setattr(self, name, getattr(self, name)[keep])
        edge_keep = keep[self.edge_seg]
        new_slot = torch.cumsum(keep.long(), 0) - 1
        self.edge_src, self.edge_dst = self.edge_src[edge_keep], self.edge_dst[edge_keep]
        self.edge_shift, self.edge_seg = self.edge_shift[edge_keep], new_slot[self.edge_seg[edge_keep]]
        keep_np = keep.cpu().numpy()
        self.pbc = self.pbc[keep_np]
        self.ids = [i for i, k in zip(self.ids, keep_np) if k]
        self.t0 = [t for t, k in zip(self.t0, keep_np) if k]

    def subset(self, slot: int) -> "_Pool":
        """A new pool holding only structure ``slot`` (this pool is left unchanged)."""
        import copy

        other = copy.copy(self)
        mask = torch.zeros(len(self), dtype=torch.bool, device=self.device)
        mask[slot] = True
        other.keep(mask)
        return other

    def replace_edges(self, slots: List[int], lists) -> None:
        """Replace the Verlet lists of structures ``slots`` by ``lists`` ((i, j, S) local int64 arrays each)."""
        drop = torch.zeros(len(self), dtype=torch.bool, device=self.device)
        drop[slots] = True
        keep = ~drop[self.edge_seg]
        src, dst = [self.edge_src[keep]], [self.edge_dst[keep]]
        shift, seg = [self.edge_shift[keep]], [self.edge_seg[keep]]
        for slot, (i, j, S) in zip(slots, lists):
            src.append(torch.as_tensor(j, dtype=torch.long, device=self.device))
            dst.append(torch.as_tensor(i, dtype=torch.long, device=self.device))
            shift.append(torch.as_tensor(S, dtype=torch.float64, device=self.device).reshape(-1, 3))
            seg.append(torch.full((len(i),), slot, dtype=torch.long, device=self.device))
        seg = torch.cat(seg)
        order = torch.sort(seg, stable=True).indices
        self.edge_src, self.edge_dst = torch.cat(src)[order], torch.cat(dst)[order]
        self.edge_shift, self.edge_seg = torch.cat(shift)[order], seg[order]


class BatchedRelaxer:
    """Relax many structures with a matkit :class:`~matkit.models.Potential`, batched on one device.

    Parameters
    ----------
    model : a matkit Potential (or a checkpoint path).
    settings : :class:`RelaxSettings` (the benchmark's protocol by default).
    device, dtype : where and in which precision the model runs ("float32" or "float64").
    max_atoms : atom budget of the in-flight pool (structures are added while it is not exceeded; a single
        structure larger than the budget still runs alone).
    max_structures : optional cap on the number of structures in flight.
    skin : Verlet skin in Å. Each structure's neighbour list is built with ``cutoff + skin`` and reused while
        no pair can have entered the cutoff sphere: with ``delta`` the largest atom displacement (in the frame
        of the last build) and ``s`` the smallest singular value of the cell deformation since then, the list
        is kept while ``s * (cutoff + skin - 2 delta) >= cutoff``. Pairs beyond the cutoff are dropped every
        step, so the model sees exactly the pairs of a fresh list. ``skin=0`` rebuilds every step.
    """

    def __init__(self, model, settings: Optional[RelaxSettings] = None, device: str = "cpu",
                 dtype: str = "float64", max_atoms: int = 4096, max_structures: Optional[int] = None,
                 skin: float = 1.0):
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from ..checkpoint import load_checkpoint

            model = load_checkpoint(model)
        dtypes = {"float32": torch.float32, "float64": torch.float64}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {list(dtypes)}, got {dtype!r}")
        if max_atoms < 1:
            raise ValueError(f"max_atoms must be >= 1, got {max_atoms}")
        self.settings = settings or RelaxSettings()
        self.device = torch.device(device)
        self.dtype = dtypes[dtype]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_atoms = int(max_atoms)
        self.max_structures = max_structures
        if not skin >= 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.skin = float(skin)
        self.n_model_calls = 0
        self.n_neighbor_builds = 0

    # ---- public API ------------------------------------------------------------------------------------------
    def relax(self, structures: Sequence) -> List[RelaxResult]:
        """Relax all ``structures`` (``ase.Atoms`` or pymatgen ``Structure``); results in input order."""
        results: List[Optional[RelaxResult]] = [None] * len(structures)
        for index, result in self.irelax(structures):
            results[index] = result
        return results  # type: ignore[return-value]

    def irelax(self, structures: Iterable, errors: str = "raise") -> Iterator[Tuple[int, RelaxResult]]:
        """Yield ``(input index, RelaxResult)`` as structures finish (not in input order).

        errors : "raise" (default) raises the first :class:`RelaxFailure`; "yield" yields ``(index, RelaxFailure)``
            for every structure that fails and relaxes all the others.
        """
        if errors not in ("raise", "yield"):
            raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}")

        def emit(index, outcome):
            if isinstance(outcome, RelaxFailure) and errors == "raise":
                raise outcome
            return index, outcome

        pending = enumerate(structures)
        pool = _Pool(self.device)
        exhausted = False
        waiting = None
        while True:
            while not exhausted and self._has_room(pool, waiting):
                if waiting is None:
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        break
                    try:
                        waiting = (item[0], _as_atoms(item[1]))
                        self._check(waiting[1])
                    except Exception as err:  # noqa: BLE001 - becomes this structure's failure
                        yield emit(item[0], RelaxFailure(item[0], f"{type(err).__name__}: {err}"))
                        waiting = None
                        continue
                if not self._has_room(pool, waiting):
                    break
                pool.add(waiting[0], waiting[1], self.settings)
                waiting = None
            if len(pool) == 0:
                return
            for index, outcome in self._robust_step(pool):
                yield emit(index, outcome)

    # ---- internals -------------------------------------------------------------------------------------------
    def _has_room(self, pool: _Pool, candidate) -> bool:
        if len(pool) == 0:
            return True
        if self.max_structures is not None and len(pool) >= self.max_structures:
            return False
        n_new = len(candidate[1]) if candidate is not None else 0
        return pool.total_atoms + n_new <= self.max_atoms

    def _check(self, atoms) -> None:
        from ..graph import check_atoms

        if len(atoms) == 0:
            raise ValueError("cannot relax a structure with no atoms")
        if self.settings.relax_cell and not np.all(atoms.pbc):
            raise ValueError("cell relaxation needs a structure periodic in all three directions (pbc=True)")
        check_atoms(atoms.positions, atoms.cell.array, atoms.pbc)
        self.model.species_index(torch.as_tensor(atoms.numbers))

    def _robust_step(self, pool: _Pool) -> Iterator[Tuple[int, object]]:
        """:meth:`_step`, but structures that make it fail leave the pool as :class:`RelaxFailure`.

        Per-structure problems found before the model call (non-finite state, atoms too close) and after it
        (non-finite energy, forces or stress) are attributed directly. If the batched step raises anyway, every
        structure is evaluated alone once to find the ones that raise; the rest continue.
        """
        try:
            yield from self._step(pool)
            return
        except Exception as err:  # noqa: BLE001 - find the culprit(s) below
            batch_error = err
        failed = {}
        for slot in range(len(pool)):
            single = pool.subset(slot)
            try:
                deform, positions, cells, seg = self._current_geometry(single)
                self._evaluate(single, deform, positions, cells, seg)
            except Exception as err:  # noqa: BLE001
                failed[slot] = f"{type(err).__name__}: {err}"
        if not failed:  # not attributable to one structure: a real bug, do not hide it
            raise batch_error
        keep = torch.ones(len(pool), dtype=torch.bool, device=self.device)
        for slot, message in failed.items():
            keep[slot] = False
            yield pool.ids[slot], RelaxFailure(pool.ids[slot], message)
        pool.keep(keep)

    def _current_geometry(self, pool: _Pool):
        """Deformation gradients F (B,3,3), Cartesian positions (N,3) and cells (B,3,3), float64."""
        deform = torch.linalg.matrix_exp(pool.log_f)
        deform_t = deform.transpose(1, 2)
        seg = pool.seg
        positions = torch.einsum("ni,nij->nj", pool.x, deform_t[seg])
        cells = pool.cell0 @ deform_t
        return deform, positions, cells, seg

    def _update_neighbor_lists(self, pool: _Pool, deform, positions, cells, seg) -> None:
        """Rebuild the Verlet lists of the structures for which a pair may have crossed the cutoff."""
        cutoff = self.model.cutoff
        moved = ((pool.x - pool.x_built)[:, None, :] * pool.deform_built[seg]).sum(-1).norm(dim=1)
        delta = torch.zeros(len(pool), dtype=torch.float64, device=self.device).scatter_reduce(
            0, seg, moved, reduce="amax", include_self=True)
        strain = torch.linalg.solve(pool.deform_built.transpose(1, 2), deform.transpose(1, 2))
        shrink = torch.linalg.svdvals(strain)[:, -1]
        stale = ~pool.built | (shrink * (cutoff + self.skin - 2.0 * delta) < cutoff) | (self.skin <= 0)
        slots = torch.nonzero(stale).flatten().tolist()
        if not slots:
            return
        ptr = pool.ptr
        pos_np, cell_np = positions.cpu().numpy(), cells.cpu().numpy()
        blocks = [pos_np[ptr[b]:ptr[b + 1]] for b in slots]
        # one Numba call for all stale structures; indices come back global to the concatenated blocks
        i, j, S, counts = batched_neighbor_list(blocks, cell_np[slots], np.asarray(pool.pbc)[slots],
                                                cutoff=cutoff + self.skin)
        offsets = np.repeat(np.cumsum([0] + [len(x) for x in blocks[:-1]]), counts)
        split = np.cumsum(counts)[:-1]
        lists = list(zip(np.split(i - offsets, split), np.split(j - offsets, split), np.split(S, split)))
        self.n_neighbor_builds += len(slots)
        pool.replace_edges(slots, lists)
        atom_stale = stale[seg]
        pool.x_built = torch.where(atom_stale[:, None], pool.x, pool.x_built)
        pool.deform_built = torch.where(stale[:, None, None], deform, pool.deform_built)
        pool.built = torch.ones_like(pool.built)

    def _evaluate(self, pool: _Pool, deform, positions, cells, seg):
        """Model energies (B,), forces (N,3) and stresses (B,3,3) at the given geometry (float64 out)."""
        self._update_neighbor_lists(pool, deform, positions, cells, seg)
        ptr = torch.as_tensor(pool.ptr, dtype=torch.long, device=self.device)
        src = pool.edge_src + ptr[pool.edge_seg]
        dst = pool.edge_dst + ptr[pool.edge_seg]
        vec = positions[src] - positions[dst] + torch.einsum("ek,ekl->el", pool.edge_shift, cells[pool.edge_seg])
        d2 = (vec * vec).sum(1)
        too_close = d2 < MIN_PAIR_DISTANCE ** 2
        if bool(too_close.any()):
            b = int(pool.edge_seg[too_close][0])
            e = int(torch.nonzero(too_close).flatten()[0])
            raise ValueError(f"atoms {int(pool.edge_dst[e])} and {int(pool.edge_src[e])} of structure {pool.ids[b]} "
                             f"are {float(d2[e].sqrt()):.3f} Å apart (closer than {MIN_PAIR_DISTANCE} Å)")
        inside = d2 < self.model.cutoff ** 2
        batch = Batch(pos=positions.to(self.dtype), atomic_numbers=pool.numbers, cell=cells.to(self.dtype),
                      pbc=torch.as_tensor(pool.pbc, device=self.device), edge_index=torch.stack([src, dst])[:, inside],
                      shifts=pool.edge_shift[inside].to(self.dtype), batch=seg, ptr=ptr)
        out = self.model(batch, forces=True, stress=self.settings.relax_cell)
        self.n_model_calls += 1
        energy = out["energy"].detach().to(torch.float64)
        forces = out["forces"].detach().to(torch.float64)
        stress = out["stress"].detach().to(torch.float64) if self.settings.relax_cell else None
        return energy, forces, stress

    def _generalised_forces(self, pool: _Pool, deform, forces, stress, cells, seg):
        """FrechetCellFilter forces: atoms (N,3) = f F; cell (B,3,3) = dE/dlog(F) / n_atoms (zero if fixed)."""
        atom_forces = torch.einsum("ni,nij->nj", forces, deform[seg])
        if not self.settings.relax_cell:
            return atom_forces, torch.zeros_like(pool.log_f)
        volume = torch.linalg.det(cells).abs()
        virial = -volume.view(-1, 1, 1) * stress
        ucf_grad = virial @ torch.linalg.inv(deform.transpose(1, 2))
        with torch.enable_grad():
            log_f = pool.log_f.detach().clone().requires_grad_(True)
            projected = (torch.linalg.matrix_exp(log_f) * ucf_grad).sum()
            (log_force,) = torch.autograd.grad(projected, log_f)
        cell_forces = log_force / pool.natoms.to(torch.float64).view(-1, 1, 1)
        return atom_forces, cell_forces

    def _step(self, pool: _Pool) -> Iterator[Tuple[int, RelaxResult]]:
        """Evaluate the pool, retire finished structures (yielding results), advance the rest by one FIRE step."""
        s = self.settings
        bad = self._bad_state(pool)
        if bad:
            yield from self._drop(pool, bad)
            if len(pool) == 0:
                return
        deform, positions, cells, seg = self._current_geometry(pool)
        energy, forces, stress = self._evaluate(pool, deform, positions, cells, seg)
        f_atoms, f_cell = self._generalised_forces(pool, deform, forces, stress, cells, seg)
        bad = self._bad_output(pool, energy, f_atoms, f_cell, seg)
        if bad:  # drop them and take this step again without them (the others' state is unchanged so far)
            yield from self._drop(pool, bad)
            if len(pool):
                yield from self._step(pool)
            return

        n = len(pool)
        atom_norm_max = torch.zeros(n, dtype=torch.float64, device=self.device).scatter_reduce(
            0, seg, f_atoms.norm(dim=1), reduce="amax", include_self=True)
        row_norm_max = torch.maximum(atom_norm_max, f_cell.norm(dim=2).amax(dim=1))
        converged = row_norm_max < s.fmax
        done = converged | (pool.n_steps >= s.max_steps)
        if bool(done.any()):
            yield from self._retire(pool, done, converged, energy, positions, cells)
            keep = ~done
            pool.keep(keep)
            if len(pool) == 0:
                return
            f_atoms, f_cell = f_atoms[keep[seg]], f_cell[keep]
            seg = pool.seg
        self._fire_update(pool, f_atoms, f_cell, seg)

    def _bad_state(self, pool: _Pool) -> dict:
        """{slot: reason} for structures whose FIRE state is no longer finite (an exploding relaxation)."""
        ok_atoms = torch.zeros(len(pool), dtype=torch.long, device=self.device).index_add_(
            0, pool.seg, (~torch.isfinite(pool.x).all(1)).long()) == 0
        finite_cell = torch.isfinite(pool.log_f).flatten(1).all(1)
        bad = torch.nonzero(~(ok_atoms & finite_cell)).flatten().tolist()
        return {b: f"positions or cell became non-finite after {int(pool.n_steps[b])} FIRE steps" for b in bad}

    def _bad_output(self, pool: _Pool, energy, f_atoms, f_cell, seg) -> dict:
        """{slot: reason} for structures with non-finite energies or generalised forces."""
        atoms_ok = torch.zeros(len(pool), dtype=torch.long, device=self.device).index_add_(
            0, seg, (~torch.isfinite(f_atoms).all(1)).long()) == 0
        ok = torch.isfinite(energy) & atoms_ok & torch.isfinite(f_cell).flatten(1).all(1)
        return {b: f"non-finite energy, forces or stress after {int(pool.n_steps[b])} FIRE steps "
                   f"(energy {float(energy[b])})" for b in torch.nonzero(~ok).flatten().tolist()}

    def _drop(self, pool: _Pool, bad: dict) -> Iterator[Tuple[int, object]]:
        keep = torch.ones(len(pool), dtype=torch.bool, device=self.device)
        for slot, reason in bad.items():
            keep[slot] = False
            yield pool.ids[slot], RelaxFailure(pool.ids[slot], reason)
        pool.keep(keep)

    def _retire(self, pool, done, converged, energy, positions, cells):
        ptr = pool.ptr
        pos_np, cell_np = positions.cpu().numpy(), cells.cpu().numpy()
        numbers = pool.numbers.cpu().numpy()
        from ase import Atoms

        for b in torch.nonzero(done).flatten().tolist():
            atoms = Atoms(numbers=numbers[ptr[b]:ptr[b + 1]], positions=pos_np[ptr[b]:ptr[b + 1]],
                          cell=cell_np[b], pbc=pool.pbc[b])
            yield pool.ids[b], RelaxResult(energy=float(energy[b]), n_steps=int(pool.n_steps[b]),
                                           converged=bool(converged[b]), atoms=atoms,
                                           wall_time=time.perf_counter() - pool.t0[b])

    def _fire_update(self, pool: _Pool, f_atoms, f_cell, seg) -> None:
        """One ASE FIRE step per structure (``ase.optimize.FIRE.step``), vectorised over the pool."""
        s = self.settings
        n = len(pool)

        def per_structure(atom_values, cell_values):
            total = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(0, seg, atom_values)
            return total + cell_values.sum(dim=(1, 2))

        # the cell DOF is X = n_atoms * log(F): its velocity lives in the same scaled space
        vf = per_structure((f_atoms * pool.v_atoms).sum(1), f_cell * pool.v_cell)
        grad2 = per_structure((f_atoms * f_atoms).sum(1), f_cell * f_cell)
        vel2 = per_structure((pool.v_atoms * pool.v_atoms).sum(1), pool.v_cell * pool.v_cell)
        started = pool.started
        downhill = started & (vf > 0.0)
        uphill = started & ~(vf > 0.0)

        # downhill: mix velocity towards the force direction
        mix_a = torch.where(downhill, pool.a, torch.zeros_like(pool.a))
        scale = torch.where(downhill & (grad2 > 0), mix_a * torch.sqrt(vel2) / torch.sqrt(grad2.clamp_min(1e-300)),
                            torch.zeros_like(pool.a))
        keep_v = torch.where(uphill, torch.zeros_like(pool.a), 1.0 - mix_a)
        pool.v_atoms = keep_v[seg, None] * pool.v_atoms + scale[seg, None] * f_atoms
        pool.v_cell = keep_v[:, None, None] * pool.v_cell + scale[:, None, None] * f_cell
        accelerate = downhill & (pool.n_since_reset > s.Nmin)
        pool.dt = torch.where(accelerate, torch.clamp(pool.dt * s.finc, max=s.dtmax), pool.dt)
        pool.a = torch.where(accelerate, pool.a * s.fa, pool.a)
        pool.n_since_reset = torch.where(downhill, pool.n_since_reset + 1, pool.n_since_reset)
        # uphill: stop, reset mixing, halve the time step
        pool.a = torch.where(uphill, torch.full_like(pool.a, s.astart), pool.a)
        pool.dt = torch.where(uphill, pool.dt * s.fdec, pool.dt)
        pool.n_since_reset = torch.where(uphill, torch.zeros_like(pool.n_since_reset), pool.n_since_reset)

        # Euler step, clipped per structure to maxstep
        dt = pool.dt
        pool.v_atoms = pool.v_atoms + dt[seg, None] * f_atoms
        pool.v_cell = pool.v_cell + dt[:, None, None] * f_cell
        dr_atoms = dt[seg, None] * pool.v_atoms
        dr_cell = dt[:, None, None] * pool.v_cell
        norm_dr = torch.sqrt(per_structure((dr_atoms * dr_atoms).sum(1), dr_cell * dr_cell))
        clip = torch.where(norm_dr > s.maxstep, s.maxstep / norm_dr.clamp_min(1e-300), torch.ones_like(norm_dr))
        pool.x = pool.x + clip[seg, None] * dr_atoms
        if self.settings.relax_cell:
            n_atoms = pool.natoms.to(torch.float64).view(-1, 1, 1)
            pool.log_f = pool.log_f + clip[:, None, None] * dr_cell / n_atoms
        pool.started = torch.ones_like(pool.started)
        pool.n_steps = pool.n_steps + 1


def batched_relax(model, structures: Sequence, settings: Optional[RelaxSettings] = None,
                  **kwargs) -> List[RelaxResult]:
    """Convenience wrapper: ``BatchedRelaxer(model, settings, **kwargs).relax(structures)``."""
    return BatchedRelaxer(model, settings, **kwargs).relax(structures)


def _as_atoms(structure):
    """``ase.Atoms`` from Atoms or a pymatgen Structure (copied; no calculator)."""
    if hasattr(structure, "get_positions"):
        atoms = structure.copy()
        atoms.calc = None
        return atoms
    if hasattr(structure, "lattice"):
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_atoms(structure)
    raise TypeError(f"expected ase.Atoms or pymatgen Structure, got {type(structure).__name__}")
