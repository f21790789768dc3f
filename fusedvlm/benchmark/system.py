"""The one set of benchmark helpers, for ``fusedvlm bench`` and every bench/*.py script:
environment record, quantiles, the timing harness, tables and JSON,
memory bandwidth, peak memory, and whether a preset fits at all. Device synchronisation
lives in :mod:`fusedvlm.timing` (torch only, also used by generation and chat)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from fusedvlm.timing import sync

# Peak HBM bandwidth from the vendors' data sheets, bytes/s, by a substring of the CUDA name.
GPU_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
}


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpp_isa() -> str | None:
    """The ISA variant the C++ CPU kernels run (csrc/variant.h), None where they are not built."""
    from fusedvlm import native

    return native.isa() if native.available() else None


def environment(device: torch.device | str | None = None) -> dict:
    """Machine, versions, thread setting and git sha: recorded in every result. ``device``
    defaults to the first GPU when there is one, else the CPU."""
    import transformers

    from fusedvlm.backend import interpreter_enabled, requested_backend

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    env = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_sha": git_sha(),
        "fusedvlm_backend": requested_backend(),
        "triton_interpret": interpreter_enabled(),
        "cpp_isa": cpp_isa(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ``p`` in [0, 1]."""
    v = sorted(values)
    if not v:
        return float("nan")
    x = p * (len(v) - 1)
    lo = int(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median, interquartile range (:func:`percentile` 75 - 25), min and max."""
    p25, p75 = percentile(values, 0.25), percentile(values, 0.75)
    return {
        "median": percentile(values, 0.5),
        "iqr": p75 - p25,
        "min": min(values, default=float("nan")),
        "max": max(values, default=float("nan")),
    }


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
    # Recorded so that a ratio's two sides can be checked to be equally warm (tests/test_benchmark.py).
    warmup: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak CUDA bytes of one fn() above what was allocated before it."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _timing(name: str, times: list[float], warmup: int, peak: int | None = None, **extra) -> Timing:
    q = quantiles(times)
    return Timing(name, q["median"], q["min"], q["max"], q["iqr"], len(times), peak, extra, warmup)


def _call_ms(fn: Callable[[], object], on_cuda: bool, clock: Callable[[], float]) -> float:
    """Milliseconds of one fn(): CUDA events on a GPU, ``clock`` otherwise."""
    if on_cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = clock()
    fn()
    return (clock() - t0) * 1e3


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
    until ``min_time_s`` has passed); CUDA events on GPU. Every method of a ratio goes through
    here with the same ``warmup`` and ``repeats`` (an expensive one gets fewer shapes, not a
    colder measurement). Peak CUDA memory of one call is
    recorded on GPU. ``clock`` times CPU calls (``time.process_time`` resists a machine shared
    with other jobs)."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    sync(device)
    peak = cuda_peak_bytes(fn, device) if on_cuda else None
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        times.append(_call_ms(fn, on_cuda, clock))
    return _timing(name, times, warmup, peak)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time several functions in rounds, each round calling every function once in turn:
    ``warmup`` untimed rounds, then ``repeats`` timed ones. On a machine whose speed drifts (a VM
    with slow spells of 20-50 %, a GPU clocking down) the rounds put both sides of a ratio in the
    same moments, where :func:`time_fn` times one method's calls after the other's. Each Timing
    keeps its per-round times in ``extra["times_ms"]`` for :func:`paired_ratio`."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_call_ms(fn, on_cuda, clock))
    return {name: _timing(name, ms, warmup, times_ms=ms) for name, ms in times.items()}


def paired_ratio(base: Timing, other: Timing) -> float:
    """Median over the rounds of base / other, both from one :func:`time_interleaved` call: each
    round's two times were taken in the same moment, so a slow spell cancels out of its ratio."""
    a, b = base.extra.get("times_ms"), other.extra.get("times_ms")
    if not a or not b or len(a) != len(b):
        raise ValueError(f"{base.name} and {other.name} were not timed in the same rounds of time_interleaved")
    return percentile([x / y for x, y in zip(a, b)], 0.5)


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


def write_text_atomic(path: str, text: str) -> None:
    """Write beside ``path``, then rename: a crash never leaves half a result file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_json(path: str, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def memory_bandwidth(device: torch.device, size_bytes: int = 1 << 28, repeats: int = 5) -> tuple[float, str]:
    """(bytes/s, source): the streaming-read bandwidth a decode step's weight reads are bound by.
    GPUs: the data-sheet peak from :data:`GPU_BANDWIDTH` when the name is known. Otherwise
    measured on torch's threads: the best of ``repeats`` sums of a ``size_bytes`` fp32 buffer
    (one add per 4 bytes read, so the reads bound it). A copy would count its writes, and on x86
    also pays a read for each written line, so it understates what reads alone reach."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bw in GPU_BANDWIDTH.items():
            if key in name:
                return bw, f"data sheet ({key})"
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        src.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return size_bytes / best, (
        f"measured: streaming read (sum) of {size_bytes >> 20} MiB on {torch.get_num_threads()} thread(s), "
        f"best of {repeats + 1}"
    )


def fma_peak(device: torch.device, repeats: int = 3) -> tuple[float, str] | None:
    """(FLOP/s, source): the CPU's FMA peak on torch's threads, measured by the C++ kernels'
    register-only FMA chains in the ISA variant they run (best of ``repeats``); None on a GPU or
    where the C++ kernels are not built."""
    from fusedvlm import native

    if device.type != "cpu" or not native.available():
        return None
    mod = native.load()
    mod.fma_peak(1_000_000)  # threads up, clocks up
    best = max(mod.fma_peak(20_000_000) for _ in range(repeats))
    return best, f"measured: FMA chains on {torch.get_num_threads()} thread(s), {mod.isa()} variant, best of {repeats}"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of the block. CUDA: ``max_memory_allocated`` (tensors on the device).
    CPU: the process's resident set, sampled every ``interval_s`` by a thread (weights,
    activations and the allocator's cache, so an upper bound on what tensors need)."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.method = (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else f"process RSS sampled every {interval_s * 1e3:g} ms"
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())


