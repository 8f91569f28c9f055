"""The ``dualvitok`` command line.

Each subcommand lives in ``dualvitok/commands/<name>.py`` with ``add_parser(subparsers)`` (which sets
``func=run`` on its parser) and ``run(args) -> int``; this module only assembles them, importing each lazily so
that a missing optional dependency affects only its own command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ._utils.locking import OutputLockedError
from .version import __version__

COMMANDS = ("reconstruct", "evaluate", "train", "encode", "decode", "chat", "generate", "edit", "train-refiner", "info")


def _module_name(command: str) -> str:
    return "dualvitok.commands." + command.replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualvitok", description="DualViTok image tokenizer (ILLUME+)")
    parser.add_argument("--version", action="version", version=f"dualvitok {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (same as --log-level debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (--log-level warning)")
    parser.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"),
                        help="logging level (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        try:
            module = importlib.import_module(_module_name(command))
        except ModuleNotFoundError as e:
            if e.name == _module_name(command):
                continue  # command not part of this version
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .devices import reproducible_cpu_blas

    reproducible_cpu_blas()  # before any float32 product: the same tokens for an image in every process
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("debug" if args.verbose else "warning" if args.quiet else "info")
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, ImportError, OutputLockedError) as e:
        if args.verbose:
            raise
        print(f"dualvitok {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
