"""The ``m2rnn-jax`` command line.

Each subcommand lives in its own module under :mod:`m2rnn_jax.commands` and exposes
``add_parser(subparsers)`` (registers its arguments) and ``run(args) -> int``.
Modules are imported lazily so that ``m2rnn-jax --help`` stays fast and a broken
optional dependency of one command does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand name -> module under m2rnn_jax.commands.
COMMANDS: dict[str, str] = {
    "train": "train",
    "eval": "evaluate",
    "info": "info",
    "generate": "generate",
    "bench": "bench",
    "compare": "compare",
    "convert": "convert",
    "prepare-data": "prepare_data",
    "compile": "compile",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"m2rnn_jax.commands.{module_name}")
        except ModuleNotFoundError as err:
            if err.name != f"m2rnn_jax.commands.{module_name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2rnn-jax", description="M2RNN in JAX: training, evaluation, inspection, benchmarks."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in _available_commands().values():
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status (2 for a user mistake, reported as
    ``m2rnn-jax <command>: error: ...``; see :mod:`m2rnn_jax.commands.errors`)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, so that the error names the command like every other
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
