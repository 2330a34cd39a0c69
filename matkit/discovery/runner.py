"""Relaxation runs that survive crashes: deterministic shards, append-only JSONL records, resume, strict merge.

Layout of a run directory::

    run.json                 settings of the run (checked on resume: same shards, calculator, protocol)
    shard-0003-of-0016.jsonl one JSON record per structure, appended and fsynced as each structure finishes

* a material belongs to shard ``int(sha256(material_id)[:16], 16) % n_shards`` (independent of input order,
  process or Python hash seed);
* :func:`run_shard` skips ids already recorded, so a restarted run neither redoes nor loses structures; a
  truncated last line (a crash mid-write) is ignored and cut off before appending;
* a failure of one structure becomes an error record (``status: "error"``) and the run goes on;
* :func:`merge_records` demands every expected id exactly once and raises :class:`MergeError` listing what
  is missing, duplicated or unknown;
* backends: ``local`` (process pool, or in-process for ``workers <= 1``) and ``ray`` (one task per shard,
  ``num_gpus=1`` per task when CUDA is available, so Ray places them on GPUs; workers pull shards as they
  free up). :func:`run_shard` is a pure function of a :class:`RunSpec` so other workflow tools can wrap it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .relax import RelaxSettings, atoms_to_dict

__all__ = ["shard_of", "shard_path", "RunSpec", "run_shard", "run", "read_records", "append_record",
           "merge_records", "MergeError", "load_calculator", "records_to_frame", "formation_energy_fields",
           "recompute_formation_energies"]


# ---- shards and records ----------------------------------------------------------------------------------------
def shard_of(material_id: str, n_shards: int) -> int:
    """Deterministic shard index of ``material_id`` in ``[0, n_shards)`` (SHA-256 based)."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    digest = hashlib.sha256(str(material_id).encode()).hexdigest()
    return int(digest[:16], 16) % n_shards


def shard_path(out_dir, shard: int, n_shards: int) -> Path:
    return Path(out_dir) / f"shard-{shard:04d}-of-{n_shards:04d}.jsonl"


