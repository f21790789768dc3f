"""Packed block-diagonal causal attention: fusedvlm vs the ways upstream and others do it.

For 2, 4 and 8 packed samples of 1500-2600 tokens (seeded), 16 heads x 64, rows:

* ``fusedvlm``      : ``fusedvlm.kernels.packed_attention``: the ``fusedvlm::packed_attention``
                      op (Triton on GPU, the C++ kernel of csrc/ on CPU)
* ``sdpa_loop``     : the torch path (``FUSEDVLM_BACKEND=torch``, and the CPU path before csrc),
                      ``fusedvlm.ref.packed_attention``: one fused CPU SDPA call per segment
                      on strided views, from a Python loop -- ``x_vs_sdpa_loop`` is every
                      row's speed-up over it
* ``dense_masked``  : upstream's way: one SDPA over the whole pack with the dense (T, T)
                      block-diagonal causal mask (built inside the timed call, as upstream does
                      per batch) -- the baseline every ratio is against
* ``flex``          : ``torch.compile(flex_attention)`` with a block mask (block mask built and
                      kernel compiled before timing; both costs are printed, not timed)
* ``flash_varlen`` / ``xformers`` : on GPU; a "skipped: not installed" row without the package

``fwd`` times the forward alone (no autograd); ``fwd+bwd`` the forward plus backward of
``out.sum()`` w.r.t. q, k, v (run for the packings in ``--backward-samples``; dense is slow
there on CPU).

Peak memory: on GPU ``torch.cuda.max_memory_allocated`` of one call above what was allocated
before it. On CPU, one call runs under ``torch.profiler`` with ``profile_memory=True`` and the
peak of its memory timeline (every torch CPU allocation and free during the call, the output
included; tensors that existed before the call are not counted) is reported. Every method, on
every device, is timed alike: WARMUP untimed calls, then ``--repeats`` rounds that call every
method once in turn (a slow baseline is left out with ``--only`` or ``--backward-samples``, never
timed colder). ``ms`` is a method's median over the rounds; an ``x_vs_*`` column is the median
of the rounds' own ratios, each taken within one round (a slow spell of a shared machine falls on
both sides of it).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_packed_attention.py

Issue 13's two CPU shapes (fp32, 2 threads; dense_masked is left out, it needs (T, T) masks):

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_packed_attention.py --samples 64 --min-len 16 \
        --max-len 300 --backward-samples 64 --only fusedvlm sdpa_loop flex --out bench/results/packed_attention_short.json
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_packed_attention.py --samples 8 \
        --backward-samples 8 --only fusedvlm sdpa_loop flex --out bench/results/packed_attention_long.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from fusedvlm.backend import implementation
from fusedvlm.benchmark.system import (
    cuda_peak_bytes,
    environment,
    paired_ratio,
    print_table,
    save_json,
    time_interleaved,
)
from fusedvlm.kernels.packed_attention import packed_attention
from fusedvlm.packing import segment_ids
from fusedvlm.ref.masks import BlockDiagonalCausalMask, dense_masked_attention
from fusedvlm.ref.packed_attention import packed_attention as sdpa_loop

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WARMUP = 1  # untimed calls before every method's timed ones: first-call allocations, lazy init
NOT_INSTALLED = ("not installed",)  # a comparison whose package is missing: a row that says so


def cpu_peak_bytes(fn) -> int:
    """Peak bytes of torch CPU tensors allocated during fn() and live at the same moment."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max(sum(row) for row in sizes) if sizes else 0


def packing(n: int, seed: int, lo: int, hi: int) -> list[int]:
    rng = random.Random(seed * 1000 + n)
    return [rng.randint(lo, hi) for _ in range(n)]


