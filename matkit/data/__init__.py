"""matkit datasets: a documented HDF5 frames schema (:mod:`matkit.data.schema`), streaming converters from extxyz,
ASE db, mlearn, MPtrj, DeePMD and MP-20 CSV (:mod:`matkit.data.converters`, CLI ``matkit data convert``), and
training-side loading (:class:`HDF5Dataset`, :class:`MaxAtomsBatchSampler`, :func:`random_split_indices`)."""
from .converters import FORMATS, BadItemError, SkippedFrameWarning, convert, iter_frames
from .dataset import HDF5Dataset, MaxAtomsBatchSampler, atom_batched_loader, collate_graphs, random_split_indices
from .hdf5 import FrameFile, HDF5FormatError, HDF5WriteError, HDF5Writer, content_hash, file_info, verify_file
from .schema import SCHEMA_VERSION, Frame, FrameValidationError

__all__ = ["Frame", "FrameValidationError", "SCHEMA_VERSION", "HDF5Writer", "FrameFile", "HDF5FormatError",
           "HDF5WriteError", "content_hash", "verify_file", "file_info", "FORMATS", "convert", "iter_frames",
           "BadItemError", "SkippedFrameWarning", "HDF5Dataset",
           "MaxAtomsBatchSampler", "random_split_indices", "atom_batched_loader", "collate_graphs"]
