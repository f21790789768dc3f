"""One line on stderr for slow one-time work (the csrc/ build, each decode-step compile), said when
it starts and when it ends, so a first run never sits silent. stdout stays the command's output."""

import sys


def notice(message: str) -> None:
    print(f"[fusedvlm] {message}", file=sys.stderr, flush=True)