def methods(lengths, heads, head_dim, dtype, device, with_grad):
    """name -> (prepare or None, call). ``call`` runs one forward (and backward)."""
    mask = BlockDiagonalCausalMask.from_seqlens(lengths)
    cu = mask.cu_seqlens_q.to(device)
    total = sum(lengths)
    g = torch.Generator(device="cpu").manual_seed(total)
    q, k, v = (
        torch.randn(total, heads, head_dim, generator=g).to(device, dtype).requires_grad_(with_grad) for _ in range(3)
    )

    def run(f):
        def call():
            with torch.set_grad_enabled(with_grad):
                out = f()
                if with_grad:
                    out.float().sum().backward()
            return out

        return call

    out: dict[str, tuple] = {
        "fusedvlm": (None, run(lambda: packed_attention(q, k, v, cu))),
        "sdpa_loop": (None, run(lambda: sdpa_loop(q, k, v, cu))),
        "dense_masked": (None, run(lambda: dense_masked_attention(q, k, v, mask))),
    }

    flex_state: dict = {}

    def flex_prepare():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if with_grad and device.type == "cpu":
            raise NotImplementedError(f"FlexAttention has no CPU backward (torch {torch.__version__})")
        # A fresh compile per packing: a frame that once failed can otherwise run flex eagerly,
        # which materialises every (T, T) score matrix (13 GB at 8k tokens).
        torch._dynamo.reset()
        seg = segment_ids(cu, total)

        def causal_block_diagonal(b, h, qi, ki):
            return (seg[qi] == seg[ki]) & (ki <= qi)

        t0 = time.perf_counter()
        flex_state["block_mask"] = create_block_mask(causal_block_diagonal, None, None, total, total, device=device)
        flex_state["mask_s"] = time.perf_counter() - t0
        flex_state["fn"] = torch.compile(flex_attention, dynamic=False)
        flex_state["qkv"] = [t.detach().transpose(0, 1)[None].contiguous().requires_grad_(with_grad) for t in (q, k, v)]
        t0 = time.perf_counter()
        run(flex_call)()
        flex_state["compile_s"] = time.perf_counter() - t0

    def flex_call():
        fq, fk, fv = flex_state["qkv"]
        return flex_state["fn"](fq, fk, fv, block_mask=flex_state["block_mask"])

    out["flex"] = (flex_prepare, run(flex_call), flex_state)

    if device.type == "cuda":
        max_len = max(lengths)
        try:
            from flash_attn import flash_attn_varlen_func

            out["flash_varlen"] = (
                None,
                run(lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)),
            )
        except ImportError:
            out["flash_varlen"] = NOT_INSTALLED
        try:
            from xformers.ops import fmha

            bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths)
            out["xformers"] = (
                None,
                run(lambda: fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]),
            )
        except ImportError:
            out["xformers"] = NOT_INSTALLED
    return out


def bench_packing(lengths, args, device, with_grad) -> list[dict]:
    dtype = DTYPES[args.dtype]
    mode = "fwd+bwd" if with_grad else "fwd"
    base = dict(samples=len(lengths), tokens=sum(lengths), mode=mode)
    rows, calls, notes = [], {}, {}
    for name, entry in methods(lengths, args.heads, args.head_dim, dtype, device, with_grad).items():
        if args.only and name not in args.only:
            continue
        if entry is NOT_INSTALLED:
            rows.append(dict(base, method=name, note="skipped: not installed"))
            continue
        prepare, call = entry[0], entry[1]
        try:
            if prepare is not None:
                prepare()
                state = entry[2]
                notes[name] = f"block mask {state['mask_s']:.1f} s, compile+first call {state['compile_s']:.1f} s"
            for _ in range(WARMUP):
                call()
        except (RuntimeError, NotImplementedError, torch.OutOfMemoryError) as e:
            rows.append(dict(base, method=name, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"))
            continue
        calls[name] = call
    # Rounds interleave the methods (each warmed up above), so that a slow spell of the machine
    # falls on both sides of a ratio; the ratios are medians of the rounds' own ratios.
    timings = time_interleaved(calls, warmup=0, repeats=args.repeats, device=device) if calls else {}
    for name, t in timings.items():
        peak = cuda_peak_bytes(calls[name], device) if device.type == "cuda" else cpu_peak_bytes(calls[name])
        row = dict(base, method=name, ms=t.median_ms, iqr_ms=t.iqr_ms, warmup=WARMUP, repeats=t.repeats)
        row.update(
            peak_mib=None if peak is None else peak / 2**20, note=notes.get(name, ""), times_ms=t.extra["times_ms"]
        )
        for base_name, column in (("dense_masked", "x_vs_dense"), ("sdpa_loop", "x_vs_sdpa_loop")):
            if base_name in timings:
                row[column] = paired_ratio(timings[base_name], t)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--backward-samples", type=int, nargs="*", default=[2], help="packings also timed forward+backward")
    p.add_argument("--min-len", type=int, default=1500)
    p.add_argument("--max-len", type=int, default=2600)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="run only these methods")
    p.add_argument("--out", default="bench/results/packed_attention.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.min_len < 1 or args.max_len < args.min_len:
        raise SystemExit(f"need 1 <= --min-len <= --max-len, got {args.min_len}, {args.max_len}")

    env = environment()
    print(
        f"device={device} dtype={args.dtype} heads={args.heads}x{args.head_dim} "
        f"fusedvlm backend={implementation(torch.empty(0, device=device))} threads={torch.get_num_threads()}"
    )
    rows = []
    for n in args.samples:
        lengths = packing(n, args.seed, args.min_len, args.max_len)
        print(f"packing n={n}: lengths {lengths}", flush=True)
        rows += bench_packing(lengths, args, device, with_grad=False)
        if n in args.backward_samples:
            rows += bench_packing(lengths, args, device, with_grad=True)
        print_table(
            [r for r in rows if r["samples"] == n],
            [
                "samples",
                "tokens",
                "mode",
                "method",
                "ms",
                "iqr_ms",
                "warmup",
                "repeats",
                "peak_mib",
                "x_vs_dense",
                "x_vs_sdpa_loop",
                "note",
            ],
            title=f"{n} packed samples",
        )
    save_json(args.out, dict(env=env, args=vars(args), rows=rows))
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