def read_records(path, repair: bool = False) -> List[dict]:
    """Records of one JSONL shard file.

    Every newline-terminated line must be a JSON record (else ``ValueError`` naming the line). A last line
    without its newline is a write cut short by a crash: it is ignored, and cut from the file when ``repair``.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1  # bytes up to the last newline
    records = []
    for number, line in enumerate(data[:complete_end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path}: corrupt record on line {number}: {line[:80]!r}") from None
    if repair and complete_end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(complete_end)
            handle.flush()
            os.fsync(handle.fileno())
    return records


def append_record(path, record: dict) -> None:
    """Append one record as a JSON line under an exclusive lock and fsync it."""
    import fcntl

    line = (json.dumps(record, allow_nan=True, separators=(",", ":")) + "\n").encode()
    with open(path, "ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---- calculators -------------------------------------------------------------------------------------------------
def load_calculator(spec: str, device: str = "cpu", dtype: str = "float64"):
    """``(kind, object, energy_scale)`` for a calculator spec.

    ``"chgnet"`` (or ``"chgnet:0.3.0"``): CHGNet's ASE calculator, trained on MP2020-corrected energies;
    a path to a matkit checkpoint or the name of a bundled potential (``matkit.potentials``):
    ``("matkit", model, scale)`` with the scale from the checkpoint metadata (``energy_scale``: ``"raw"``,
    ``"mp2020"`` or ``"own"``; ``"raw"`` if absent).
    """
    if spec.split(":")[0].lower() == "chgnet":
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        version = spec.split(":", 1)[1] if ":" in spec else "0.3.0"
        model = CHGNet.load(model_name=version, use_device=device, verbose=False)
        return "ase", CHGNetCalculator(model=model, use_device=device), "mp2020"
    from ..potentials import checkpoint_path, list_potentials

    path = Path(spec)
    if not path.is_file():
        if spec not in list_potentials():
            raise FileNotFoundError(f"calculator {spec!r} is neither 'chgnet', an existing matkit checkpoint nor a "
                                    f"bundled potential ({', '.join(list_potentials())})")
        path = checkpoint_path(spec)
    from ..checkpoint import load_checkpoint

    model, payload = load_checkpoint(path, return_payload=True)
    scale = (payload.get("metadata") or {}).get("energy_scale", "raw")
    return "matkit", model, scale


# ---- one shard ---------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """Everything a worker needs to process one shard (plain data, picklable)."""

    structures: str
    out_dir: str
    calculator: str
    n_shards: int = 1
    shard: int = 0
    settings: Dict = field(default_factory=dict)
    energy_scale: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float64"
    batched: bool = True
    max_atoms: int = 4096
    limit: Optional[int] = None
    entries: Optional[str] = None
    references: Optional[str] = None
    progress: bool = False

    def relax_settings(self) -> RelaxSettings:
        return RelaxSettings(**self.settings)


def _structures_of_shard(spec: RunSpec) -> List[Tuple[str, object]]:
    from .io import read_structures

    pairs = read_structures(spec.structures, limit=spec.limit, errors="keep")
    return [(mid, atoms) for mid, atoms in pairs if shard_of(mid, spec.n_shards) == spec.shard]


def _load_entries(path: Optional[str]) -> Dict[str, dict]:
    if not path:
        return {}
    df = pd.read_json(path)
    col = next((c for c in ("computed_structure_entry", "cse", "entry") if c in df), None)
    if col is None or "material_id" not in df:
        raise KeyError(f"{path}: expected columns 'material_id' and 'computed_structure_entry'")
    return dict(zip(df["material_id"].astype(str), df[col]))


def formation_energy_fields(atoms, energy: float, energy_scale: str, entry=None, references=None) -> dict:
    """``energy_mp2020``, ``e_form_per_atom`` (eV, eV/atom; None if undefined) and a ``note`` saying why not.

    With ``references`` (a :class:`~matkit.discovery.references.ReferenceFit`) the formation energy is on the
    model's own scale through the fitted references; otherwise the energy is put on the MP2020 scale
    (``energy_scale`` "raw" or "mp2020") and MP's elemental references apply. A model on its own scale
    (``"own"``) without references gets no formation energy.
    """
    from .energies import energy_on_mp2020_scale, formation_energy_per_atom

    try:
        if references is not None:
            return {"energy_mp2020": None, "e_form_per_atom": references.formation_energy(atoms, energy),
                    "references": references.corrections}
        if energy_scale == "own":
            raise ValueError("the model's energies are on its own scale (not MP's): fit reference energies with "
                             "'matkit discovery fit-references' and pass --references")
        corrected = energy_on_mp2020_scale(atoms, energy, energy_scale, entry=entry)
        return {"energy_mp2020": corrected, "e_form_per_atom": formation_energy_per_atom(atoms, corrected)}
    except (ValueError, KeyError) as err:
        return {"energy_mp2020": None, "e_form_per_atom": None, "note": f"no formation energy: {err}"}


#: a formation energy beyond this (eV/atom) is flagged as unphysical (real ones lie within about -5 .. +4)
MAX_PLAUSIBLE_E_FORM = 10.0


def record_flags(record: dict) -> str:
    """``;``-separated warnings a prediction must carry: "not converged", "unphysical formation energy",
    "no formation energy" (empty when none)."""
    flags = []
    if not record.get("converged", False):
        flags.append("not converged")
    e_form = record.get("e_form_per_atom")
    if e_form is None or not math.isfinite(e_form):
        flags.append("no formation energy")
    elif abs(e_form) > MAX_PLAUSIBLE_E_FORM:
        flags.append("unphysical formation energy")
    return ";".join(flags)


def _make_record(material_id, result, energy_scale, entry, shard, references=None) -> dict:
    atoms = result.atoms
    record = {"material_id": material_id, "status": "ok", "shard": shard, "n_atoms": len(atoms),
              "formula": atoms.get_chemical_formula(mode="metal"), "energy": result.energy,
              "n_steps": result.n_steps, "converged": result.converged, "wall_time": round(result.wall_time, 4),
              "energy_scale": energy_scale, "structure": atoms_to_dict(atoms)}
    record.update(formation_energy_fields(atoms, result.energy, energy_scale, entry, references))
    if not math.isfinite(result.energy):
        record["e_form_per_atom"] = None
    record["flags"] = record_flags(record)
    return record


def _error_record(material_id, err, shard) -> dict:
    import sys

    trace = traceback.format_exc(limit=5) if sys.exc_info()[0] is not None else ""
    return {"material_id": material_id, "status": "error", "shard": shard, "error": f"{type(err).__name__}: {err}",
            "traceback": trace, "e_form_per_atom": None, "flags": "failed"}


def run_shard(spec: RunSpec) -> Dict[str, int]:
    """Relax the structures of ``spec.shard`` not yet recorded; append one record each. Returns counts."""
    import torch

    path = shard_path(spec.out_dir, spec.shard, spec.n_shards)
    done = {r["material_id"] for r in read_records(path, repair=True)}
    todo = [(mid, atoms) for mid, atoms in _structures_of_shard(spec) if mid not in done]
    counts = {"shard": spec.shard, "skipped": len(done), "done": 0, "errors": 0}
    if not todo:
        return counts
    if spec.device == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(1)
    kind, calc, scale = load_calculator(spec.calculator, spec.device, spec.dtype)
    scale = spec.energy_scale or scale
    entries = _load_entries(spec.entries)
    references = None
    if spec.references:
        from .references import ReferenceFit

        references = ReferenceFit.load(spec.references)
    settings = spec.relax_settings()
    bar = _progress(len(todo), f"shard {spec.shard}", spec.progress)

    def write(mid, result=None, err=None):
        record = (_make_record(mid, result, scale, entries.get(mid), spec.shard, references) if err is None
                  else _error_record(mid, err, spec.shard))
        append_record(path, record)
        counts["errors" if err is not None else "done"] += 1
        bar.update(1)

    unreadable = [(mid, atoms) for mid, atoms in todo if isinstance(atoms, Exception)]
    for mid, err in unreadable:  # input rows that could not be parsed: recorded as failed, the rest goes on
        write(mid, err=err)
    todo = [(mid, atoms) for mid, atoms in todo if not isinstance(atoms, Exception)]
    if kind == "matkit" and spec.batched:
        _run_batched(calc, todo, settings, spec, write)
    else:
        from .relax import relax_atoms

        if kind == "matkit":
            from ..calculator import MatkitCalculator

            calc = MatkitCalculator(calc, device=spec.device, dtype=spec.dtype, skin=0.0)
        for mid, atoms in todo:
            try:
                result = relax_atoms(atoms, calc, settings)
            except Exception as err:  # one bad structure must not stop the shard
                write(mid, err=err)
                continue
            write(mid, result)
    bar.close()
    return counts


def _run_batched(model, todo, settings, spec: RunSpec, write) -> None:
    """Relax ``todo`` with the batched relaxer; a structure that fails becomes an error record naming it and the
    cause (the relaxer takes it out of its pool), the others carry on."""
    from .batched_relax import BatchedRelaxer, RelaxFailure

    relaxer = BatchedRelaxer(model, settings, device=spec.device, dtype=spec.dtype, max_atoms=spec.max_atoms)
    for index, outcome in relaxer.irelax((atoms for _, atoms in todo), errors="yield"):
        mid = todo[index][0]
        if isinstance(outcome, RelaxFailure):
            write(mid, err=ValueError(outcome.reason))
        else:
            write(mid, outcome)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total, desc, enabled):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


# ---- whole runs --------------------------------------------------------------------------------------------------
def _manifest(spec: RunSpec) -> dict:
    keep = ("structures", "calculator", "n_shards", "settings", "energy_scale", "dtype", "limit", "entries",
            "references")
    data = {k: getattr(spec, k) for k in keep}
    data["settings"] = dataclasses.asdict(spec.relax_settings())
    data["structures"] = str(Path(spec.structures).resolve())
    return data


def _check_manifest(out_dir: Path, spec: RunSpec) -> None:
    path = out_dir / "run.json"
    current = _manifest(spec)
    if path.exists():
        previous = json.loads(path.read_text())
        diffs = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
        if diffs:
            raise ValueError(f"{out_dir} holds a run with different settings; refusing to mix results. "
                             f"Differences (old, new): {diffs}. Use a new output directory.")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=1))
        os.replace(tmp, path)


def run(structures, out_dir, calculator: str, n_shards: int = 1, workers: int = 1, backend: str = "local",
        shards: Optional[Sequence[int]] = None, progress: bool = True, **spec_kwargs) -> List[Dict[str, int]]:
    """Run (or resume) all shards ``shards`` (default all) of a relaxation run; returns per-shard counts.

    backend "local": ``workers <= 1`` runs the shards in this process, otherwise in a process pool
    (forked, or spawned once CUDA is initialised); "ray": one Ray task per shard (see :func:`run_ray`).
    """
    base = RunSpec(structures=str(structures), out_dir=str(out_dir), calculator=calculator, n_shards=n_shards,
                   **spec_kwargs)
    shard_ids = _validate_run(base, shards, workers, backend)  # before anything is written
    with _RunLock(Path(out_dir)):
        _check_manifest(Path(out_dir), base)
        specs = [dataclasses.replace(base, shard=s, progress=progress and workers <= 1) for s in shard_ids]
        if backend == "ray":
            return run_ray(specs, workers)
        if workers <= 1:
            return [run_shard(s) for s in specs]
        from concurrent.futures import ProcessPoolExecutor, as_completed

        results = []
        bar = _progress(len(specs), "shards", progress)
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                                 initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(run_shard, s) for s in specs]
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(1)
        bar.close()
        return sorted(results, key=lambda c: c["shard"])


def _validate_run(spec: RunSpec, shards, workers: int, backend: str) -> List[int]:
    """Check a run's inputs (cheaply: no structure is parsed, no model loaded) -> the shard indices to run."""
    if not isinstance(spec.n_shards, int) or spec.n_shards < 1:
        raise ValueError(f"n_shards must be an integer >= 1, got {spec.n_shards!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if not Path(spec.structures).is_file():
        raise FileNotFoundError(f"structures file not found: {spec.structures}")
    if spec.calculator.split(":")[0].lower() != "chgnet" and not Path(spec.calculator).is_file():
        from ..potentials import list_potentials

        if spec.calculator not in list_potentials():
            raise FileNotFoundError(f"calculator {spec.calculator!r} is neither 'chgnet', an existing matkit "
                                    f"checkpoint nor a bundled potential ({', '.join(list_potentials())})")
    for name in ("entries", "references"):
        value = getattr(spec, name)
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"{name} file not found: {value}")
    spec.relax_settings()
    shard_ids = list(range(spec.n_shards)) if shards is None else [int(s) for s in shards]
    bad = [s for s in shard_ids if not 0 <= s < spec.n_shards]
    if bad or not shard_ids:
        raise ValueError(f"shard indices {bad or shard_ids} outside [0, {spec.n_shards}) or none given")
    return shard_ids


