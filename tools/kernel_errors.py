"""Measured error of every kernel per dtype at its first GPU tile configuration, vs fp64.

Runs the Triton kernels (the interpreter on a CPU, natively on a GPU) on the tile-boundary
shapes of the kernel tests and prints, per (kernel, output, dtype), the max error against the
fp64 reference and that error divided by the reference's own error in the same dtype (the
quantity tests/kernels/tolerances.py bounds with ERROR_RATIO).

    TRITON_INTERPRET=1 FUSEDVLM_BACKEND=auto python -m tools.kernel_errors      # CPU
    python -m tools.kernel_errors                                               # GPU

(run from the checkout root as a module: it reuses the kernel tests' shapes from ``tests/``).
"""

from __future__ import annotations

import sys

import torch

from fusedvlm.backend import force_tiles

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def packed_attention_rows(device):
    from fusedvlm.kernels.packed_attention import TILE_CONFIGS, packed_attention
    from fusedvlm.ref.packed_attention import packed_attention as ref
    from tests.kernels.test_packed_attention import _inputs, _run, tile_boundary_packing

    fwd, bwd = TILE_CONFIGS["packed_attention_fwd"][0], TILE_CONFIGS["packed_attention_bwd"][0]
    lq, lk = tile_boundary_packing(fwd[:2] + bwd[:2])
    for name, dtype in DTYPES.items():
        q, k, v, do, cu_q, cu_k = _inputs(lq, lk, 2, 1, 64, dtype, 0)
        q, k, v, do = (t.to(dtype).double() for t in (q, k, v, do))
        exact = _run(ref, q, k, v, do, cu_q, cu_k, torch.float64)
        same = _run(ref, q, k, v, do, cu_q, cu_k, dtype)
        with force_tiles(packed_attention_fwd=fwd, packed_attention_bwd=bwd):
            dev = [t.to(device) for t in (q, k, v, do, cu_q, cu_k)]
            got = [t.cpu() for t in _run(packed_attention, *dev, dtype)]
        for out, g, r, e in zip(("out", "dq", "dk", "dv"), got, same, exact):
            yield "packed_attention", out, name, (g - e).abs().max().item(), (r - e).abs().max().item()


def local_merge_rows(device):
    from fusedvlm.kernels import local_merge
    from fusedvlm.kernels.local_merge import TILE_CONFIGS
    from fusedvlm.ref.local_merge import local_merge as ref
    from tests.kernels.test_local_merge import _inputs, _run

    for name, dtype in DTYPES.items():
        cfg = TILE_CONFIGS["local_merge"][0 if dtype == torch.float32 else 1]
        c = cfg[1] + 1
        x, w, lf, b, grad = _inputs(2, 11, 11, c, c, True, dtype)
        kw = dict(residual=True, grid=(11, 11))
        exact = _run(ref, *(t.double() for t in (x, w, lf, b, grad)), upcast=False, **kw)
        same = _run(ref, x, w, lf, b, grad, upcast=False, **kw)
        with force_tiles(local_merge=cfg):
            got = _run(local_merge, x, w, lf, b, grad, device=device, **kw)
        for out, g, r, e in zip(("out", "dx", "dweight", "dlf", "dbias"), got, same, exact):
            yield "local_merge", out, name, (g.double() - e).abs().max().item(), (r.double() - e).abs().max().item()


def pairwise_cosine_rows(device):
    from fusedvlm.kernels import PsiStats, pairwise_cosine_stats
    from fusedvlm.kernels.pairwise_cosine import TILE_CONFIGS
    from fusedvlm.ref.pairwise_cosine import pairwise_cosine_stats as ref
    from tests.kernels.test_pairwise_cosine import _pack, _scaled

    row, gram = TILE_CONFIGS["pairwise_cosine_row"][0], TILE_CONFIGS["pairwise_cosine_gram"][0]
    t = gram[0]
    for name, dtype in DTYPES.items():
        a, b, cu = _pack([1, t - 1, t, t + 1, 2 * t + 2], row[1] + 1, 4)
        a, b = a.to(dtype), b.to(dtype)
        exact, same = ref(a, b, cu, upcast=True), ref(a, b, cu, upcast=False)
        with force_tiles(pairwise_cosine_row=row, pairwise_cosine_gram=gram):
            got = PsiStats(*(x.cpu() for x in pairwise_cosine_stats(a.to(device), b.to(device), cu.to(device))))
        for out in PsiStats._fields:
            g, e, r = (_scaled(s, out, exact).nan_to_num() for s in (got, exact, same))
            yield "pairwise_cosine", out, name, (g - e).abs().max().item(), (r - e).abs().max().item()


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'kernel':<18}{'output':<9}{'dtype':<6}{'max |err| vs fp64':>19}{'ref. error':>12}{'ratio':>8}")
    for rows in (local_merge_rows, packed_attention_rows, pairwise_cosine_rows):
        for kernel, out, dtype, err, ref_err in rows(device):
            ratio = err / ref_err if ref_err > 0 else float("nan")
            print(f"{kernel:<18}{out:<9}{dtype:<6}{err:>19.3g}{ref_err:>12.3g}{ratio:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