def unique_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, tied weights counted once."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def kv_bytes_per_position(llm, dtype: torch.dtype) -> int:
    """Bytes of one position's keys and values across every layer of a HF decoder."""
    c = llm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def preset_requirements(preset: str, dtype: torch.dtype) -> dict:
    """Parameter count and bytes of a preset, from its module tree on the meta device."""
    from fusedvlm.config import get_preset
    from fusedvlm.model.llm import meta_llm
    from fusedvlm.model.vlm import FusedVLM

    cfg = get_preset(preset)
    llm = meta_llm(cfg.llm)
    with torch.device("meta"):
        model = FusedVLM(cfg, llm=llm, tokenizer=None)
    params = sum(p.numel() for p in model.parameters())
    # Built in fp32, then cast: the fp32 copy exists for a moment at load time.
    size = torch.tensor([], dtype=dtype).element_size()
    return {"parameters": params, "weight_bytes": params * size, "load_bytes": params * max(size, 4)}


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(preset: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Refuse, before building anything, a preset whose weights cannot fit on the device."""
    req = preset_requirements(preset, dtype)
    free = available_memory(device)
    # Host memory holds the fp32 build even when the model then moves to the GPU.
    host_need = req["load_bytes"] if device.type == "cpu" else req["parameters"] * 4
    host_free = available_memory(torch.device("cpu"))
    gib = 1 << 30
    if host_need > host_free:
        raise ValueError(
            f"preset {preset!r} has {req['parameters'] / 1e9:.2f} B parameters and needs about {host_need / gib:.1f} GiB of "
            f"host memory to build; {host_free / gib:.1f} GiB is available. Run it on a larger machine or a GPU "
            f"(fusedvlm bench --preset {preset} --device cuda), or pick a smaller preset."
        )
    if device.type == "cuda" and req["weight_bytes"] * 1.2 > free:
        raise ValueError(
            f"preset {preset!r} needs about {req['weight_bytes'] / gib:.1f} GiB for its weights in {dtype} plus activations; "
            f"the GPU has {free / gib:.1f} GiB free"
        )
    req["available_bytes"] = free
    return req
