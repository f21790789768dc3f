"""``fusedvlm`` command line. Each subcommand lives in its own module exposing
``register(subparsers)``; importing those modules is cheap (heavy imports happen inside
the handlers)."""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = (
    "The fused vision-question language model of arXiv 2412.18387: chat about an image, "
    "inspect a preset, benchmark, analyse and train."
)
# Modules that add subcommands, in --help order.
COMMAND_MODULES = [
    "fusedvlm.commands",
    "fusedvlm.upstream",
    "fusedvlm.analysis.cli",
    "fusedvlm.benchmark.cli",
    "fusedvlm.eval.cli",
    "fusedvlm.train.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedvlm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Bad input gets one line naming the problem, not a traceback.
        print(f"fusedvlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
