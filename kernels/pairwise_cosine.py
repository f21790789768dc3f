"""Prefix psi / divergence statistics of paired hidden states (design §8).

Shapes: h_a, h_b (T, d), the two branches of every pair packed with the same ``cu_seqlens``
(int32 (n + 1,) offsets; a pair is cut to its shorter branch before packing). Returns
:class:`PsiStats` with fields eq, ab, aa, bb, div, each (T,) float32: the value at token t is
the statistic of the prefix of its pair that ends at t, of length n = position in pair + 1.

Maths, per pair, with unit rows a^_i = a_i / ||a_i|| (a zero row stays zero, so its cosines
are 0) and f = max(0, .) when ``positive`` else the identity:

    eq(n)  = E(n) / n,                    E(n) = sum_{i<=n} f(a^_i . b^_i)
    ab(n)  = S_ab(n) / (n (n - 1)),       S_ab(n) = sum_{i!=j<=n} f(a^_i . b^_j)
    aa(n)  = S_aa(n) / (n (n - 1)),       bb likewise;  the cross terms are NaN at n = 1
    div(n) = || sum_{i<=n} (a_i - b_i) ||_2

Every prefix sum is a running sum of per-row increments, which is what makes all prefix
lengths one pass over the strict lower triangle of the Gram matrices:

    S_ab(k) - S_ab(k-1) = sum_{j<k} f(a^_k . b^_j) + sum_{j<k} f(b^_k . a^_j)
    S_aa(k) - S_aa(k-1) = 2 sum_{j<k} f(a^_k . a^_j)            (f(c) is symmetric), bb alike

Triton (CUDA, or ``TRITON_INTERPRET=1``), two launches:

* a row kernel, one program per (pair, d-chunk): per-token partial sums of |a|^2, |b|^2,
  a . b and |prefix sum of (a - b)|^2 (``tl.cumsum`` over a row block plus a carried chunk
  sum) -> norms, eq terms and div after a sum over the few d-chunks;
* a Gram kernel, one program per (row tile, pair) from a tile -> (pair, tile) table built on
  the device: it loops over the pair's column tiles j <= i, forms the four tiles A_I B_J^T,
  B_I A_J^T, A_I A_J^T, B_I B_J^T with ``tl.dot`` (fp32 accumulation over d-chunks), scales
  them by the inverse norms, applies f and reduces the strict lower triangle into the three
  per-row increments. Memory is O(T d) in, O(T) out: no n x n matrix reaches global memory.

A per-pair cumulative sum of the increments (torch, float64) then gives every prefix. On the
GPU fp16/bf16 operands feed ``tl.dot`` directly (fp32 inputs use IEEE precision); under the
interpreter every load is upcast to fp32 at once (no usable bf16 arithmetic there).

CPU: the C++ kernel of csrc/pairwise_cosine.inc (the same tiles, one SGEMM per lower-triangle
tile pair of interleaved unit rows, parallel over tiles), else this torch path:

* ``positive=True``: the same increments, per pair, from one matmul per lower-triangle tile
  pair of the stacked unit rows [A_I; B_I] [A_J; B_J]^T (a (2 t) x (2 t) block holding all four
  Gram tiles), so memory stays O(T d + t^2) with t = 256;
* ``positive=False``: no Gram product at all; with prefix sums SA(n) = sum_{i<=n} a^_i (float64)

      S_ab(n) = SA(n) . SB(n) - E(n),   S_aa(n) = |SA(n)|^2 - sum_{i<=n} |a^_i|^2,

  which is O(n d) per pair and agrees with the pairwise form.

These are statistics, not training signals: nothing here is differentiable and the outputs
carry no autograd history.
"""

from __future__ import annotations

import functools

import torch

from fusedvlm import native
from fusedvlm.backend import forced_tiles, implementation, interpreter_enabled
from fusedvlm.kernels._library import LIB, kernel_backend
from fusedvlm.kernels.common import PsiStats, flag, host_offsets, offsets_tensor, unit_rows

