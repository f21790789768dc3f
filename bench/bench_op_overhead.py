"""Per-call overhead of the three fusedvlm:: ops on tiny inputs (where the work is nil).

Rows per op: the public function (argument checks + dispatch), the bare ``torch.ops.fusedvlm``
call, and ``x + 1`` on the same input as the floor every dispatcher op pays. Times are the
median over ``--rounds`` rounds of ``--calls`` calls, in microseconds, under ``torch.no_grad``
(inference, the decoder's per-layer case) and with inputs that require grad (training).
``--clock thread`` counts this thread's CPU time instead of wall time: on a machine shared with
other jobs it stays put while wall times double (the calls are too small to start OpenMP workers).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_op_overhead.py [--clock thread]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fusedvlm.backend import implementation
from fusedvlm.benchmark.system import environment, print_table, save_json, time_fn
from fusedvlm.kernels import local_merge, packed_attention, pairwise_cosine_stats
from fusedvlm.packing import cu_seqlens_from_lengths

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def per_call_us(fn, calls: int, rounds: int, clock: str = "wall") -> float:
    """Median over ``rounds`` timed batches of ``calls`` calls (after one untimed batch), per call."""

    def batch():
        for _ in range(calls):
            fn()

    return time_fn(batch, warmup=1, repeats=rounds, clock=CLOCKS[clock]).median_ms * 1e3 / calls


def cases(grad: bool):
    q = torch.randn(4, 2, 8, requires_grad=grad)
    k = torch.randn(4, 2, 8, requires_grad=grad)
    v = torch.randn(4, 2, 8, requires_grad=grad)
    cu = cu_seqlens_from_lengths([4])
    x = torch.randn(1, 4, 8, requires_grad=grad)
    w = torch.randn(8, 8, 3, 3, requires_grad=grad)
    lf = torch.randn(8, requires_grad=grad)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    impl = implementation(q)  # the bare op is given the public function's choice, decided once
    yield (
        "packed_attention",
        impl,
        q,
        lambda: packed_attention(q, k, v, cu),
        lambda: torch.ops.fusedvlm.packed_attention(q, k, v, cu, cu, None, None, True, 0.25, impl),
    )
    yield (
        "local_merge",
        impl,
        x,
        lambda: local_merge(x, w, lf),
        lambda: torch.ops.fusedvlm.local_merge(x, w, lf, None, True, 2, 2, impl),
    )
    if not grad:  # statistics: never differentiated
        yield (
            "pairwise_cosine_stats",
            impl,
            a,
            lambda: pairwise_cosine_stats(a, b, cu),
            lambda: torch.ops.fusedvlm.pairwise_cosine_stats(a, b, cu, True, impl),
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or this thread's CPU time")
    p.add_argument("--out", default="bench/results/op_overhead.json")
    args = p.parse_args(argv)
    rows = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for name, impl, probe, public, op in cases(grad):
                floor = per_call_us(lambda p=probe: p + 1, args.calls, args.rounds, args.clock)
                row = dict(
                    op=name,
                    mode="grad" if grad else "no_grad",
                    impl=impl,
                    floor_us=floor,
                    public_us=per_call_us(public, args.calls, args.rounds, args.clock),
                    torch_ops_us=per_call_us(op, args.calls, args.rounds, args.clock),
                )
                row["public_minus_floor_us"] = row["public_us"] - floor
                rows.append(row)
    print_table(
        rows,
        ["op", "mode", "impl", "floor_us", "torch_ops_us", "public_us", "public_minus_floor_us"],
        f"per-call overhead on tiny inputs, {torch.get_num_threads()} threads, {args.clock} clock",
    )
    save_json(args.out, dict(environment=environment(), args=vars(args), rows=rows))
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
