"""``matkit data convert`` and ``matkit data info``.

    matkit data convert INPUT [INPUT ...] OUTPUT.h5 --format extxyz|asedb|mlearn|mptrj|deepmd|mp20csv [options]
    matkit data info FILE.h5 [--verify] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

from .converters import FORMATS, MP20_LABELS, MPTRJ_ENERGY_KEYS


def register(subparsers) -> None:
    """Add the ``data`` command (with ``convert`` and ``info``) to an argparse sub-parser collection."""
    data = subparsers.add_parser("data", help="convert datasets to matkit HDF5 and inspect them")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
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
    p.add_argument("--no-progress", action="store_true")
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
    p.set_defaults(func=run_convert)

    p = commands.add_parser("info", help="summarise a matkit HDF5 file")
    p.add_argument("file")
    p.add_argument("--verify", action="store_true", help="recompute and check the content hash")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_info)


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
                    structure_column=args.structure_column, id_column=args.id_column)
    return {}


def run_convert(args) -> int:
    from .converters import convert

    if len(args.paths) < 2:
        print("matkit data convert: need INPUT [INPUT ...] OUTPUT.h5", file=sys.stderr)
        return 2
    *inputs, output = args.paths
    counts = convert(inputs, output, args.format, append=args.append, compression=args.compression,
                     flush_frames=args.flush_frames, every=args.every, max_frames=args.max_frames,
                     license=args.license, note=args.note, check_units=not args.no_check_units,
                     progress=not args.no_progress, **_reader_options(args))
    print(f"{output}: wrote {counts['frames_added']} frames; file now has {counts['n_frames']} frames, "
          f"{counts['n_atoms_total']} atoms")
    return 0


def run_info(args) -> int:
    from .hdf5 import file_info, verify_file

    info = file_info(args.file)
    if args.verify:
        verify_file(args.file)
        info["hash_verified"] = True
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
