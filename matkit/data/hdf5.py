"""Write and read matkit HDF5 frame files (schema in :mod:`matkit.data.schema`).

* :class:`HDF5Writer` creates or appends. New files are written to a work file next to the target and renamed
  at :meth:`HDF5Writer.close`, so an interrupted conversion leaves no half-written dataset. Appends copy the file
  to a work file first (``in_place=False``, the default) or write in place (``in_place=True``, for files
  too large to copy): rows are appended first and the committed counts updated last; on any error the datasets
  are shrunk back to the committed counts, so earlier frames are never lost.
  Work files are named ``<name>.<host>.<pid>.<random>.partial`` and removed on every failure path (errors,
  KeyboardInterrupt, a failed write such as a full disk). One left by a killed process is *stale*: its process no
  longer runs; :func:`stale_partials` lists them, ``matkit data info`` reports them and the next writer to the
  same target removes them (with a warning). A failed write raises :class:`HDF5WriteError`, one line naming the
  target and the cause; the target is then unchanged (not created, or byte-identical for an overwrite/append).
  The final file gets the mode ``open()`` would give it: ``0o666 & ~umask`` for a new file, the old file's mode
  when it replaces or extends one.
* :class:`FrameFile` reads frames by index without loading the file (it opens the file lazily and can be
  pickled unopened, e.g. into DataLoader workers).
* :func:`content_hash` / :func:`verify_file` compute and check the sha256 over the committed arrays.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
from typing import Iterable, Optional

import h5py
import numpy as np

from .schema import (LABELS, SCHEMA_NAME, SCHEMA_VERSION, STRESS_CONVENTION, STRING_KEYS, UNITS_JSON, Frame,
                     validate_frame)

__all__ = ["HDF5Writer", "FrameFile", "HDF5FormatError", "HDF5WriteError", "content_hash", "verify_file",
           "check_values", "file_info", "stale_partials"]

STR_DTYPE = h5py.string_dtype("utf-8")
FRAME_CHUNK = 4096  # rows per chunk of per-frame datasets
ATOM_CHUNK = 8192  # rows per chunk of per-atom datasets


class HDF5FormatError(ValueError):
    """The file is not a readable matkit HDF5 frames file (corrupt, truncated, wrong schema, missing keys)."""


class HDF5WriteError(OSError):
    """Writing a matkit HDF5 file failed (disk full, file-size limit, I/O error, no permission).

    ``str()`` is one line naming the target file, the cause and what became of the target; ``errno`` is the cause's
    errno (``EIO`` when unknown) and ``filename`` the target.
    """

    def __init__(self, path: str, cause: BaseException, outcome: str):
        code = getattr(cause, "errno", None)
        if not isinstance(code, int) or not code:
            match = re.search(r"errno = (\d+)", str(cause))  # h5py buries the errno in its message
            code = int(match.group(1)) if match else None
        reason = (f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code
                  else " ".join(str(cause).split())[:300] or type(cause).__name__)
        super().__init__(code or errno.EIO, f"{path}: cannot write: {reason}; {outcome}", path)

    def __str__(self) -> str:
        return self.strerror


#: exceptions h5py and the OS raise for a failed read or write (as opposed to bad data: ValueError, TypeError)
_IO_ERRORS = (OSError, RuntimeError)
PARTIAL_SUFFIX = ".partial"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def _partial_prefix(path: str) -> str:
    """``<name>.<host>.<pid>.``: a work file names its owner, so one left by a killed process can be recognised."""
    return f"{os.path.basename(path)}.{_host()}.{os.getpid()}."


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process (or an absurd pid): assume it runs
        return True
    return True


def stale_partials(path) -> list[str]:
    """Work files of ``path`` (``<name>.<host>.<pid>.<random>.partial``) whose writer, a process of this host, no
    longer runs (it was killed during a conversion). Work files of other hosts or unknown owners are not listed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path) + "."
    stale = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in sorted(names):
        if not (name.startswith(base) and name.endswith(PARTIAL_SUFFIX)):
            continue
        parts = name[len(base):-len(PARTIAL_SUFFIX)].split(".")
        if len(parts) == 3 and parts[0] == _host() and parts[1].isdigit() and not _process_running(int(parts[1])):
            stale.append(os.path.join(directory, name))
    return stale


def _new_file_mode(existing: Optional[str] = None) -> int:
    """Mode ``open(path, "w")`` would leave: the existing file's mode, else ``0o666 & ~umask`` (mkstemp uses 0600)."""
    if existing is not None and os.path.exists(existing):
        return stat.S_IMODE(os.stat(existing).st_mode)
    try:  # read the umask without changing it (Linux); os.umask() would change it for every thread for a moment
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _matkit_version() -> str:
    try:
        from matkit import __version__

        return __version__
    except Exception:  # pragma: no cover - partial installs
        return "unknown"


