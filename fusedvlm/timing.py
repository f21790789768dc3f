"""Wall-clock timing that includes queued device work: the one ``sync`` and ``timed`` used by
generation, chat sessions, evaluation and the benchmarks. Torch only, so that any module can
import it without pulling in the model or the benchmark suite."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a clock read after it is honest."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str, device: torch.device | str | None) -> Iterator[None]:
    """Add the block's wall time, its queued device work included, to ``seconds[name]``
    (a block that raises adds nothing)."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
