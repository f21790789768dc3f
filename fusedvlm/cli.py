"""``fusedvlm`` command line. Each subcommand lives in its own module exposing
``register(subparsers)``; importing those modules is cheap (heavy imports happen inside
the handlers)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from fusedvlm.env import check_environment

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
        check_environment()
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return status
    except (ValueError, FileNotFoundError) as e:
        # Bad input gets one line naming the problem, not a traceback.
        print(f"fusedvlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every writer leaves its outputs as they were (atomic saves, temporaries removed).
        print(f"fusedvlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`fusedvlm info | head`): stop quietly. Python would report the
        # failed flush of stdout at exit, so it is pointed at /dev/null first.
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a stdout without a descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        # A full disk, a read-only folder, a file where a folder should be: one line naming the path.
        print(f"fusedvlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
