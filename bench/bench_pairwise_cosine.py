"""Prefix psi statistics: the fused op vs a naive per-prefix loop and the bare Gram matmul.

Rows, for P pairs x N tokens x d (all prefix lengths of all pairs):

* ``fused``          : ``pairwise_cosine_stats(positive=True)`` (Triton on GPU, tiled torch on CPU)
* ``fused_signed``   : ``positive=False`` (O(N d) prefix-sum identities on CPU)
* ``gram_stacked``   : the lower bound: one batched matmul [A^; B^] [A^; B^]^T per pair on
                       pre-normalised rows, the (2N x 2N) Gram matrix holding every cosine the
                       statistics need, with no reduction at all
* ``gram_ab``        : bmm A^ B^T alone (a quarter of gram_stacked; a stricter yardstick)
* ``naive_loop``     : for every prefix n, build the n x n cosine matrices and average them;
                       O(N^3 d) per pair (minutes per 800-token pair), so it gets a smaller
                       shape of its own: ``--naive-pairs`` pairs x ``--naive-tokens`` tokens, on
                       which ``fused`` and ``fused_signed`` are timed again for ``naive_speedup``

Ratios are against rows measured in the same run and shape, every row timed alike: WARMUP
untimed calls, then the median of ``--repeats``. The naive loop's result is checked against the
fused op.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pairwise_cosine.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from fusedvlm.backend import implementation
from fusedvlm.benchmark.system import environment, print_table, save_json, time_fn
from fusedvlm.kernels.common import unit_rows
from fusedvlm.kernels.pairwise_cosine import pairwise_cosine_stats
from fusedvlm.packing import cu_seqlens_from_lengths

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WARMUP = 1  # untimed calls before every row's timed ones


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


def inputs(pairs: int, tokens: int, d: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(d)
    a = torch.randn(pairs * tokens, d, generator=g).to(device, dtype)
    b = (0.5 * a.float() + torch.randn(pairs * tokens, d, generator=g).to(device)).to(dtype)
    return a, b, cu_seqlens_from_lengths([tokens] * pairs, device=device)


def bench_one(
    pairs: int, tokens: int, d: int, dtype: torch.dtype, device: str, repeats: int, naive_pairs: int, naive_tokens: int
) -> list[dict]:
    def timed(fn, name, on=device):
        return time_fn(fn, name=name, warmup=WARMUP, repeats=repeats, device=on)

    a, b, cu = inputs(pairs, tokens, d, dtype, device)
    x = torch.cat([unit_rows(a.float()).view(pairs, tokens, d), unit_rows(b.float()).view(pairs, tokens, d)], 1).to(
        dtype
    )
    xa, xb = x[:, :tokens], x[:, tokens:]
    timings = {
        "fused": timed(lambda: pairwise_cosine_stats(a, b, cu, positive=True), "fused"),
        "fused_signed": timed(lambda: pairwise_cosine_stats(a, b, cu, positive=False), "fused_signed"),
        "gram_stacked": timed(lambda x=x: torch.bmm(x, x.transpose(1, 2)), "gram_stacked"),
        "gram_ab": timed(lambda xa=xa, xb=xb: torch.bmm(xa, xb.transpose(1, 2)), "gram_ab"),
    }
    del x, xa, xb  # the lambdas hold their own references until `timings` is built
    gram = timings["gram_stacked"].median_ms
    rows = [_row(d, f"{pairs}x{tokens}", name, t, vs_gram_stacked=t.median_ms / gram) for name, t in timings.items()]

    # The naive loop on its own, smaller shape (the CPU loop; its input is copied there once).
    a, b, cu = inputs(naive_pairs, naive_tokens, d, dtype, device)
    a_cpu, b_cpu = a.cpu(), b.cpu()
    naive_out = []

    def naive():
        naive_out[:] = [
            naive_prefix_loop(
                a_cpu[p * naive_tokens : (p + 1) * naive_tokens], b_cpu[p * naive_tokens : (p + 1) * naive_tokens]
            )
            for p in range(naive_pairs)
        ]

    small = {
        "naive_loop": timed(naive, "naive_loop", on="cpu"),
        "fused": timed(lambda: pairwise_cosine_stats(a, b, cu, positive=True), "fused"),
        "fused_signed": timed(lambda: pairwise_cosine_stats(a, b, cu, positive=False), "fused_signed"),
    }
    fused = pairwise_cosine_stats(a, b, cu, positive=True)
    want = torch.stack([fused.eq, fused.ab, fused.aa, fused.bb], 1).cpu()
    torch.testing.assert_close(torch.cat(naive_out), want, atol=1e-4, rtol=1e-4, equal_nan=True)
    naive_ms = small["naive_loop"].median_ms
    rows += [
        _row(d, f"{naive_pairs}x{naive_tokens}", name, t, naive_speedup=naive_ms / t.median_ms)
        for name, t in small.items()
    ]
    return rows


def _row(d: int, shape: str, op: str, t, **ratio) -> dict:
    """One table row of a timing (fusedvlm.benchmark.system.Timing), with its ratio column."""
    return dict(
        d=d,
        shape=shape,
        op=op,
        median_ms=t.median_ms,
        iqr_ms=t.iqr_ms,
        warmup=t.warmup,
        repeats=t.repeats,
        **ratio,
        peak_mem_mb=None if t.peak_mem_bytes is None else t.peak_mem_bytes / 2**20,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=800)
    p.add_argument("--dims", type=int, nargs="+", default=[576, 4096])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-pairs", type=int, default=1, help="pairs of the naive loop's shape")
    p.add_argument("--naive-tokens", type=int, default=160, help="tokens per pair of the naive loop's shape")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pairwise_cosine.json")
    )
    args = p.parse_args(argv)
    if min(args.naive_pairs, args.naive_tokens) < 1:
        raise SystemExit(f"--naive-pairs and --naive-tokens must be >= 1, got {args.naive_pairs}, {args.naive_tokens}")
    dtype = DTYPES[args.dtype]
    probe = torch.empty(0, device=args.device)
    rows = []
    for d in args.dims:
        rows += bench_one(
            args.pairs, args.tokens, d, dtype, args.device, args.repeats, args.naive_pairs, args.naive_tokens
        )
    title = (
        f"pairwise_cosine_stats: {args.pairs} pairs x {args.tokens} tokens, {args.dtype}, "
        f"{args.device} ({implementation(probe)} path), {torch.get_num_threads()} threads"
    )
    columns = ["d", "shape", "op", "median_ms", "iqr_ms", "warmup", "repeats", "vs_gram_stacked", "naive_speedup"]
    print_table(rows, [*columns, "peak_mem_mb"], title)
    save_json(args.out, dict(environment=environment(), args=vars(args), backend=implementation(probe), rows=rows))
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