class _RunLock:
    """An exclusive lock on ``out_dir/.lock`` for the duration of a run: a second run on the same directory (or a
    rerun while orphaned workers of a killed one still write) fails at once instead of recording twice. Worker
    processes inherit the lock, so it is held until the last of them exits."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise RuntimeError(f"{self.path.parent} is in use by another run (lock {self.path}); wait for it to "
                               "finish or use another output directory") from None
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()


def _die_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: ask Linux to kill this worker when its parent dies (``PR_SET_PDEATHSIG``), so a
    killed run leaves no workers writing records behind it; exit at once if the parent is already gone."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _pool_context():
    """fork (fast start: workers inherit the imported modules) unless CUDA is initialised or the platform lacks
    it; spawn otherwise (CUDA cannot be used in forked children)."""
    import multiprocessing as mp
    import torch

    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def run_ray(specs: Sequence[RunSpec], workers: int = 1) -> List[Dict[str, int]]:
    """Run shards as Ray tasks. Uses an existing Ray session or starts a local one with ``workers`` CPUs.
    Each task asks for one GPU when CUDA is available (and its spec's device is switched to cuda)."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("the ray backend needs Ray: pip install 'matkit[ray]'") from err
    import torch

    if not ray.is_initialized():
        ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
    use_gpu = torch.cuda.is_available()
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=2)(run_shard)
    if use_gpu:
        specs = [dataclasses.replace(s, device="cuda") for s in specs]
    return sorted(ray.get([task.remote(s) for s in specs]), key=lambda c: c["shard"])


