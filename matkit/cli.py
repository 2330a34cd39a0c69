"""``matkit`` command line: ``matkit demo``, ``matkit data ...``, ``matkit train``, ``matkit evaluate``,
``matkit discovery ...``. Each sub-package registers its own sub-commands through ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = ["matkit.demo", "matkit.data.cli", "matkit.training.cli", "matkit.discovery.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matkit", description="Machine-learned interatomic potentials.")
    parser.add_argument("--version", action="version", version=f"matkit {importlib.import_module('matkit').__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if not name.startswith(str(err.name)):  # the command module is absent; other errors raise
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
