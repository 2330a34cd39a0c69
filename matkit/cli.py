"""``matkit`` command line: ``matkit demo``, ``matkit data ...``, ``matkit train``, ``matkit evaluate``,
``matkit discovery ...``. Each sub-package registers its own sub-commands through ``register(subparsers)``.

Errors: a command that fails prints one line, ``matkit <command>: error: <what, naming the file/key/row/id>``,
and exits with status 2; ``--debug`` anywhere on the command line shows the Python traceback instead."""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = ["matkit.demo", "matkit.data.cli", "matkit.training.cli", "matkit.discovery.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matkit", description="Machine-learned interatomic potentials.")
    parser.add_argument("--version", action="version",
                        version=f"matkit {importlib.import_module('matkit').__version__}")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors (any position)")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line unless --debug
        if debug:
            raise
        print(f"matkit {args.command}: error: {error_message(err)}", file=sys.stderr)
        return 2
    return int(result or 0)


def error_message(err: BaseException) -> str:
    """One line for ``err``: its message (KeyError's without the quotes), the exception type for anything that is
    not an obvious user error, and a hint to ``--debug``."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split()) or type(err).__name__
    user_errors = (ValueError, KeyError, OSError, RuntimeError)
    if not isinstance(err, user_errors):
        text = f"{type(err).__name__}: {text}"
    return f"{text} (--debug shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