# ---- merge ---------------------------------------------------------------------------------------------------------
class MergeError(ValueError):
    """The shard files do not hold every expected material exactly once."""


def merge_records(out_dir, expected_ids: Optional[Iterable[str]] = None, n_shards: Optional[int] = None,
                  allow_errors: bool = True) -> pd.DataFrame:
    """All records of a run as a DataFrame indexed by material id, after strict checks.

    expected_ids : ids the run must cover (default: all structures of the run's input). Raises
    :class:`MergeError` listing missing ids, ids recorded more than once, ids not expected, records in the
    wrong shard, and (``allow_errors=False``) error records.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / "run.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    n_shards = n_shards or manifest.get("n_shards")
    if not n_shards:
        raise MergeError(f"{out_dir}: no run.json and no n_shards given")
    if expected_ids is None:
        if "structures" not in manifest:
            raise MergeError(f"{out_dir}: cannot tell the expected ids (no run.json); pass expected_ids")
        from .io import read_structures

        expected_ids = [mid for mid, _ in read_structures(manifest["structures"], limit=manifest.get("limit"),
                                                          errors="keep")]
    expected = list(dict.fromkeys(str(i) for i in expected_ids))
    records, problems = [], []
    for shard in range(n_shards):
        path = shard_path(out_dir, shard, n_shards)
        for record in read_records(path):
            if shard_of(record["material_id"], n_shards) != shard:
                problems.append(f"{record['material_id']} recorded in shard {shard} but belongs to shard "
                                f"{shard_of(record['material_id'], n_shards)}")
            records.append(record)
    extra = sorted({p.name for p in out_dir.glob("shard-*.jsonl")} -
                   {shard_path(out_dir, s, n_shards).name for s in range(n_shards)})
    if extra:
        problems.append(f"shard files from a different shard count: {extra}")
    ids = pd.Series([r["material_id"] for r in records], dtype=object)
    counts = ids.value_counts()
    dupes = counts[counts > 1]
    if len(dupes):
        problems.append(f"{len(dupes)} ids recorded more than once: {_head(dupes.index)}")
    missing = sorted(set(expected) - set(ids))
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} expected ids have no record: {_head(missing)}")
    unknown = sorted(set(ids) - set(expected))
    if unknown:
        problems.append(f"{len(unknown)} recorded ids are not expected: {_head(unknown)}")
    errors = [r["material_id"] for r in records if r.get("status") != "ok"]
    if errors and not allow_errors:
        problems.append(f"{len(errors)} structures failed: {_head(errors)}")
    if problems:
        raise MergeError(f"cannot merge {out_dir}:\n  - " + "\n  - ".join(problems))
    return records_to_frame(records).loc[expected]


def _head(items, k: int = 10) -> str:
    items = list(items)
    return ", ".join(map(str, items[:k])) + (f", ... (+{len(items) - k})" if len(items) > k else "")


def recompute_formation_energies(records: pd.DataFrame, references=None, energy_scale: Optional[str] = None
                                 ) -> pd.Series:
    """Formation energies (eV/atom, NaN where undefined) of merged ``records`` recomputed from their energies and
    final structures, e.g. with references fitted after the run. ``energy_scale`` overrides the recorded one."""
    from .relax import atoms_from_dict

    values = {}
    for mid, row in records.iterrows():
        if row.get("status") != "ok" or not isinstance(row.get("structure"), dict):
            values[mid] = np.nan
            continue
        fields = formation_energy_fields(atoms_from_dict(row["structure"]), float(row["energy"]),
                                         energy_scale or row.get("energy_scale", "raw"), references=references)
        values[mid] = np.nan if fields["e_form_per_atom"] is None else fields["e_form_per_atom"]
    return pd.Series(values, name="e_form_per_atom", dtype=float).reindex(records.index)


def records_to_frame(records: Sequence[dict]) -> pd.DataFrame:
    """Records -> DataFrame indexed by material id (the final structure stays a dict column)."""
    df = pd.DataFrame.from_records(list(records))
    if df.empty:
        return df
    df = df.set_index("material_id")
    if "e_form_per_atom" in df:
        df["e_form_per_atom"] = pd.to_numeric(df["e_form_per_atom"], errors="coerce")
    return df
