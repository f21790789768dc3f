"""Prefix psi statistics: the fused op vs a naive per-prefix loop and the bare Gram matmul.

Rows, for P pairs x N tokens x d (all prefix lengths of all pairs):

* ``fused``          : ``pairwise_cosine_stats(positive=True)`` (Triton on GPU, tiled torch on CPU)
* ``fused_signed``   : ``positive=False`` (O(N d) prefix-sum identities on CPU)
* ``gram_stacked``   : the lower bound: one batched matmul [A^; B^] [A^; B^]^T per pair on
                       pre-normalised rows, the (2N x 2N) Gram matrix holding every cosine the
                       statistics need, with no reduction at all
* ``gram_ab``        : bmm A^ B^T alone (a quarter of gram_stacked; a stricter yardstick)
* ``naive_loop``     : for every prefix n, build the n x n cosine matrices and average them;
                       O(N^3 d) per pair, so it is timed on ``--naive-pairs`` pairs and scaled
                       to P (pairs are independent and of equal length, so the cost is linear)

Ratios are against rows measured in the same run. The naive loop's result is checked against
the fused op on the pairs it ran.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pairwise_cosine.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from fusedvlm.backend import implementation
from fusedvlm.benchmark.system import environment, print_table, save_json, time_fn
from fusedvlm.kernels.common import unit_rows
from fusedvlm.kernels.pairwise_cosine import pairwise_cosine_stats
from fusedvlm.packing import cu_seqlens_from_lengths

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def naive_prefix_loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, d) pair -> (N, 4) [eq, ab, aa, bb] (f = max(0, .)), each prefix from scratch."""
    n_tok = a.shape[0]
    out = torch.full((n_tok, 4), float("nan"), dtype=torch.float32)
    for n in range(1, n_tok + 1):
        ua, ub = unit_rows(a[:n].float()), unit_rows(b[:n].float())
        c_ab, c_aa, c_bb = (ua @ ub.T).clamp_min(0), (ua @ ua.T).clamp_min(0), (ub @ ub.T).clamp_min(0)
        out[n - 1, 0] = c_ab.diagonal().mean()
        if n > 1:
            off = n * (n - 1)
            out[n - 1, 1] = (c_ab.sum() - c_ab.diagonal().sum()) / off
            out[n - 1, 2] = (c_aa.sum() - c_aa.diagonal().sum()) / off
            out[n - 1, 3] = (c_bb.sum() - c_bb.diagonal().sum()) / off
    return out


def bench_one(
    pairs: int, tokens: int, d: int, dtype: torch.dtype, device: str, repeats: int, naive_pairs: int
) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(d)
    a = torch.randn(pairs * tokens, d, generator=g).to(device, dtype)
    b = (0.5 * a.float() + torch.randn(pairs * tokens, d, generator=g).to(device)).to(dtype)
    cu = cu_seqlens_from_lengths([tokens] * pairs, device=device)
    x = torch.cat([unit_rows(a.float()).view(pairs, tokens, d), unit_rows(b.float()).view(pairs, tokens, d)], 1).to(
        dtype
    )
    xa, xb = x[:, :tokens], x[:, tokens:]

    timings = {
        "fused": time_fn(
            lambda: pairwise_cosine_stats(a, b, cu, positive=True),
            name="fused",
            warmup=1,
            repeats=repeats,
            device=device,
        ),
        "fused_signed": time_fn(
            lambda: pairwise_cosine_stats(a, b, cu, positive=False),
            name="fused_signed",
            warmup=1,
            repeats=repeats,
            device=device,
        ),
        "gram_stacked": time_fn(
            lambda x=x: torch.bmm(x, x.transpose(1, 2)), name="gram_stacked", warmup=1, repeats=repeats, device=device
        ),
        "gram_ab": time_fn(
            lambda xa=xa, xb=xb: torch.bmm(xa, xb.transpose(1, 2)),
            name="gram_ab",
            warmup=1,
            repeats=repeats,
            device=device,
        ),
    }
    del x, xa, xb  # the lambdas hold their own references until `timings` is built

    # The naive loop runs once on a few pairs (minutes per pair at d = 4096) and is scaled.
    fused = pairwise_cosine_stats(
        a[: naive_pairs * tokens], b[: naive_pairs * tokens], cu[: naive_pairs + 1], positive=True
    )
    t0 = time.perf_counter()
    naive = [
        naive_prefix_loop(a[p * tokens : (p + 1) * tokens].cpu(), b[p * tokens : (p + 1) * tokens].cpu())
        for p in range(naive_pairs)
    ]
    naive_ms = (time.perf_counter() - t0) * 1e3 * pairs / naive_pairs
    want = torch.stack([fused.eq, fused.ab, fused.aa, fused.bb], 1).cpu()
    torch.testing.assert_close(torch.cat(naive), want, atol=1e-4, rtol=1e-4, equal_nan=True)

    gram = timings["gram_stacked"].median_ms
    rows = []
    for name, t in timings.items():
        rows.append(
            dict(
                d=d,
                op=name,
                median_ms=t.median_ms,
                iqr_ms=t.iqr_ms,
                vs_gram_stacked=t.median_ms / gram,
                naive_speedup=naive_ms / t.median_ms,
                peak_mem_mb=None if t.peak_mem_bytes is None else t.peak_mem_bytes / 2**20,
            )
        )
    rows.append(
        dict(
            d=d,
            op=f"naive_loop (x{pairs}/{naive_pairs} pairs)",
            median_ms=naive_ms,
            iqr_ms=None,
            vs_gram_stacked=naive_ms / gram,
            naive_speedup=1.0,
            peak_mem_mb=None,
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=800)
    p.add_argument("--dims", type=int, nargs="+", default=[576, 4096])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-pairs", type=int, default=1)
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pairwise_cosine.json")
    )
    args = p.parse_args(argv)
    if not 1 <= args.naive_pairs <= args.pairs:
        raise SystemExit(f"--naive-pairs must be in 1..{args.pairs}, got {args.naive_pairs}")
    dtype = DTYPES[args.dtype]
    probe = torch.empty(0, device=args.device)
    rows = []
    for d in args.dims:
        rows += bench_one(args.pairs, args.tokens, d, dtype, args.device, args.repeats, args.naive_pairs)
    title = (
        f"pairwise_cosine_stats: {args.pairs} pairs x {args.tokens} tokens, {args.dtype}, "
        f"{args.device} ({implementation(probe)} path), {torch.get_num_threads()} threads"
    )
    print_table(rows, ["d", "op", "median_ms", "iqr_ms", "vs_gram_stacked", "naive_speedup", "peak_mem_mb"], title)
    save_json(args.out, dict(environment=environment(), args=vars(args), backend=implementation(probe), rows=rows))
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
