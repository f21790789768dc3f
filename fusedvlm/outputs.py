"""Output paths of the commands that write (``convert-upstream``, ``eval``, ``train``): checked
before any work starts, and locked against a second writer while they run.

A bad output path (an existing file, a read-only folder, a full disk) is found in the first
second with one line naming it, not as a traceback after minutes of work (docs/design.md). The
lock is an ``flock`` on a hidden file beside the output, removed when the run ends; the kernel
drops it when a process dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(path: str, needed_bytes: int = 0) -> None:
    """Raise a one-line ValueError unless ``path`` can be used as an output directory: not an
    existing non-directory, writable (or creatable under a writable folder), with at least
    ``needed_bytes`` free on its file system."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"output {path} exists and is not a directory")
    # The folder the run creates its files in: the output itself when it exists, else the
    # nearest existing folder above it (missing folders between are created).
    folder = path if os.path.isdir(path) else _existing_ancestor(os.path.dirname(path))
    if not os.path.isdir(folder):
        raise ValueError(f"output {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"output {path}: cannot write in {folder} (permission denied)")
    if needed_bytes:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise ValueError(
                f"output {path}: not enough space on its disk ({_size(free)} free, about {_size(needed_bytes)} needed)"
            )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def lock_path(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.lock")


@contextlib.contextmanager
def locked_output(path: str):
    """Hold the lock of output ``path`` for the block; a second writer gets a one-line
    ValueError at once instead of interleaving its files with the first one's."""
    lock = lock_path(path)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ValueError(
                    f"output {os.path.abspath(path)} is in use by another fusedvlm run (lock {lock}); "
                    f"wait for it to finish or choose another output"
                ) from None
            raise
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        # The previous holder removed the file between our open and flock: lock the new one.
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling that replaces it only once complete:
    a full disk or a kill leaves the previous file (or none), never a truncated one."""
    import secrets

    folder, base = os.path.split(os.path.abspath(path))
    # The name pattern of fusedvlm.checkpoint's temporaries, so a killed writer's is cleaned up.
    tmp = os.path.join(folder, f".{base}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
