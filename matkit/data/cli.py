"""``matkit data convert`` and ``matkit data info``.

    matkit data convert INPUT [INPUT ...] OUTPUT.h5 --format extxyz|asedb|mlearn|mptrj|deepmd|mp20csv [options]
    matkit data info FILE.h5 [--verify] [--json]

Errors are one line, ``matkit data <command>: error: <message naming the file, key, row or frame/id>``, exit status
2 (a usage error too); Ctrl-C prints one line and exits with 130 (the output is left as it was). ``--debug`` shows
the Python traceback instead. When the top-level parser has its own ``--debug`` option, :func:`matkit.cli.main`
reports errors itself (one line, ``--debug`` anywhere on the command line) and errors are left to it; otherwise
these commands do it. Bad rows/frames of a conversion are
skipped and reported one line each (``--strict`` stops at the first instead); warnings are one line each.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .converters import FORMATS, MP20_LABELS, MPTRJ_ENERGY_KEYS


class _OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole, many-line usage first), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def register(subparsers) -> None:
    """Add the ``data`` command (with ``convert`` and ``info``) to an argparse sub-parser collection."""
    data = subparsers.add_parser("data", help="convert datasets to matkit HDF5 and inspect them")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=_OneLineErrorParser)
    data.set_defaults(func=lambda args: (data.print_help(), 1)[1])

    p = commands.add_parser("convert", help="convert INPUT(s) to a matkit HDF5 file (streaming)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="INPUT [INPUT ...] OUTPUT.h5")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--append", action="store_true", help="append to OUTPUT.h5 instead of overwriting it")
    p.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"])
    p.add_argument("--flush-frames", type=int, default=256, help="frames buffered per write")
    p.add_argument("--every", type=int, default=1, help="keep every k-th frame (subsampling)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--license", default=None, help="license of the source data (stored in the file)")
    p.add_argument("--note", default=None, help="free-text provenance note")
    p.add_argument("--no-check-units", action="store_true", help="accept implausible magnitudes")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad row/frame (default: skip it, report it, convert the rest)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", dest="data_debug", help="show Python tracebacks of errors")
    g = p.add_argument_group("extxyz")
    g.add_argument("--energy-key", default="REF_energy")
    g.add_argument("--forces-key", default="REF_forces")
    g.add_argument("--stress-key", default="REF_stress", help="eV/Å^3, ASE sign")
    g.add_argument("--virials-key", default="REF_virials", help="eV, virial = -stress * volume")
    g = p.add_argument_group("extxyz / asedb")
    g.add_argument("--id-key", default=None, help="info / key_value_pairs / data key used as the frame id")
    g.add_argument("--group-key", default=None, help="key used as the frame group (extxyz default: config_type)")
    g = p.add_argument_group("mptrj")
    g.add_argument("--mptrj-energy", default="corrected_total_energy", choices=MPTRJ_ENERGY_KEYS)
    g = p.add_argument_group("deepmd")
    g.add_argument("--type-map", default=None, help="comma-separated symbols when type_map.raw is absent")
    g = p.add_argument_group("mp20csv")
    g.add_argument("--label-columns", default=",".join(MP20_LABELS), help="comma-separated columns kept as labels")
    g.add_argument("--structure-column", default="cif")
    g.add_argument("--id-column", default="material_id")
    g.add_argument("--formula-column", default="pretty_formula",
                   help="reduced formula the parsed CIF must match, if the CSV has it ('' = no check)")
    g.add_argument("--elements-column", default="elements",
                   help="element list the parsed CIF must match, if the CSV has it ('' = no check)")
    p.set_defaults(func=_guarded("convert", run_convert))

    p = commands.add_parser("info", help="summarise a matkit HDF5 file")
    p.add_argument("file")
    p.add_argument("--verify", action="store_true",
                   help="check every frame's shapes and values against the schema, and the content hash")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--debug", action="store_true", dest="data_debug", help="show Python tracebacks of errors")
    p.set_defaults(func=_guarded("info", run_info))


def one_line(err: BaseException) -> str:
    """``err`` as one line: its message with whitespace collapsed (KeyError without quotes), the exception type
    for anything that is not an ordinary input/output error."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split()) or type(err).__name__
    if not isinstance(err, (ValueError, LookupError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return text


def _guarded(command: str, run):
    """Wrap a sub-command: one-line warnings; errors one line and status 2 unless --debug; Ctrl-C one line, 130."""
    prefix = f"matkit data {command}"

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    def guarded(args) -> int:
        # a top-level --debug option (dest "debug") means the top-level command reports errors itself (one line, or
        # the traceback with --debug): then errors are left to it; this command's own option is dest "data_debug"
        main_reports_errors = hasattr(args, "debug")
        debug = getattr(args, "data_debug", False)
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            try:
                return run(args)
            except KeyboardInterrupt:
                if debug:
                    raise
                print(f"{prefix}: interrupted (an output being written was removed, or left unchanged)",
                      file=sys.stderr)
                return 130
            except Exception as err:  # noqa: BLE001 - every failure is one line unless --debug
                if debug or main_reports_errors:
                    raise
                print(f"{prefix}: error: {one_line(err)} (--debug shows the traceback)", file=sys.stderr)
                return 2

    guarded.__doc__ = run.__doc__
    return guarded


def _reader_options(args) -> dict:
    if args.format == "extxyz":
        return dict(energy_key=args.energy_key, forces_key=args.forces_key, stress_key=args.stress_key,
                    virials_key=args.virials_key, id_key=args.id_key, group_key=args.group_key or "config_type")
    if args.format == "asedb":
        return dict(id_key=args.id_key, group_key=args.group_key)
    if args.format == "mptrj":
        return dict(energy=args.mptrj_energy)
    if args.format == "deepmd":
        return dict(type_map=args.type_map.split(",") if args.type_map else None)
    if args.format == "mp20csv":
        return dict(label_columns=[c for c in args.label_columns.split(",") if c],
                    structure_column=args.structure_column, id_column=args.id_column,
                    formula_column=args.formula_column or None, elements_column=args.elements_column or None)
    return {}


def run_convert(args) -> int:
    """Convert; each skipped row/frame is reported on stderr and counted in the summary line."""
    from tqdm import tqdm

    from .converters import convert

    if len(args.paths) < 2:
        print("matkit data convert: error: need INPUT [INPUT ...] OUTPUT.h5", file=sys.stderr)
        return 2
    *inputs, output = args.paths

    def report_skip(message: str) -> None:
        tqdm.write(f"matkit data convert: skipped {message}", file=sys.stderr)

    counts = convert(inputs, output, args.format, append=args.append, compression=args.compression,
                     flush_frames=args.flush_frames, every=args.every, max_frames=args.max_frames,
                     license=args.license, note=args.note, check_units=not args.no_check_units,
                     progress=not args.no_progress, strict=args.strict, on_skip=report_skip,
                     **_reader_options(args))
    unit = "rows" if args.format == "mp20csv" else "frames"
    labels = ", ".join(f"{label} {n}" for label, n in counts["frames_with"].items())
    print(f"{output}: wrote {counts['frames_added']} frames (with {labels}), skipped {counts['frames_skipped']} "
          f"bad {unit}{' (listed above)' if counts['frames_skipped'] else ''}; file now has {counts['n_frames']} "
          f"frames, {counts['n_atoms_total']} atoms")
    return 0


def run_info(args) -> int:
    """Summary (and with --verify the full check); stale work files of killed conversions are listed."""
    from .hdf5 import file_info, stale_partials, verify_file

    info = file_info(args.file)
    stale = stale_partials(args.file)
    if stale:
        info["stale_work_files"] = stale
    if args.verify:
        verify_file(args.file)
        info["values_verified"] = info["hash_verified"] = True
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "provenance":
            for entry in value:
                print(f"provenance: {json.dumps(entry)}")
        else:
            print(f"{key}: {value}")
    return 0
