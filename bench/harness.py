"""The one small timing harness every benchmark uses.

Warm-up, then ``repeats`` timed calls; median and spread; CUDA events and synchronisation on
GPU; peak CUDA memory of one call. Results are plain dicts so they serialise to JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    name: str
    median_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    repeats: int
    peak_mem_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    *,
    name: str = "",
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str | None = None,
    min_time_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (more
    until ``min_time_s`` has passed). Peak CUDA memory of one call is recorded on GPU.
    ``clock`` times CPU calls (``time.process_time`` resists a machine shared with other jobs)."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    _sync(device)
    peak = None
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        if on_cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = clock()
            fn()
            times.append((clock() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(name, statistics.median(times), min(times), max(times), q[2] - q[0], len(times), peak)


def environment() -> dict:
    """Machine, versions, thread setting and git sha: recorded in every result."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    env = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_sha": sha,
        "device": "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return env


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    """A plain aligned table on the terminal."""
    if title:
        print(f"\n## {title}")
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def save_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)
