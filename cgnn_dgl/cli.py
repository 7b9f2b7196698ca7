"""`cgnn` command line: one sub-command per pipeline stage.

Each stage module exposes ``register(subparsers)``; handlers return an exit code. Errors the user can
fix become one line on stderr (exit 2 for usage/config problems, 1 otherwise), never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys

from cgnn_dgl import __version__
from cgnn_dgl.errors import CgnnError, UsageError

# (module, attribute) pairs providing register(subparsers); imported lazily so `cgnn --help` is fast.
COMMAND_MODULES = (
    "cgnn_dgl.examples",   # cgnn examples
    "cgnn_dgl.pipeline",   # cgnn graphs
    "cgnn_dgl.cache",      # cgnn cache info|verify|merge
    "ingest.cli",          # cgnn ingest, cgnn db init|synth
    "cgnn_dgl.train",      # cgnn train
    "cgnn_dgl.evaluate",   # cgnn evaluate
    "cgnn_dgl.predict",    # cgnn predict
    "cgnn_dgl.screen",     # cgnn screen, cgnn screen merge
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cgnn", description="Crystal graph neural networks on DGL, fed from OQMD.")
    parser.add_argument("--version", action="version", version=f"cgnn-dgl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # stage not built yet
            raise
        module.register(sub)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (also $CGNN_NO_PROGRESS=1)")
    _common_options_everywhere(parser)
    return parser


def _common_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` and ``--no-progress`` after the subcommand too (``cgnn train -v ...``); SUPPRESS keeps one
    given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                with contextlib.suppress(argparse.ArgumentError):  # unless the command has its own -v
                    child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                       help="debug logging")
                with contextlib.suppress(argparse.ArgumentError):  # ingest has its own --no-progress
                    child.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                                       help="no progress bars (also $CGNN_NO_PROGRESS=1)")
                _common_options_everywhere(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.no_progress:
        from cgnn_dgl.report import disable_progress

        disable_progress()
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"cgnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CgnnError as exc:
        print(f"cgnn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = "the same command with --resume" if args.command == "train" else "the same command again"
        print(f"cgnn {args.command}: interrupted; finished work is kept, run {again} to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