__all__ = ["PsiStats", "pairwise_cosine_stats"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tile of the CPU path: a (2t x d) @ (d x 2t) product is large enough to run near the matmul
# peak on one core and small enough that the t^2 tiles stay in cache.
_TORCH_TILE = 256


# --------------------------------------------------------------------------- validation


def check_args(h_a, h_b, cu_seqlens, positive) -> tuple[torch.Tensor, bool]:
    """The one argument check of :func:`pairwise_cosine_stats`, run before any backend is picked:
    types, shapes, dtypes, devices (offsets included), ``positive``, and every offset value (one
    read; statistics are not a per-layer hot path). Returns the offsets contiguous."""
    for name, t in (("h_a", h_a), ("h_b", h_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a (T, d) tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if h_a.shape != h_b.shape:
        raise ValueError(
            f"h_a and h_b must have one shape (pairs cut to the shorter branch), got {tuple(h_a.shape)} and {tuple(h_b.shape)}"
        )
    if h_a.device != h_b.device:
        raise ValueError(f"h_a and h_b must be on one device, got {h_a.device} and {h_b.device}")
    if h_a.shape[1] == 0:
        raise ValueError("hidden size d must be >= 1, got 0")
    cu_seqlens = offsets_tensor(cu_seqlens, "cu_seqlens", h_a, "h_a")
    positive = flag(positive, "positive")
    if h_a.device.type != "meta" and not torch.compiler.is_compiling():
        host_offsets(cu_seqlens, "cu_seqlens", h_a.shape[0], "the pack")
    return cu_seqlens, positive


# --------------------------------------------------------------------------- shared helpers


def _finish(eq_sum, ab_sum, aa_sum, bb_sum, div, n) -> PsiStats:
    """Prefix sums (float64) and prefix lengths -> the means of :class:`PsiStats`."""
    pairs = n * (n - 1)
    safe = torch.where(pairs > 0, pairs, 1)

    def cross(s):
        return torch.where(pairs > 0, s / safe, float("nan")).float()

    return PsiStats(eq=(eq_sum / n).float(), ab=cross(ab_sum), aa=cross(aa_sum), bb=cross(bb_sum), div=div.float())


# --------------------------------------------------------------------------- torch path


def _torch_segment(a: torch.Tensor, b: torch.Tensor, positive: bool) -> PsiStats:
    """Statistics of one pair of length n >= 1 (float32 inputs)."""
    n = a.shape[0]
    ua, ub = unit_rows(a), unit_rows(b)
    eq_terms = (ua * ub).sum(1)
    div = torch.linalg.vector_norm((a.double() - b.double()).cumsum(0), dim=1)
    m = torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
    if positive:
        eq_terms = eq_terms.clamp_min(0)
        inc = torch.zeros(2, n, 2, dtype=torch.float32, device=a.device)
        t = _TORCH_TILE
        tiles = [torch.cat([ua[i : i + t], ub[i : i + t]]) for i in range(0, n, t)]
        for ti, xi in enumerate(tiles):
            bi = xi.shape[0] // 2
            for tj in range(ti + 1):
                xj = tiles[tj]
                bj = xj.shape[0] // 2
                g = (xi @ xj.T).clamp_min_(0).view(2, bi, 2, bj)
                if tj == ti:
                    # Select, not multiply: a NaN above the diagonal must not reach earlier rows.
                    lower = torch.ones(bi, bj, dtype=torch.bool, device=a.device).tril_(-1)[None, :, None, :]
                    g = torch.where(lower, g, 0.0)
                inc[:, ti * t : ti * t + bi] += g.sum(-1)
        inc = inc.double()
        ab_sum = (inc[0, :, 1] + inc[1, :, 0]).cumsum(0)
        aa_sum = 2 * inc[0, :, 0].cumsum(0)
        bb_sum = 2 * inc[1, :, 1].cumsum(0)
        eq_sum = eq_terms.double().cumsum(0)
    else:
        sa, sb = ua.double().cumsum(0), ub.double().cumsum(0)
        eq_sum = eq_terms.double().cumsum(0)
        ab_sum = torch.linalg.vecdot(sa, sb) - eq_sum
        aa_sum = torch.linalg.vecdot(sa, sa) - torch.linalg.vecdot(ua, ua).double().cumsum(0)
        bb_sum = torch.linalg.vecdot(sb, sb) - torch.linalg.vecdot(ub, ub).double().cumsum(0)
    return _finish(eq_sum, ab_sum, aa_sum, bb_sum, div, m)


def _torch_pairwise_cosine_stats(h_a, h_b, cu_seqlens, positive: bool) -> PsiStats:
    total = h_a.shape[0]
    out = [torch.empty(total, dtype=torch.float32, device=h_a.device) for _ in PsiStats._fields]
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        if hi > lo:
            stats = _torch_segment(h_a[lo:hi].float(), h_b[lo:hi].float(), positive)
            for dst, src in zip(out, stats):
                dst[lo:hi] = src
    return PsiStats(*out)


# --------------------------------------------------------------------------- Triton kernels


@functools.cache
def _kernels(interpret: bool):
    # ``interpret`` keys the cache: triton.jit picks the interpreter when it decorates.
    import triton
    import triton.language as tl

    @triton.jit
    def _row_kernel(
        A, B, PART, CU, stride_a, stride_b, stride_pk, stride_pc, d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        seg = tl.program_id(0)
        chunk = tl.program_id(1)
        start = tl.load(CU + seg)
        n = tl.load(CU + seg + 1) - start
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        d_valid = offs_d < d
        carry = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r0 in range(0, n, BLOCK_M):
            r_valid = r0 + offs_m < n
            rows = (start + r0 + offs_m).to(tl.int64)
            mask = r_valid[:, None] & d_valid[None, :]
            a = tl.load(A + rows[:, None] * stride_a + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            b = tl.load(B + rows[:, None] * stride_b + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            diff = a - b
            prefix = tl.cumsum(diff, 0) + carry[None, :]
            carry += tl.sum(diff, 0)
            base = PART + chunk * stride_pc + rows
            tl.store(base, tl.sum(a * a, 1), mask=r_valid)
            tl.store(base + stride_pk, tl.sum(b * b, 1), mask=r_valid)
            tl.store(base + 2 * stride_pk, tl.sum(a * b, 1), mask=r_valid)
            tl.store(base + 3 * stride_pk, tl.sum(prefix * prefix, 1), mask=r_valid)

    @triton.jit
    def _gram_kernel(
        A,
        B,
        INV_A,
        INV_B,
        INC,
        CU,
        TILE_SEG,
        TILE_BLK,
        stride_a,
        stride_b,
        stride_inc,
        n_seg,
        d,
        POSITIVE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        seg = tl.load(TILE_SEG + pid)
        if seg >= n_seg:
            return
        r0 = tl.load(TILE_BLK + pid) * BLOCK_M
        start = tl.load(CU + seg)
        n = tl.load(CU + seg + 1) - start
        offs_m = r0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < n
        rows = (start + offs_m).to(tl.int64)
        inv_ai = tl.load(INV_A + rows, mask=m_valid, other=0.0)
        inv_bi = tl.load(INV_B + rows, mask=m_valid, other=0.0)
        inc_ab = tl.zeros((BLOCK_M,), dtype=tl.float32)
        inc_aa = tl.zeros((BLOCK_M,), dtype=tl.float32)
        inc_bb = tl.zeros((BLOCK_M,), dtype=tl.float32)
        hi = tl.minimum(r0 + BLOCK_M, n)
        for c0 in range(0, hi, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            n_valid = offs_n < n
            cols = (start + offs_n).to(tl.int64)
            g_ab = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            g_ba = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            g_aa = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            g_bb = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, d, BLOCK_D):
                offs_d = k0 + tl.arange(0, BLOCK_D)
                d_valid = offs_d < d
                mi = m_valid[:, None] & d_valid[None, :]
                mj = n_valid[:, None] & d_valid[None, :]
                ai = tl.load(A + rows[:, None] * stride_a + offs_d[None, :], mask=mi, other=0.0)
                bi = tl.load(B + rows[:, None] * stride_b + offs_d[None, :], mask=mi, other=0.0)
                aj = tl.load(A + cols[:, None] * stride_a + offs_d[None, :], mask=mj, other=0.0)
                bj = tl.load(B + cols[:, None] * stride_b + offs_d[None, :], mask=mj, other=0.0)
                if UPCAST:
                    ai = ai.to(tl.float32)
                    bi = bi.to(tl.float32)
                    aj = aj.to(tl.float32)
                    bj = bj.to(tl.float32)
                aj_t = tl.trans(aj)
                bj_t = tl.trans(bj)
                g_ab = tl.dot(ai, bj_t, g_ab, input_precision=PRECISION)
                g_ba = tl.dot(bi, aj_t, g_ba, input_precision=PRECISION)
                g_aa = tl.dot(ai, aj_t, g_aa, input_precision=PRECISION)
                g_bb = tl.dot(bi, bj_t, g_bb, input_precision=PRECISION)
            inv_aj = tl.load(INV_A + cols, mask=n_valid, other=0.0)
            inv_bj = tl.load(INV_B + cols, mask=n_valid, other=0.0)
            c_ab = g_ab * inv_ai[:, None] * inv_bj[None, :]
            c_ba = g_ba * inv_bi[:, None] * inv_aj[None, :]
            c_aa = g_aa * inv_ai[:, None] * inv_aj[None, :]
            c_bb = g_bb * inv_bi[:, None] * inv_bj[None, :]
            if POSITIVE:
                # Not tl.maximum: it drops NaN on the GPU, and a NaN cosine must propagate.
                c_ab = tl.where(c_ab < 0.0, 0.0, c_ab)
                c_ba = tl.where(c_ba < 0.0, 0.0, c_ba)
                c_aa = tl.where(c_aa < 0.0, 0.0, c_aa)
                c_bb = tl.where(c_bb < 0.0, 0.0, c_bb)
            # Strictly below the diagonal; a valid row implies every such column is valid.
            lower = offs_n[None, :] < offs_m[:, None]
            inc_ab += tl.sum(tl.where(lower, c_ab + c_ba, 0.0), 1)
            inc_aa += tl.sum(tl.where(lower, c_aa, 0.0), 1)
            inc_bb += tl.sum(tl.where(lower, c_bb, 0.0), 1)
        tl.store(INC + rows, inc_ab, mask=m_valid)
        tl.store(INC + stride_inc + rows, 2.0 * inc_aa, mask=m_valid)
        tl.store(INC + 2 * stride_inc + rows, 2.0 * inc_bb, mask=m_valid)

    return _row_kernel, _gram_kernel


# --------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of the Gram kernel, and the row kernel's
# (BLOCK_M, BLOCK_D). The interpreter runs one numpy program per tile: small tiles keep its
# per-step cost low and exercise multi-tile loops on tiny test shapes.
_INTERPRET_GRAM = (16, 16, 32, 1, 1)
_GPU_GRAM = (64, 64, 32, 8, 2)
_INTERPRET_ROW = (16, 32)
_GPU_ROW = (32, 64)
# Every configuration a GPU launch can run (fusedvlm.backend.force_tiles names).
TILE_CONFIGS = {"pairwise_cosine_row": (_GPU_ROW,), "pairwise_cosine_gram": (_GPU_GRAM,)}


def _tile_table(cu: torch.Tensor, total: int, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every row tile of every pair -> (pair, tile index in the pair), built on the device.

    The grid size cdiv(total, block) + n bounds sum_s cdiv(L_s, block) from the shapes alone,
    so no offset comes back to the host; programs past the last tile read pair n and exit.
    """
    n = cu.numel() - 1
    grid = -(-total // block) + n
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    cu_tiles = torch.zeros(n + 1, dtype=torch.int64, device=cu.device)
    torch.cumsum((lens + block - 1) // block, 0, out=cu_tiles[1:])
    t = torch.arange(grid, dtype=torch.int64, device=cu.device)
    seg = torch.searchsorted(cu_tiles[1:], t, right=True)
    blk = t - cu_tiles[seg.clamp(max=n)]
    return seg.to(torch.int32), blk.to(torch.int32), grid


def _segment_cumsum(x: torch.Tensor, cu: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """(..., T) -> float64 running sums that restart at every pair."""
    c = x.double().cumsum(-1)
    starts = cu[:-1].to(torch.int64)
    base = torch.where(starts > 0, c[..., (starts - 1).clamp_min(0)], 0.0)
    return c - base[..., seg]


def _pow2_scaled(x: torch.Tensor) -> torch.Tensor:
    """x * 2^-e per row with 2^e the power of two at or below max|entry| (NaN and inf rows: NaN)."""
    amax = x.abs().amax(1, keepdim=True).float()
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)), 0.0)
    return (x.float() * torch.exp2(-exponent)).to(x.dtype)


def _triton_pairwise_cosine_stats(h_a, h_b, cu_seqlens, positive: bool) -> PsiStats:
    import triton

    interpret = interpreter_enabled()
    row_kernel, gram_kernel = _kernels(interpret)
    total, d = h_a.shape
    dev = h_a.device
    if total == 0:
        return PsiStats(*(torch.empty(0, dtype=torch.float32, device=dev) for _ in PsiStats._fields))
    n_seg = cu_seqlens.numel() - 1
    cu_seqlens = cu_seqlens.contiguous()  # indexed without strides

    rbm, rbd = forced_tiles("pairwise_cosine_row") or (_INTERPRET_ROW if interpret else _GPU_ROW)
    chunks = triton.cdiv(d, rbd)

    def rows(x, y):
        x = x if x.stride(1) == 1 else x.contiguous()
        y = y if y.stride(1) == 1 else y.contiguous()
        part = torch.empty((4, chunks, total), dtype=torch.float32, device=dev)
        row_kernel[(n_seg, chunks)](
            x,
            y,
            part,
            cu_seqlens,
            x.stride(0),
            y.stride(0),
            part.stride(0),
            part.stride(1),
            d,
            BLOCK_M=rbm,
            BLOCK_D=rbd,
        )
        return x, y, part.sum(1)

    # Cosines come from rows scaled by a power of two near 1 / max|entry| (exact, direction
    # unchanged), so fp32 squares of rows of 1e20 or 1e-30 neither overflow nor underflow; the
    # divergence needs the rows as given.
    a, b, (sq_a, sq_b, dot_ab, _) = rows(_pow2_scaled(h_a), _pow2_scaled(h_b))
    div_sq = rows(h_a, h_b)[2][3]
    norm_a, norm_b = sq_a.sqrt(), sq_b.sqrt()
    # A zero row has cosine 0; a NaN row keeps NaN (1 / NaN).
    inv_a = torch.where(norm_a == 0, 0.0, 1.0 / norm_a)
    inv_b = torch.where(norm_b == 0, 0.0, 1.0 / norm_b)
    eq_terms = dot_ab * inv_a * inv_b
    if positive:
        eq_terms = eq_terms.clamp_min(0)

    bm, bn, bd, warps, stages = forced_tiles("pairwise_cosine_gram") or (_INTERPRET_GRAM if interpret else _GPU_GRAM)
    inc = torch.empty((3, total), dtype=torch.float32, device=dev)
    tile_seg, tile_blk, grid = _tile_table(cu_seqlens, total, bm)
    gram_kernel[(grid,)](
        a,
        b,
        inv_a,
        inv_b,
        inc,
        cu_seqlens,
        tile_seg,
        tile_blk,
        a.stride(0),
        b.stride(0),
        inc.stride(0),
        n_seg,
        d,
        POSITIVE=positive,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        UPCAST=interpret,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(n_seg, device=dev), lengths, output_size=total)
    n = (torch.arange(total, device=dev) - cu_seqlens[:-1].to(torch.int64)[seg] + 1).double()
    sums = _segment_cumsum(torch.cat([eq_terms[None], inc]), cu_seqlens, seg)
    return _finish(sums[0], sums[1], sums[2], sums[3], div_sq.sqrt(), n)


# --------------------------------------------------------------------------- fusedvlm:: operator

LIB.define(
    "pairwise_cosine_stats(Tensor h_a, Tensor h_b, Tensor cu_seqlens, bool positive, str backend) "
    "-> (Tensor eq, Tensor ab, Tensor aa, Tensor bb, Tensor div)"
)
# The public function's op, looked up once rather than through torch.ops on every call.
_OP = torch.ops.fusedvlm.pairwise_cosine_stats.default


def _stats(h_a, h_b, cu_seqlens, positive, backend):
    if kernel_backend(backend, h_a.device) == "cpp":
        return native.load().pairwise_cosine_stats_cpu(h_a, h_b, cu_seqlens, positive)
    return tuple(_triton_pairwise_cosine_stats(h_a, h_b, cu_seqlens, positive))


LIB.impl("pairwise_cosine_stats", _stats, "CPU")
LIB.impl("pairwise_cosine_stats", _stats, "CUDA")


@torch.library.register_fake("fusedvlm::pairwise_cosine_stats", lib=LIB)
def _stats_fake(h_a, h_b, cu_seqlens, positive, backend):
    # A meta tensor among CPU ones sends the call here rather than to the CPU kernel; without
    # this check it would return uninitialised CPU memory.
    if len({h_a.device, h_b.device, cu_seqlens.device}) != 1:
        raise ValueError(
            f"fusedvlm::pairwise_cosine_stats: tensors on different devices {h_a.device}, {h_b.device}, {cu_seqlens.device}"
        )
    return tuple(h_a.new_empty(h_a.shape[0], dtype=torch.float32) for _ in PsiStats._fields)


# --------------------------------------------------------------------------- public op


def pairwise_cosine_stats(
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    positive: bool = True,
) -> PsiStats:
    """Prefix psi statistics and divergence of every pair, for every prefix length.

    h_a, h_b: (T, d) float32/float16/bfloat16, packed with ``cu_seqlens`` (int32 (n + 1,)).
    Returns :class:`PsiStats` of (T,) float32 tensors (see the module docstring); the cross
    terms ab, aa, bb are NaN at the first token of every pair, and every statistic whose
    prefix holds a NaN row is NaN. Runs ``torch.ops.fusedvlm.pairwise_cosine_stats`` (Triton on
    CUDA or under the interpreter, C++ on CPU) or the torch path, as
    :func:`fusedvlm.backend.implementation` decides.
    """
    if isinstance(h_a, torch.Tensor) and isinstance(h_b, torch.Tensor) and h_a.dtype != h_b.dtype:
        # Statistics, not activations: mixed branches meet in the wider dtype, autocast or not.
        common = torch.promote_types(h_a.dtype, h_b.dtype)
        h_a, h_b = h_a.to(common), h_b.to(common)
    cu_seqlens, positive = check_args(h_a, h_b, cu_seqlens, positive)
    backend = implementation(h_a)
    with torch.no_grad():  # statistics, never differentiated
        if backend == "torch":
            return _torch_pairwise_cosine_stats(h_a, h_b, cu_seqlens, positive)
        return PsiStats(*_OP(h_a, h_b, cu_seqlens, positive, backend))