# --------------------------------------------------------------------------------------------------- writing
class HDF5Writer:
    """Stream frames into a matkit HDF5 file.

    >>> with HDF5Writer("out.h5", license="MIT", provenance={"input": "x.xyz"}) as writer:
    ...     for frame in frames:
    ...         writer.add(frame)

    mode: "w" (create/overwrite) or "a" (append; creates the file if absent).
    compression: "gzip" (default, level 4), "lzf" or None.
    flush_frames: frames buffered before a write (memory bound: one buffer of frames).
    check_units: reject implausible magnitudes (e.g. a stress in kBar), see :func:`validate_frame`.
    in_place: for mode "a", write into the existing file instead of a copy (rollback on error, but a killed process
        can leave an HDF5 file that needs repair); default False = copy, append, rename.
    """

    def __init__(self, path, mode: str = "w", compression: Optional[str] = "gzip", provenance: Optional[dict] = None,
                 license: Optional[str] = None, flush_frames: int = 256, check_units: bool = True,
                 in_place: bool = False):
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        if compression not in ("gzip", "lzf", None, "none"):
            raise ValueError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}")
        self.path = os.fspath(path)
        self.compression = None if compression == "none" else compression
        self.flush_frames = int(flush_frames)
        self.check_units = check_units
        self._buffer: list[Frame] = []
        self._closed = False
        self._failure: Optional[BaseException] = None  # set when a write failed: the writer can only be aborted
        self._file = None
        self._fd: Optional[int] = None  # HDF5's descriptor of the file written, and its identity (os.fstat)
        self._fd_stat = None
        self._datasets: dict = {}  # open dataset handles, kept open so chunk writes fail in flush(), not in GC
        self._existed = os.path.exists(self.path)
        appending = mode == "a" and self._existed
        self.in_place = in_place and appending
        if appending:
            FrameFile(self.path).check()  # refuse to append to a corrupt or foreign file
        self._work_path = self.path
        try:
            if not self.in_place:
                for stale in stale_partials(self.path):
                    try:
                        os.remove(stale)
                    except OSError:  # e.g. another user's: leave it, it does not collide with ours
                        continue
                    warnings.warn(f"{stale}: removed a stale work file left by a killed conversion", stacklevel=2)
                fd, self._work_path = tempfile.mkstemp(prefix=_partial_prefix(self.path), suffix=PARTIAL_SUFFIX,
                                                       dir=os.path.dirname(os.path.abspath(self.path)))
                try:
                    os.fchmod(fd, _new_file_mode(self.path if self._existed else None))
                finally:
                    os.close(fd)
                if appending:
                    shutil.copyfile(self.path, self._work_path)
            self._file = h5py.File(self._work_path, "r+" if appending else "w")
            self._fd = self._descriptor()
            if not appending:
                self._create_layout()
            self.n_frames = int(self._file.attrs["n_frames"])
            self.n_atoms_total = int(self._file.attrs["n_atoms_total"])
            self.first_new_frame = self.n_frames
            self._set_metadata(provenance, license)
        except BaseException as err:
            self._closed = True
            if self._file is not None:
                self._close_file(rollback=False)
            self._remove_work_file()
            if isinstance(err, _IO_ERRORS) and not isinstance(err, HDF5FormatError):
                raise HDF5WriteError(self.path, err, self._unchanged()) from err
            raise

    # -- layout
    def _dataset_options(self, shape_tail: tuple, chunk_rows: int) -> dict:
        options = dict(maxshape=(None,) + shape_tail, chunks=(chunk_rows,) + shape_tail)
        if self.compression == "gzip":
            options.update(compression="gzip", compression_opts=4, shuffle=True)
        elif self.compression == "lzf":
            options.update(compression="lzf", shuffle=True)
        return options

    def _create(self, name: str, shape_tail: tuple, dtype, per_atom: bool, fill=None):
        rows = self.n_atoms_total if per_atom and hasattr(self, "n_atoms_total") else 0
        if not per_atom and hasattr(self, "n_frames"):
            rows = self.n_frames
        options = self._dataset_options(shape_tail, ATOM_CHUNK if per_atom else FRAME_CHUNK)
        if dtype is STR_DTYPE:
            options.pop("compression", None), options.pop("compression_opts", None), options.pop("shuffle", None)
        dataset = self._file.create_dataset(name, shape=(rows,) + shape_tail, dtype=dtype, **options)
        if rows and fill is not None:
            dataset[:rows] = fill
        self._datasets[name] = dataset
        return dataset

    def _create_layout(self) -> None:
        attrs = self._file.attrs
        attrs["schema"] = SCHEMA_NAME
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["units"] = UNITS_JSON
        attrs["stress_convention"] = STRESS_CONVENTION
        attrs["n_frames"] = 0
        attrs["n_atoms_total"] = 0
        attrs["provenance"] = "[]"
        attrs["license"] = ""
        attrs["content_sha256"] = ""
        self._create("atoms/positions", (3,), np.float64, True)
        self._create("atoms/atomic_numbers", (), np.int32, True)
        self._create("atoms/forces", (3,), np.float64, True)
        self._file.create_group("atoms/properties")
        self._create("frames/offsets", (), np.int64, False)
        self._create("frames/n_atoms", (), np.int64, False)
        self._create("frames/cell", (3, 3), np.float64, False)
        self._create("frames/pbc", (3,), bool, False)
        self._create("frames/energy", (), np.float64, False)
        self._create("frames/stress", (6,), np.float64, False)
        for label in LABELS:
            self._create(f"frames/has_{label}", (), bool, False)
        for key in STRING_KEYS:
            self._create(f"frames/{key}", (), STR_DTYPE, False)
        self._file.create_group("frames/properties")

    def _set_metadata(self, provenance: Optional[dict], license: Optional[str]) -> None:
        attrs = self._file.attrs
        if attrs["schema_version"] != SCHEMA_VERSION or attrs["units"] != UNITS_JSON:
            raise HDF5FormatError(f"{self.path}: schema version {attrs['schema_version']} / units {attrs['units']} "
                                  f"differ from this matkit's (version {SCHEMA_VERSION}, {UNITS_JSON}); cannot append")
        self._provenance_entry = dict(provenance or {})
        self._provenance_entry.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"))
        self._provenance_entry["matkit_version"] = _matkit_version()
        if license:
            old = str(attrs["license"])
            attrs["license"] = license if not old or old == license else f"{old}; {license}"
        attrs["created_with"] = f"matkit {_matkit_version()}"

    # -- adding frames
    def add(self, frame: Frame, where: Optional[str] = None) -> None:
        """Validate ``frame`` and buffer it; writes every ``flush_frames``.

        Validation errors name the frame's index in the file, or ``where`` (e.g. ``"data.json: frame 7"``: its place
        in the source) when given, and its id.
        """
        if self._closed or self._failure is not None:
            raise RuntimeError(f"{self.path}: writer is closed" + (" after a failed write" if self._failure else ""))
        index = self.n_frames + len(self._buffer)
        self._buffer.append(validate_frame(frame, index if where is None else where, check_units=self.check_units))
        if len(self._buffer) >= self.flush_frames:
            self.flush()

    def add_many(self, frames: Iterable[Frame]) -> None:
        for frame in frames:
            self.add(frame)

    def flush(self) -> None:
        """Append the buffered frames, then commit the counts; on error shrink back to the committed counts.

        A failed write (disk full, file-size limit: OSError/RuntimeError from HDF5) raises :class:`HDF5WriteError`;
        the writer is then finished: a work file is closed with its writes discarded (see :meth:`_discard_writes`),
        an in-place append is rolled back. Other errors (e.g. a per-atom property whose shape differs from the
        file's) roll back this chunk and leave the writer usable.
        """
        if self._failure is not None:
            raise RuntimeError(f"{self.path}: writer is closed after a failed write")
        if not self._buffer:
            return
        frames, self._buffer = self._buffer, []
        n_new_atoms = sum(f.n_atoms for f in frames)
        try:
            self._append(frames)
            self._file.attrs["n_atoms_total"] = self.n_atoms_total + n_new_atoms  # commit point: counts last
            self._file.attrs["n_frames"] = self.n_frames + len(frames)
            self._file.flush()
        except BaseException as err:
            failure = self._after_failed_write(err)
            if failure is None:
                raise
            raise failure from err
        self.n_atoms_total += n_new_atoms
        self.n_frames += len(frames)

    def _after_failed_write(self, err: BaseException) -> Optional[HDF5WriteError]:
        """Recover from an exception raised while writing: roll back, or give up on the file after an I/O failure.

        Returns the :class:`HDF5WriteError` to raise for an I/O failure, None to re-raise ``err`` unchanged.
        """
        if not isinstance(err, _IO_ERRORS):
            try:
                self._rollback()
                return None
            except _IO_ERRORS as rollback_err:  # the data error came with a failing disk
                err = rollback_err
        if not self.in_place:  # the work file is thrown away: stop writing to it at once
            self._failure = HDF5WriteError(self.path, err, self._unchanged())
            self._close_file(rollback=False)
            return self._failure
        try:
            self._rollback()
            outcome = "the frames of this append were rolled back, the file is otherwise unchanged"
        except _IO_ERRORS:
            outcome = "rolling back the in-place append failed too: check the file with 'matkit data info --verify'"
        self._failure = HDF5WriteError(self.path, err, outcome)
        self._close_file(rollback=False)
        return self._failure

    def _unchanged(self) -> str:
        return "the existing file is unchanged" if self._existed else "no file was created"

    def _grow(self, name: str, rows: np.ndarray, start: int) -> None:
        dataset = self._datasets.get(name)
        if dataset is None:
            dataset = self._datasets[name] = self._file[name]
        dataset.resize(start + len(rows), axis=0)
        dataset[start:start + len(rows)] = rows

    def _append(self, frames: list[Frame]) -> None:
        f0, a0 = self.n_frames, self.n_atoms_total
        n_atoms = np.array([f.n_atoms for f in frames], dtype=np.int64)
        offsets = a0 + np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)
        nan3 = lambda n: np.full((n, 3), np.nan)  # noqa: E731
        self._grow("atoms/positions", np.concatenate([f.positions for f in frames]), a0)
        self._grow("atoms/atomic_numbers", np.concatenate([f.atomic_numbers for f in frames]), a0)
        self._grow("atoms/forces", np.concatenate([f.forces if f.forces is not None else nan3(f.n_atoms)
                                                   for f in frames]), a0)
        self._grow("frames/offsets", offsets, f0)
        self._grow("frames/n_atoms", n_atoms, f0)
        self._grow("frames/cell", np.stack([f.cell for f in frames]), f0)
        self._grow("frames/pbc", np.stack([f.pbc for f in frames]), f0)
        self._grow("frames/energy", np.array([np.nan if f.energy is None else f.energy for f in frames]), f0)
        self._grow("frames/stress", np.stack([np.full(6, np.nan) if f.stress is None else f.stress
                                              for f in frames]), f0)
        for label in LABELS:
            self._grow(f"frames/has_{label}", np.array([getattr(f, label) is not None for f in frames]), f0)
        for key, attr in zip(STRING_KEYS, ("id", "group", "source")):
            self._grow(f"frames/{key}", np.array([getattr(f, attr) for f in frames], dtype=object), f0)
        self._append_properties(frames, f0, a0)

    def _append_properties(self, frames: list[Frame], f0: int, a0: int) -> None:
        names = sorted(set().union(*(f.properties for f in frames)) | set(self._file["frames/properties"]))
        for name in names:
            path = f"frames/properties/{name}"
            if path not in self._file:
                self._create(path, (), np.float64, False, fill=np.nan)
            self._grow(path, np.array([f.properties.get(name, np.nan) for f in frames]), f0)
        atom_names = sorted(set().union(*(f.atom_properties for f in frames)) | set(self._file["atoms/properties"]))
        for name in atom_names:
            path = f"atoms/properties/{name}"
            tail = next((f.atom_properties[name].shape[1:] for f in frames if name in f.atom_properties), None)
            if path not in self._file:
                self._create(path, tail, np.float64, True, fill=np.nan)
            tail = self._file[path].shape[1:]
            rows = []
            for f in frames:
                value = f.atom_properties.get(name)
                if value is not None and value.shape[1:] != tail:
                    raise ValueError(f"frame {f.id or '?'}: atom_properties[{name!r}] has per-atom shape "
                                     f"{value.shape[1:]}, the file has {tail}")
                rows.append(value if value is not None else np.full((f.n_atoms,) + tail, np.nan))
            self._grow(path, np.concatenate(rows), a0)

    def _rollback(self) -> None:
        """Shrink every dataset and the counts back to the committed sizes (drops a partially written append)."""
        def shrink(name, obj):
            if isinstance(obj, h5py.Dataset):
                rows = self.n_atoms_total if name.startswith("atoms/") else self.n_frames
                if obj.shape[0] != rows:
                    obj.resize(rows, axis=0)

        self._file.visititems(shrink)
        self._file.attrs["n_atoms_total"] = self.n_atoms_total
        self._file.attrs["n_frames"] = self.n_frames
        self._file.flush()

    def _discard_writes(self) -> None:
        """Send HDF5's further writes to this file to /dev/null.

        After a failed write (disk full, file-size limit) HDF5 cannot close the file: every flush fails again, the
        close leaves the library in a broken state and the process dies with a segmentation fault at exit. For a
        file that is thrown away anyway (or already damaged), pointing its descriptor at /dev/null lets HDF5 close
        it cleanly; the data written so far is untouched on disk.
        """
        try:  # only while the descriptor is still the file's (not closed, its number not reused, not yet discarded)
            if self._fd is None or not os.path.samestat(os.fstat(self._fd), self._fd_stat):
                return
        except OSError:
            return
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, self._fd)
        finally:
            os.close(null)

    def _descriptor(self) -> Optional[int]:
        """The OS file descriptor HDF5 writes through, asked while the file is healthy (HDF5 may crash when asked
        after a failed write); None unless it is verifiably the work file's."""
        try:
            fd = int(self._file.id.get_vfd_handle())
            self._fd_stat = os.fstat(fd)
            if os.path.samestat(self._fd_stat, os.stat(self._work_path)):
                return fd
        except Exception:  # pragma: no cover - drivers without a single descriptor
            pass
        return None

    def _close_file(self, rollback: bool) -> None:
        """Close the HDF5 file without raising (optionally rolling back first); on failure discard writes, retry."""
        self._buffer = []
        if self._file is None or not self._file.id.valid:
            return
        if rollback:
            try:
                self._rollback()
            except Exception:
                pass
        try:
            if self._failure is not None and self._work_path != self.path:
                self._discard_writes()  # the work file is lost: nothing more needs to reach the disk
            self._file.close()
        except Exception:
            if self._file.id.valid:
                self._discard_writes()
                try:
                    self._file.close()
                except Exception:  # pragma: no cover - nothing more can be done; the caller reports the error
                    pass
        self._datasets = {}

    def _remove_work_file(self) -> None:
        if self._work_path != self.path:
            try:
                os.remove(self._work_path)
            except FileNotFoundError:
                pass

    # -- finishing
    def close(self) -> None:
        """Write the remaining frames, record provenance and the content hash, and move the file into place.

        On any error (including KeyboardInterrupt) the writer is aborted (work file removed, in-place append rolled
        back) and the error re-raised; a failed write raises :class:`HDF5WriteError`.
        """
        if self._closed:
            return
        if self._failure is not None:
            self.abort()
            raise self._failure
        try:
            self.flush()
            entry = dict(self._provenance_entry, frames=[self.first_new_frame, self.n_frames])
            provenance = json.loads(self._file.attrs["provenance"])
            provenance.append(entry)
            self._file.attrs["provenance"] = json.dumps(provenance, default=str)
            self._file.attrs["content_sha256"] = content_hash(self._file)
            self._file.close()
            self._datasets = {}
            if self._work_path != self.path:
                os.replace(self._work_path, self.path)
        except BaseException as err:
            if isinstance(err, _IO_ERRORS) and not isinstance(err, HDF5WriteError):
                self._failure = HDF5WriteError(
                    self.path, err, self._unchanged() if not self.in_place else
                    "the in-place append was rolled back if possible: check the file with 'matkit data info --verify'")
            self.abort()
            if self._failure is not None and self._failure is not err:
                raise self._failure from err
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop the frames of this writer: delete the work file, or roll back an in-place append. Never raises."""
        if self._closed:
            return
        self._closed = True
        self._close_file(rollback=self.in_place)
        self._remove_work_file()

    def __enter__(self) -> "HDF5Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------------- hashing
def _hash_dataset(hasher, name: str, dataset: h5py.Dataset, rows: int, block: int = 65536) -> None:
    hasher.update(f"{name}|{dataset.dtype.str if dataset.dtype.kind != 'O' else 'utf8'}|"
                  f"{(rows,) + dataset.shape[1:]}\n".encode())
    for start in range(0, rows, block):
        values = dataset[start:min(rows, start + block)]
        if dataset.dtype.kind == "O":
            hasher.update(b"".join((v.decode() if isinstance(v, bytes) else v).encode() + b"\0" for v in values))
        else:
            hasher.update(np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"))).tobytes())


def content_hash(h5: h5py.File) -> str:
    """sha256 (hex) over every dataset's committed rows, in sorted name order, little-endian C order.

    Each dataset contributes ``"name|dtype|shape\\n"`` then its raw bytes (strings: UTF-8, NUL-terminated).
    """
    n_frames, n_atoms = int(h5.attrs["n_frames"]), int(h5.attrs["n_atoms_total"])
    names = []
    h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    hasher = hashlib.sha256()
    for name in sorted(names):
        _hash_dataset(hasher, name, h5[name], n_atoms if name.startswith("atoms/") else n_frames)
    return hasher.hexdigest()


def verify_file(path) -> str:
    """Check a file completely; return its content hash or raise :class:`HDF5FormatError` for the first problem.

    Checks, in order: the structure (schema, keys, row counts, per-row shapes; :meth:`FrameFile.check`), the values
    frame by frame (:func:`check_values`: finite positions, cells and present labels, missing labels NaN, atomic
    numbers 1..118), then the stored content hash. A file whose hash matches can still be wrong (written by a
    faulty tool, or tampered with and re-hashed), hence the value checks. The message is one line naming the file,
    the dataset and the frame (index and id).
    """
    frames = FrameFile(path)
    try:
        frames.check()
        offsets, n_atoms = frames.index
    finally:
        frames.close()
    with frames._open_raw() as h5:
        check_values(h5, offsets, n_atoms, frames.path)
        stored = str(h5.attrs["content_sha256"])
        actual = content_hash(h5)
    if stored != actual:
        raise HDF5FormatError(f"{path}: content hash mismatch (stored {stored[:16]}..., computed {actual[:16]}...): "
                              "the arrays changed after the file was written, or the file is damaged")
    return actual


def check_values(h5: h5py.File, offsets: np.ndarray, n_atoms: np.ndarray, path: str,
                 atoms_per_block: int = 1 << 20) -> None:
    """Raise :class:`HDF5FormatError` for the first frame whose values break the schema.

    Per atom: positions finite, atomic_numbers in 1..118, forces finite where ``has_forces`` and NaN where not,
    extra per-atom properties not infinite (NaN = missing). Per frame: cell finite, energy and stress finite where
    ``has_energy`` / ``has_stress`` and NaN where not, extra properties not infinite. Reads blocks of about
    ``atoms_per_block`` atoms, so memory stays bounded for any file size.
    """
    n = len(n_atoms)
    frame_props = sorted(h5["frames/properties"]) if "frames/properties" in h5 else []
    atom_props = sorted(h5["atoms/properties"]) if "atoms/properties" in h5 else []
    f0 = 0
    while f0 < n:
        a0 = int(offsets[f0])
        f1 = max(f0 + 1, min(n, int(np.searchsorted(offsets, a0 + atoms_per_block, side="right")) - 1, f0 + 65536))
        a1 = int(offsets[f1 - 1] + n_atoms[f1 - 1])
        frame_of_atom = np.repeat(np.arange(f0, f1), n_atoms[f0:f1])
        problems = []  # (frame, order, key, what)

        def report(key: str, bad: np.ndarray, what: str, per_atom: bool) -> None:
            bad = bad.reshape(len(bad), -1).any(axis=1) if bad.ndim > 1 else bad
            if bad.any():
                first = int(np.argmax(bad))
                problems.append((int(frame_of_atom[first]) if per_atom else f0 + first, len(problems), key, what))

        def frame_rows(key):
            return h5[key][f0:f1]

        def atom_rows(key):
            return h5[key][a0:a1]

        has = {label: frame_rows(f"frames/has_{label}").astype(bool) for label in LABELS}
        report("atoms/positions", ~np.isfinite(atom_rows("atoms/positions")), "is NaN or inf", True)
        numbers = atom_rows("atoms/atomic_numbers")
        report("atoms/atomic_numbers", (numbers < 1) | (numbers > 118), "is outside 1..118", True)
        report("frames/cell", ~np.isfinite(frame_rows("frames/cell")), "is NaN or inf", False)
        for label, key, per_atom in (("energy", "frames/energy", False), ("forces", "atoms/forces", True),
                                     ("stress", "frames/stress", False)):
            values = atom_rows(key) if per_atom else frame_rows(key)
            present = np.repeat(has[label], n_atoms[f0:f1]) if per_atom else has[label]
            values = values.reshape(len(values), -1)
            report(key, present & ~np.isfinite(values).all(axis=1), f"is NaN or inf but has_{label} is True",
                   per_atom)
            report(key, ~present & ~np.isnan(values).all(axis=1),
                   f"holds a value but has_{label} is False (a missing label must be NaN)", per_atom)
        for name in frame_props:
            report(f"frames/properties/{name}", np.isinf(frame_rows(f"frames/properties/{name}")), "is inf", False)
        for name in atom_props:
            report(f"atoms/properties/{name}", np.isinf(atom_rows(f"atoms/properties/{name}")), "is inf", True)
        if problems:
            frame, _, key, what = min(problems)
            frame_id = h5["frames/ids"].asstr()[frame]
            raise HDF5FormatError(f"{path}: frame {frame}" + (f" (id {frame_id!r})" if frame_id else "")
                                  + f": {key!r} {what}")
        f0 = f1


# --------------------------------------------------------------------------------------------------- reading
_REQUIRED = ("atoms/positions", "atoms/atomic_numbers", "atoms/forces", "frames/offsets", "frames/n_atoms",
             "frames/cell", "frames/pbc", "frames/energy", "frames/stress", "frames/has_energy",
             "frames/has_forces", "frames/has_stress")
#: shape of one row of a dataset; the per-frame datasets not listed (offsets, n_atoms, energy, has_*, ids, groups,
#: sources, properties/*) have scalar rows, atoms/properties/* may have any row shape
_ROW_SHAPES = {"atoms/positions": (3,), "atoms/atomic_numbers": (), "atoms/forces": (3,), "frames/cell": (3, 3),
               "frames/pbc": (3,), "frames/stress": (6,)}


def _first_frame_without(h5: h5py.File, n_frames: int, rows: int, per_atom: bool) -> str:
    """``frame f (id '...')`` for the first frame not covered by the first ``rows`` rows of a dataset, best effort
    (the frame table itself may be damaged)."""
    frame = min(rows, n_frames)
    try:
        if per_atom:
            ends = h5["frames/offsets"][:n_frames] + h5["frames/n_atoms"][:n_frames]
            frame = int(np.argmax(ends > rows)) if (ends > rows).any() else n_frames
        frame_id = h5["frames/ids"].asstr()[frame] if frame < n_frames else ""
    except Exception:  # noqa: BLE001 - only for the message
        frame_id = ""
    return f"frame {frame}" + (f" (id {frame_id!r})" if frame_id else "")


class FrameFile:
    """Random access to the frames of a matkit HDF5 file.

    The file is opened lazily on first access and re-opened in a new process (the handle is never pickled), so a
    FrameFile can be sent to DataLoader workers. ``offsets`` and ``n_atoms`` are loaded once (8 bytes x 2 per frame);
    everything else is read per frame.
    """

    def __init__(self, path, cache_bytes: int = 4 * 2**20, frame_table_bytes: int = 64 * 2**20):
        self.path = os.fspath(path)
        self.cache_bytes = cache_bytes
        self.frame_table_bytes = frame_table_bytes
        self._h5 = None
        self._pid = None
        self._index = None
        self._datasets: dict = {}
        self._tables: dict = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_h5=None, _pid=None, _datasets={}, _tables={})
        return state

    def _open_raw(self) -> h5py.File:
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            return h5py.File(self.path, "r", rdcc_nbytes=self.cache_bytes)
        except OSError as err:
            raise HDF5FormatError(f"{self.path}: not a readable HDF5 file (corrupt or truncated): {err}") from None

    @property
    def h5(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = self._open_raw()
            self._pid = os.getpid()
            self._load_index()
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._datasets, self._tables = {}, {}

    def _dataset(self, name: str) -> h5py.Dataset:
        dataset = self._datasets.get(name)
        if dataset is None:
            dataset = self._datasets[name] = self.h5[name]
        return dataset

    def _frame_value(self, name: str, i: int):
        """Row ``i`` of a per-frame dataset, from the in-memory table when the file's tables are preloaded."""
        table = self._tables.get(name)
        return table[i] if table is not None else self._dataset(name)[i]

    def _load_index(self) -> None:
        h5 = self._h5
        self.check_structure(h5)
        n = int(h5.attrs["n_frames"])
        try:
            offsets = h5["frames/offsets"][:n]
            n_atoms = h5["frames/n_atoms"][:n]
        except (OSError, RuntimeError) as err:
            raise HDF5FormatError(f"{self.path}: cannot read frames/offsets or frames/n_atoms "
                                  f"(corrupt or truncated): {err}") from None
        self._index = (offsets, n_atoms)
        self.property_names = sorted(h5["frames/properties"]) if "frames/properties" in h5 else []
        self.atom_property_names = sorted(h5["atoms/properties"]) if "atoms/properties" in h5 else []
        self._datasets, self._tables = {}, {}
        numeric = [f"frames/{k}" for k in ("cell", "pbc", "energy", "stress", "has_energy", "has_forces",
                                             "has_stress")] + [f"frames/properties/{k}" for k in self.property_names]
        if sum(h5[k].dtype.itemsize * int(np.prod(h5[k].shape[1:])) for k in numeric) * n <= self.frame_table_bytes:
            self._tables = {k: h5[k][:n] for k in numeric}  # small per-frame tables: one read at open

    def check_structure(self, h5: h5py.File) -> None:
        """Raise :class:`HDF5FormatError` naming the problem: schema, missing key, short dataset, bad offsets."""
        attrs = h5.attrs
        if attrs.get("schema") != SCHEMA_NAME:
            raise HDF5FormatError(f"{self.path}: not a matkit frames file (attribute schema={attrs.get('schema')!r})")
        if int(attrs.get("schema_version", -1)) > SCHEMA_VERSION:
            raise HDF5FormatError(f"{self.path}: schema version {attrs['schema_version']} is newer than this "
                                  f"matkit reads ({SCHEMA_VERSION})")
        for key in ("n_frames", "n_atoms_total"):
            if key not in attrs:
                raise HDF5FormatError(f"{self.path}: missing file attribute {key!r}")
        n_frames, n_atoms = int(attrs["n_frames"]), int(attrs["n_atoms_total"])
        for key in _REQUIRED + tuple(f"frames/{k}" for k in STRING_KEYS):
            if key not in h5:
                raise HDF5FormatError(f"{self.path}: missing dataset {key!r}")
        extra = [f"{group}/{name}" for group in ("frames/properties", "atoms/properties") if group in h5
                 for name in h5[group]]
        for key in _REQUIRED + tuple(f"frames/{k}" for k in STRING_KEYS) + tuple(extra):
            dataset = h5[key]
            if not isinstance(dataset, h5py.Dataset):
                raise HDF5FormatError(f"{self.path}: {key!r} is not a dataset")
            per_atom = key.startswith("atoms/")
            rows = n_atoms if per_atom else n_frames
            have = dataset.shape[0] if dataset.ndim else 0
            if have < rows:
                first = _first_frame_without(h5, n_frames, have, per_atom)
                raise HDF5FormatError(f"{self.path}: dataset {key!r} has {have} rows, the file header says {rows}: "
                                      f"the rows of every frame from {first} on are missing")
            tail = _ROW_SHAPES.get(key, None if per_atom else ())
            if tail is not None and dataset.shape[1:] != tail:
                raise HDF5FormatError(f"{self.path}: dataset {key!r} has shape {dataset.shape}, expected "
                                      f"{(dataset.shape[0],) + tail} (a row of shape {tail} per "
                                      f"{'atom' if per_atom else 'frame'}): wrong for every frame from "
                                      f"{_first_frame_without(h5, n_frames, 0, per_atom)} on")

    def check(self) -> None:
        """Full structural check, including offsets/n_atoms consistency (reads the index)."""
        offsets, n_atoms = self.index
        if len(n_atoms) and (n_atoms.min() < 1 or offsets[0] != 0 or np.any(offsets[1:] != np.cumsum(n_atoms)[:-1])
                             or offsets[-1] + n_atoms[-1] != int(self.h5.attrs["n_atoms_total"])):
            bad = np.flatnonzero(offsets != np.concatenate([[0], np.cumsum(n_atoms)[:-1]]))
            where = f"frame {bad[0]}" if len(bad) else "last frame"
            raise HDF5FormatError(f"{self.path}: frames/offsets and frames/n_atoms are inconsistent at {where}")

    @property
    def index(self) -> tuple[np.ndarray, np.ndarray]:
        self.h5  # noqa: B018 - opens and loads the index
        return self._index

    @property
    def n_atoms(self) -> np.ndarray:
        """(F,) int64 atom count of every frame."""
        return self.index[1]

    def __len__(self) -> int:
        return len(self.index[1])

    def read_arrays(self, i: int, properties: Optional[Iterable[str]] = None,
                    atom_properties: Optional[Iterable[str]] = None) -> dict:
        """Raw arrays of frame ``i`` (float64; missing labels are NaN with ``has_*`` False)."""
        n_frames = len(self)
        if not -n_frames <= i < n_frames:
            raise IndexError(f"frame index {i} out of range for {n_frames} frames in {self.path}")
        i = int(i) % n_frames
        offsets, n_atoms = self.index
        a, b = int(offsets[i]), int(offsets[i] + n_atoms[i])
        atoms, frame = self._dataset, self._frame_value
        try:
            out = {
                "positions": atoms("atoms/positions")[a:b],
                "atomic_numbers": atoms("atoms/atomic_numbers")[a:b],
                "forces": atoms("atoms/forces")[a:b],
                "cell": frame("frames/cell", i),
                "pbc": frame("frames/pbc", i),
                "energy": frame("frames/energy", i),
                "stress": frame("frames/stress", i),
                "has_energy": bool(frame("frames/has_energy", i)),
                "has_forces": bool(frame("frames/has_forces", i)),
                "has_stress": bool(frame("frames/has_stress", i)),
            }
            for name in self.property_names if properties is None else properties:
                out[name] = frame(f"frames/properties/{name}", i)
            for name in self.atom_property_names if atom_properties is None else atom_properties:
                out[name] = atoms(f"atoms/properties/{name}")[a:b]
        except KeyError as err:
            raise KeyError(f"{self.path}: frame {i}: missing key {err}") from None
        except (OSError, RuntimeError) as err:
            raise HDF5FormatError(f"{self.path}: frame {i}: cannot read data (corrupt or truncated): {err}") from None
        return out

    def read_strings(self, i: int) -> dict:
        self.h5  # noqa: B018 - (re)opens in a new process before the cached handles are used
        return {key: self._dataset(f"frames/{key}").asstr()[i] for key in STRING_KEYS}

    def __getitem__(self, i: int) -> Frame:
        arrays = self.read_arrays(i)
        strings = self.read_strings(i)
        return Frame(
            positions=arrays["positions"], atomic_numbers=arrays["atomic_numbers"], cell=arrays["cell"],
            pbc=arrays["pbc"], energy=float(arrays["energy"]) if arrays["has_energy"] else None,
            forces=arrays["forces"] if arrays["has_forces"] else None,
            stress=arrays["stress"] if arrays["has_stress"] else None,
            id=strings["ids"], group=strings["groups"], source=strings["sources"],
            properties={k: float(arrays[k]) for k in self.property_names if np.isfinite(arrays[k])},
            atom_properties={k: arrays[k] for k in self.atom_property_names if np.isfinite(arrays[k]).all()},
        )

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def file_info(path) -> dict:
    """Summary of a file: counts, label coverage, elements, energy range, attributes."""
    frames = FrameFile(path)
    frames.check()
    h5 = frames.h5
    n, n_atoms_total = len(frames), int(h5.attrs["n_atoms_total"])
    numbers = h5["atoms/atomic_numbers"][:n_atoms_total] if n_atoms_total else np.zeros(0, int)
    energy = h5["frames/energy"][:n]
    has_energy = h5["frames/has_energy"][:n]
    per_atom = energy[has_energy] / frames.n_atoms[has_energy] if has_energy.any() else np.zeros(0)
    groups = h5["frames/groups"].asstr()[:n]
    from ase.data import chemical_symbols

    info = {
        "path": frames.path,
        "size_bytes": os.path.getsize(frames.path),
        "schema_version": int(h5.attrs["schema_version"]),
        "n_frames": n,
        "n_atoms_total": n_atoms_total,
        "atoms_per_frame": [int(frames.n_atoms.min()), int(frames.n_atoms.max())] if n else [],
        "elements": [chemical_symbols[z] for z in np.unique(numbers)],
        "frames_with": {label: int(h5[f"frames/has_{label}"][:n].sum()) for label in LABELS},
        "periodic_frames": int(h5["frames/pbc"][:n].any(axis=1).sum()),
        "energy_per_atom_eV": [float(per_atom.min()), float(per_atom.max())] if len(per_atom) else [],
        "properties": {name: int(np.isfinite(h5[f"frames/properties/{name}"][:n]).sum())
                       for name in frames.property_names},
        "atom_properties": frames.atom_property_names,
        "groups": {g: int(c) for g, c in zip(*np.unique(groups, return_counts=True))} if n else {},
        "license": str(h5.attrs["license"]),
        "content_sha256": str(h5.attrs["content_sha256"]),
        "provenance": json.loads(h5.attrs["provenance"]),
    }
    frames.close()
    return info
