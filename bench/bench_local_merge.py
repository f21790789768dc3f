"""Local merge: the fused op vs the unfused eager chain and vs F.conv2d alone.

Rows, for V views of an H x W token grid, C_in -> C_out (forward, and forward+backward with
gradients for every input):

* ``fused``  : ``fusedvlm.kernels.local_merge`` (Triton on GPU; on CPU the C++ kernel of
               csrc/local_merge.inc: a direct im2col SGEMM on small problems, the Winograd
               F(2, 2) form on many output pixels; FUSEDVLM_BACKEND=torch times the torch path)
* ``eager``  : ``fusedvlm.ref.local_merge``, the chain it replaces: tokens -> NCHW grid copy ->
               conv2d -> + nearest downsample -> flatten -> append LF -> concatenate
* ``conv2d`` : ``F.conv2d`` alone on a ready NCHW grid: no layout work, residual, LF or packing
               (the yardstick the fused op should come close to)

``vs_eager`` = eager time / this row's time (speed-up over the chain); ``vs_conv2d`` = this row's
time / conv2d time (overhead over the bare convolution). All ratios come from the same run, the
three ops timed in interleaved rounds (``--rounds``).

    python bench/bench_local_merge.py                  # CPU: fp32, paper and small shape
    python bench/bench_local_merge.py --threads 1 --clock cpu   # CPU time: robust on a busy machine

On a machine shared with other jobs, multi-threaded wall-clock times are unreliable: every
thread-pool barrier waits for a descheduled worker, which hurts a many-op path (the torch
path's Winograd form) far more than a single convolution.
    python bench/bench_local_merge.py --out bench/results/local_merge.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fusedvlm.backend import implementation
from fusedvlm.benchmark.system import environment, print_table, save_json, time_fn
from fusedvlm.kernels import local_merge
from fusedvlm.kernels.common import merged_tokens_per_view
from fusedvlm.ref.local_merge import local_merge as eager_local_merge

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# name -> (views, grid side, C_in, C_out); paper: 10 HD-9 views of 24x24 CLIP-L tokens (design §4).
SHAPES = {"paper": (10, 24, 1024, 1024), "small": (2, 7, 64, 64)}
COLUMNS = ["shape", "pass", "op", "median_ms", "iqr_ms", "vs_eager", "vs_conv2d", "peak_mem_mb"]


def _cases(v: int, side: int, c_in: int, c_out: int, dtype: torch.dtype, device: str):
    """name -> (forward fn, forward+backward fn) for the three implementations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(v, side * side, c_in, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)).to(device, dtype).requires_grad_()
    lf = torch.randn(c_out, generator=g).to(device, dtype).requires_grad_()
    grad_out = torch.randn(v, merged_tokens_per_view(side, side), c_out, generator=g).to(device, dtype)
    grid = x.detach().transpose(1, 2).reshape(v, c_in, side, side).contiguous().requires_grad_()
    grad_conv = torch.randn(v, c_out, (side + 1) // 2, (side + 1) // 2, generator=g).to(device, dtype)
    residual = c_in == c_out

    def fused():
        return local_merge(x, weight, lf, residual=residual)

    def eager():
        return eager_local_merge(x, weight, lf, residual=residual)

    def conv():
        return F.conv2d(grid, weight, stride=2, padding=1)

    def with_backward(fn, leaves, grad):
        return lambda: torch.autograd.grad(fn(), leaves, grad)

    return {
        "fused": (fused, with_backward(fused, (x, weight, lf), grad_out)),
        "eager": (eager, with_backward(eager, (x, weight, lf), grad_out)),
        "conv2d": (conv, with_backward(conv, (grid, weight), grad_conv)),
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bench_shape(
    name: str,
    dtype: torch.dtype,
    device: str,
    repeats: int,
    backward: bool = True,
    clock: str = "wall",
    rounds: int = 3,
) -> list[dict]:
    """Each pass times the three ops in turn, ``rounds`` times over (``repeats`` calls each), so
    that a slow spell of a shared machine hits them alike; a row's median is the median of its
    rounds' medians, its iqr the spread (max - min) of those."""
    v, side, c_in, c_out = SHAPES[name]
    cases = _cases(v, side, c_in, c_out, dtype, device)
    fwd, bwd = cases["fused"][0](), cases["eager"][0]()
    torch.testing.assert_close(fwd.float(), bwd.float(), atol=5e-2, rtol=5e-2)
    passes = ["fwd", "fwd+bwd"] if backward else ["fwd"]
    rows = []
    for i, pass_name in enumerate(passes):
        medians: dict[str, list[float]] = {op: [] for op in cases}
        peaks = {}
        with torch.set_grad_enabled(pass_name == "fwd+bwd"):
            for r in range(rounds):
                for op, fns in cases.items():
                    t = time_fn(
                        fns[i], name=op, warmup=1 if r == 0 else 0, repeats=repeats, device=device, clock=CLOCKS[clock]
                    )
                    medians[op].append(t.median_ms)
                    peaks[op] = t.peak_mem_bytes
        median = {op: statistics.median(m) for op, m in medians.items()}
        for op, m in medians.items():
            rows.append(
                dict(
                    shape=f"{name} V{v} {side}x{side} {c_in}->{c_out}",
                    pass_=pass_name,
                    op=op,
                    median_ms=median[op],
                    iqr_ms=max(m) - min(m),
                    vs_eager=median["eager"] / median[op],
                    vs_conv2d=median[op] / median["conv2d"],
                    peak_mem_mb=None if peaks[op] is None else peaks[op] / 2**20,
                )
            )
    for r in rows:
        r["pass"] = r.pop("pass_")
    return rows


def run(
    shapes: list[str], dtypes: list[str], device: str, repeats: dict[str, int], clock: str = "wall", rounds: int = 3
) -> dict:
    probe = torch.empty(0, device=device)
    rows = []
    for dtype_name in dtypes:
        for shape in shapes:
            for r in bench_shape(shape, DTYPES[dtype_name], device, repeats[shape], clock=clock, rounds=rounds):
                rows.append(dict(dtype=dtype_name, **r))
    return dict(environment=environment(), backend=implementation(probe), rows=rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    on_gpu = torch.cuda.is_available()
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["paper", "small"])
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        default=["bfloat16", "float16", "float32"] if on_gpu else ["float32"],
    )
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per row and round (default: 20 on GPU; on CPU 3 for the paper shape, 20 for small)",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the three ops (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="CPU timing clock: wall, or process CPU time (with --threads 1, robust on a shared machine)",
    )
    p.add_argument("--out", default=None, help="also save the results as JSON here")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu and args.clock != "wall":
        raise SystemExit("--clock cpu times CPU runs only; GPU runs use CUDA events")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = {s: args.repeats or (20 if gpu or s != "paper" else 3) for s in args.shapes}
    result = run(args.shapes, args.dtypes, args.device, repeats, clock=args.clock, rounds=args.rounds)
    title = (
        f"local_merge on {args.device} ({result['backend']} path), {torch.get_num_threads()} threads, "
        f"{args.clock} clock; vs_eager = speed-up over the eager chain, vs_conv2d = time / F.conv2d alone"
    )
    print_table(result["rows"], ["dtype"] + COLUMNS, title)
    if args.out:
        save_json(args.out, dict(args=vars(args), **result))
        print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
