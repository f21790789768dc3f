"""Packed (varlen) block-diagonal causal attention: Triton forward + backward, torch CPU path.

Shapes: q (Tq, Hq, D), k/v (Tk, Hkv, D) with Hq = G * Hkv (grouped-query: query head h reads
key/value head h // G); ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 (n + 1,) offsets, key
segments equal to query segments when ``cu_seqlens_k`` is None. Output (Tq, Hq, D) in q's dtype.

Maths, per segment s with Lq queries, Lk >= Lq keys (a cached prefix of Lk - Lq tokens), head h:

    S_ij = scale * q_i . k_j,   visible(i, j) = j <= i + (Lk - Lq)   (bottom-right causal)
    O_i  = sum_j P_ij v_j,      P_ij = exp(S_ij - LSE_i) over visible j,  LSE_i = log sum_j exp(S_ij)

Keys of another segment are never visible, so the pack's T x T mask is block-diagonal. The
kernel never builds it: the forward launches one program per (query tile, query head) from a
tile -> (segment, tile index) table built on the device from ``cu_seqlens`` (searchsorted, no
host sync), and each program loops only over its own segment's key tiles up to its causal limit
(flash-attention-2 online softmax in base 2). Tiles wholly below the diagonal skip the mask.
The row log-sum-exp (base 2) is saved for the backward:

    D_i   = rowsum(dO_i * O_i)
    dP_ij = dO_i . v_j,   dS_ij = P_ij (dP_ij - D_i)
    dV_j  = sum_i P_ij dO_i,   dK_j = scale * sum_i dS_ij q_i,   dQ_i = scale * sum_j dS_ij k_j

One kernel per (key tile, key/value head) accumulates dK/dV over the G query heads of its group
and the query tiles that can see it (no atomics); a second per (query tile, query head) forms dQ.
On the GPU fp16/bf16 operands feed ``tl.dot`` directly (fp32 accumulation; fp32 inputs use IEEE
precision); under ``TRITON_INTERPRET=1`` every load is upcast to fp32 straight away because the
interpreter has no usable bf16 arithmetic.

CPU: the C++ kernel of csrc/packed_attention.inc, one call for the whole pack (parallel over
segment x head x query block, register tiles with the same online softmax; backward parallel
over segment x key/value head). ``bench/bench_packed_attention.py`` compares it with one SDPA
call per segment (``x_vs_sdpa_loop``).

Torch path (``FUSEDVLM_BACKEND=torch``, or no C++ compiler): the reference,
:func:`fusedvlm.ref.packed_attention.packed_attention` (one SDPA call per segment; autograd
flows through SDPA); there is no second torch implementation.

The op (``torch.ops.fusedvlm.packed_attention``, defined at the end of this file) returns
(out, lse); its backward is ``fusedvlm::packed_attention_backward``. Both take the chosen
backend ("cpp" or "triton") as their last argument, and have fake kernels (torch.compile) and
FLOP formulas (FlopCounterMode). Call path: design §10.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from fusedvlm import native
from fusedvlm.backend import autocast_enabled, compute_dtype, forced_tiles, implementation, interpreter_enabled
from fusedvlm.kernels._library import LIB, kernel_backend
from fusedvlm.kernels.common import finite_real, flag, host_offsets, offsets_tensor
from fusedvlm.ref import packed_attention as _reference

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- validation


def check_args(q, k, v, cu_q, cu_k, causal, scale):
    """The one argument check of :func:`packed_attention`, run before any backend is picked.

    Types, shapes, dtypes, the device of every tensor (offsets included) and the scalars. Returns
    (cu_q, cu_k, scale): the offsets contiguous, the scale a float (default D^-1/2). The offsets'
    values are checked once the backend is chosen, once per path: by :func:`check_offset_values`
    on the torch and Triton paths, by the C++ kernel itself on the C++ one."""
    # The usual call passes one combined test (cheaper than a loop over named pairs); a failure
    # is then named by the loop.
    if not (
        isinstance(q, Tensor)
        and isinstance(k, Tensor)
        and isinstance(v, Tensor)
        and q.dim() == 3
        and k.dim() == 3
        and v.dim() == 3
        and q.dtype in _DTYPES
        and k.dtype in _DTYPES
        and v.dtype in _DTYPES
    ):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a (T, H, D) tensor, got {getattr(t, 'shape', type(t))}")
            if t.dtype not in _DTYPES:
                raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    # is_cpu is a flag read; .device builds a device object per call.
    if not (q.is_cpu and k.is_cpu and v.is_cpu) and not (k.device == q.device and v.device == q.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    q_shape, k_shape = q.shape, k.shape
    if k_shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_shape)} and {tuple(v.shape)}")
    head_dim = q_shape[2]
    if head_dim != k_shape[2]:
        raise ValueError(f"head dim of q ({head_dim}) and k/v ({k_shape[2]}) differ")
    if head_dim == 0 or head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{_MAX_HEAD_DIM}, got {head_dim}")
    hq, hkv = q_shape[1], k_shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of key/value heads ({hkv})")
    shared = cu_k is cu_q  # self-attention: one offset tensor, checked once
    cu_q = offsets_tensor(cu_q, "cu_seqlens_q", q, "q")
    if shared:
        cu_k = cu_q
    else:
        cu_k = offsets_tensor(cu_k, "cu_seqlens_k", q, "q")
        if cu_q.numel() != cu_k.numel():
            raise ValueError(
                f"cu_seqlens_q has {cu_q.numel() - 1} segments, cu_seqlens_k {cu_k.numel() - 1}; they must match"
            )
    flag(causal, "causal")
    return cu_q, cu_k, head_dim**-0.5 if scale is None else finite_real(scale, "scale")


def check_offset_values(q, k, cu_q, cu_k, causal) -> None:
    """Every offset value of a CPU call (reading them is free there), for the torch and Triton
    paths; the C++ kernel checks its own with the same messages (csrc/packed_attention.inc), so a
    call it runs reads them once. CUDA offsets are checked once where the pack is built
    (:func:`fusedvlm.packing.check_cu_seqlens`), not by every layer's call; under torch.compile
    the values are not known at trace time, and the op's kernel checks them at run time."""
    if not q.is_cpu or torch.compiler.is_compiling():
        return
    len_q, len_k = q.shape[0], k.shape[0]
    cq = host_offsets(cu_q, "cu_seqlens_q", len_q, "the tensor")
    if cu_k is cu_q and len_k == len_q:
        return  # self-attention: key segments are the query segments
    ck = host_offsets(cu_k, "cu_seqlens_k", len_k, "the tensor")
    if causal:
        for s in range(len(cq) - 1):
            lq, lk = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
            if lk < lq:
                raise ValueError(f"segment {s}: {lk} keys < {lq} queries; a causal segment needs len_k >= len_q")


# --------------------------------------------------------------------------- Triton kernels


@functools.cache
def _kernels(interpret: bool):
    # ``interpret`` keys the cache: triton.jit picks the interpreter when it decorates.
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd_kernel(
        Q,
        K,
        V,
        O,
        LSE,
        CU_Q,
        CU_K,
        TILE_SEG,
        TILE_BLK,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ot,
        stride_oh,
        stride_lh,
        n_seg,
        head_dim,
        qk_scale,
        GROUP: tl.constexpr,
        CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        seg = tl.load(TILE_SEG + pid_t)
        if seg >= n_seg:
            return
        blk = tl.load(TILE_BLK + pid_t)
        q0 = tl.load(CU_Q + seg)
        lq = tl.load(CU_Q + seg + 1) - q0
        k0 = tl.load(CU_K + seg)
        lk = tl.load(CU_K + seg + 1) - k0
        shift = lk - lq
        kvh = h // GROUP
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < lq
        d_valid = offs_d < head_dim
        rows = (q0 + offs_m).to(tl.int64)
        q = tl.load(
            Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=m_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if CAUSAL:
            # Keys every row of this tile sees (no mask needed), then the diagonal band.
            full = tl.minimum(lk, blk * BLOCK_M + shift + 1)
            hi = tl.minimum(lk, (blk + 1) * BLOCK_M + shift)
        else:
            full = lk
            hi = lk
        full = (full // BLOCK_N) * BLOCK_N
        # Tiles every row of this program sees in full: no mask.
        for start_n in range(0, full, BLOCK_N):
            n_idx = start_n + offs_n
            n_valid = n_idx < lk
            krows = (k0 + n_idx).to(tl.int64)
            k = tl.load(
                K + krows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            v = tl.load(
                V + krows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        # The diagonal band and the ragged last tile.
        for start_n in range(full, hi, BLOCK_N):
            n_idx = start_n + offs_n
            n_valid = n_idx < lk
            krows = (k0 + n_idx).to(tl.int64)
            k = tl.load(
                K + krows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            v = tl.load(
                V + krows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            keep = n_valid[None, :]
            if CAUSAL:
                keep = keep & (n_idx[None, :] <= offs_m[:, None] + shift)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet keeps m = -inf; shift by 0 to avoid inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        has_key = l_i > 0.0
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
        tl.store(
            O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=m_valid[:, None] & d_valid[None, :],
        )
        tl.store(LSE + h * stride_lh + q0 + offs_m, lse, mask=m_valid)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        CU_Q,
        CU_K,
        TILE_SEG,
        TILE_BLK,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_dot,
        stride_doh,
        stride_dkt,
        stride_dkh,
        stride_dvt,
        stride_dvh,
        stride_lh,
        n_seg,
        head_dim,
        qk_scale,
        scale,
        GROUP: tl.constexpr,
        CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        kvh = tl.program_id(1)
        seg = tl.load(TILE_SEG + pid_t)
        if seg >= n_seg:
            return
        blk = tl.load(TILE_BLK + pid_t)
        q0 = tl.load(CU_Q + seg)
        lq = tl.load(CU_Q + seg + 1) - q0
        k0 = tl.load(CU_K + seg)
        lk = tl.load(CU_K + seg + 1) - k0
        shift = lk - lq
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_valid = offs_n < lk
        d_valid = offs_d < head_dim
        krows = (k0 + offs_n).to(tl.int64)
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + krows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + krows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = 0
        if CAUSAL:
            # First query row that sees key blk * BLOCK_N is that index minus the prefix length.
            lo = tl.maximum(blk * BLOCK_N - shift, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
        for g in range(GROUP):
            h = kvh * GROUP + g
            for start_m in range(lo, lq, BLOCK_M):
                offs_m = start_m + offs_m0
                m_valid = offs_m < lq
                qrows = (q0 + offs_m).to(tl.int64)
                q_mask = m_valid[:, None] & d_valid[None, :]
                q = tl.load(Q + qrows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(
                    DO + qrows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0
                )
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSE + h * stride_lh + q0 + offs_m, mask=m_valid, other=float("inf"))
                delta = tl.load(DELTA + h * stride_lh + q0 + offs_m, mask=m_valid, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                keep = m_valid[:, None] & n_valid[None, :]
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
                p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dk = dk * scale
        tl.store(
            DK + krows[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=kv_mask,
        )
        tl.store(
            DV + krows[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=kv_mask,
        )

    @triton.jit
    def _bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ,
        CU_Q,
        CU_K,
        TILE_SEG,
        TILE_BLK,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_dot,
        stride_doh,
        stride_dqt,
        stride_dqh,
        stride_lh,
        n_seg,
        head_dim,
        qk_scale,
        scale,
        GROUP: tl.constexpr,
        CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        seg = tl.load(TILE_SEG + pid_t)
        if seg >= n_seg:
            return
        blk = tl.load(TILE_BLK + pid_t)
        q0 = tl.load(CU_Q + seg)
        lq = tl.load(CU_Q + seg + 1) - q0
        k0 = tl.load(CU_K + seg)
        lk = tl.load(CU_K + seg + 1) - k0
        shift = lk - lq
        kvh = h // GROUP
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < lq
        d_valid = offs_d < head_dim
        qrows = (q0 + offs_m).to(tl.int64)
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + qrows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + qrows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + h * stride_lh + q0 + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(DELTA + h * stride_lh + q0 + offs_m, mask=m_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if CAUSAL:
            hi = tl.minimum(lk, (blk + 1) * BLOCK_M + shift)
        else:
            hi = lk
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_valid = offs_n < lk
            krows = (k0 + offs_n).to(tl.int64)
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + krows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + krows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            keep = m_valid[:, None] & n_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * scale
        tl.store(
            DQ + qrows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask
        )

    return _fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel


# --------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter runs one numpy program per tile, so
# small tiles keep its per-step cost low and exercise multi-tile loops on tiny test shapes.
_INTERPRET_BLOCKS = (16, 16, 1, 1)
# GPU candidates, fastest first; the first whose tiles fit the shared-memory budget is used,
# else the last resort.
_FWD_BLOCKS = ((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1))
_BWD_BLOCKS = ((64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1), (16, 32, 4, 1))
_LAST_RESORT_BLOCKS = (16, 16, 4, 1)
# Every configuration a GPU launch can run, per launch (fusedvlm.backend.force_tiles names).
TILE_CONFIGS = {
    "packed_attention_fwd": _FWD_BLOCKS + (_LAST_RESORT_BLOCKS,),
    "packed_attention_bwd": _BWD_BLOCKS + (_LAST_RESORT_BLOCKS,),
}
# Shared memory per SM ranges from ~100 KB (sm_86 / sm_89) to 228 KB (H100); 96 KB of tiles
# leaves room for Triton's own layout-conversion scratch on all of them.
_SMEM_BUDGET = 96 * 1024


def _block_config(head_dim: int, elem_bytes: int, backward: bool) -> tuple[int, int, int, int]:
    forced = forced_tiles("packed_attention_bwd" if backward else "packed_attention_fwd")
    if forced is not None:
        return forced
    if interpreter_enabled():
        return _INTERPRET_BLOCKS
    d = max(16, 1 << (head_dim - 1).bit_length())
    for bm, bn, warps, stages in _BWD_BLOCKS if backward else _FWD_BLOCKS:
        if backward:
            # Two resident tiles (k, v or q, dO) plus two streamed ones per pipeline stage.
            big = max(bm, bn)
            smem = (2 + 2 * stages) * big * d * elem_bytes
        else:
            # The resident q tile plus k and v tiles per pipeline stage.
            smem = (bm + 2 * bn * stages) * d * elem_bytes
        if smem <= _SMEM_BUDGET:
            return bm, bn, warps, stages
    return _LAST_RESORT_BLOCKS


def _tile_table(
    cu: torch.Tensor, total: int, block: int, max_seqlen: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every tile of every segment -> (segment, tile index in the segment), built on device.

    The grid size is the bound cdiv(total, block) + n >= sum_s cdiv(L_s, block), known from the
    tensor shapes (or n * cdiv(max_seqlen, block) when the caller knows the longest segment and
    that is smaller), so no offset comes back to the host; programs past the last tile read
    segment n and exit.
    """
    n = cu.numel() - 1
    grid = -(-total // block) + n
    if max_seqlen is not None:
        grid = min(grid, n * -(-max_seqlen // block))
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    cu_tiles = torch.zeros(n + 1, dtype=torch.int64, device=cu.device)
    torch.cumsum((lens + block - 1) // block, 0, out=cu_tiles[1:])
    t = torch.arange(grid, dtype=torch.int64, device=cu.device)
    seg = torch.searchsorted(cu_tiles[1:], t, right=True)
    blk = t - cu_tiles[seg.clamp(max=n)]
    return seg.to(torch.int32), blk.to(torch.int32), grid


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _inner_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_forward(q, k, v, cu_q, cu_k, causal, scale, max_seqlen_q=None):
    import triton

    fwd, _, _ = _kernels(interpreter_enabled())
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()  # indexed without strides
    tq, hq, d = q.shape
    group = hq // k.shape[1]
    block_m, block_n, warps, stages = _block_config(d, q.element_size(), backward=False)
    out = q.new_empty(q.shape)
    lse = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    if tq == 0:
        return out, lse
    seg, blk, grid = _tile_table(cu_q, tq, block_m, max_seqlen_q)
    fwd[(grid, hq)](
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        seg,
        blk,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        cu_q.numel() - 1,
        d,
        scale * _LOG2E,
        GROUP=group,
        CAUSAL=causal,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        UPCAST=interpreter_enabled(),
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return out, lse


def _triton_backward(do, q, k, v, out, lse, cu_q, cu_k, causal, scale, max_seqlen_q=None, max_seqlen_k=None):
    import triton

    _, dkdv, dqk = _kernels(interpreter_enabled())
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()  # indexed without strides
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    group = hq // hkv
    block_m, block_n, warps, stages = _block_config(d, q.element_size(), backward=True)
    do = _inner_contig(do)
    # delta_i = rowsum(dO_i * O_i), laid out like lse: (Hq, Tq) fp32.
    delta = (do.float() * out.float()).sum(-1).transpose(0, 1).contiguous()
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    n_seg = cu_q.numel() - 1
    common = dict(
        GROUP=group,
        CAUSAL=causal,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        UPCAST=interpreter_enabled(),
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    if tk:
        seg, blk, grid = _tile_table(cu_k, tk, block_n, max_seqlen_k)
        dkdv[(grid, hkv)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            cu_q,
            cu_k,
            seg,
            blk,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            do.stride(0),
            do.stride(1),
            dk.stride(0),
            dk.stride(1),
            dv.stride(0),
            dv.stride(1),
            lse.stride(0),
            n_seg,
            d,
            scale * _LOG2E,
            scale,
            **common,
        )
    if tq:
        seg, blk, grid = _tile_table(cu_q, tq, block_m, max_seqlen_q)
        dqk[(grid, hq)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            cu_q,
            cu_k,
            seg,
            blk,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            do.stride(0),
            do.stride(1),
            dq.stride(0),
            dq.stride(1),
            lse.stride(0),
            n_seg,
            d,
            scale * _LOG2E,
            scale,
            **common,
        )
    return dq, dk, dv


# --------------------------------------------------------------------------- fusedvlm:: operator

LIB.define(
    "packed_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "int? max_seqlen_q, int? max_seqlen_k, bool causal, float scale, str backend) -> (Tensor, Tensor)"
)
LIB.define(
    "packed_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int? max_seqlen_q, int? max_seqlen_k, bool causal, float scale, "
    "str backend) "
    "-> (Tensor, Tensor, Tensor)"
)
# The public function's op, looked up once rather than through torch.ops on every call.
_OP = torch.ops.fusedvlm.packed_attention.default


def _forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    if kernel_backend(backend, q.device) == "cpp":
        return native.load().packed_attention_fwd_cpu(q, k, v, cu_q, cu_k, causal, scale)
    return _triton_forward(_inner_contig(q), _inner_contig(k), _inner_contig(v), cu_q, cu_k, causal, scale, max_q)


def _backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    if kernel_backend(backend, q.device) == "cpp":
        return native.load().packed_attention_bwd_cpu(do, q, k, v, out, lse, cu_q, cu_k, causal, scale)
    return _triton_backward(
        do, _inner_contig(q), _inner_contig(k), _inner_contig(v), out, lse, cu_q, cu_k, causal, scale, max_q, max_k
    )


for _key in ("CPU", "CUDA"):
    LIB.impl("packed_attention", _forward, _key)
    LIB.impl("packed_attention_backward", _backward, _key)


def _same_device(*tensors: torch.Tensor) -> None:
    # A meta tensor among CPU ones sends the call here rather than to the CPU kernel; without
    # this check it would return uninitialised CPU memory.
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"fusedvlm::packed_attention: tensors on different devices {[str(t.device) for t in tensors]}")


@torch.library.register_fake("fusedvlm::packed_attention", lib=LIB)
def _forward_fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    _same_device(q, k, v, cu_q, cu_k)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("fusedvlm::packed_attention_backward", lib=LIB)
def _backward_fake(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    _same_device(do, q, k, v, out, lse, cu_q, cu_k)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, backend)
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.fusedvlm.packed_attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("fusedvlm::packed_attention", _autograd_backward, setup_context=_setup_context, lib=LIB)


def causal_pairs(len_q: int, len_k: int, bottom_right: bool = True) -> int:
    """Unmasked (query, key) pairs of one causal segment.

    Bottom-right (flash-attn / packed attention): query i of len_q sees len_k - len_q + i + 1
    keys. Top-left (SDPA ``is_causal``): query i sees min(i + 1, len_k) keys."""
    if len_q < 0 or len_k < 0:
        raise ValueError(f"negative segment length ({len_q}, {len_k})")
    if bottom_right:
        if len_k < len_q:
            raise ValueError(f"bottom-right causal needs len_k >= len_q, got {len_k} < {len_q}")
        return len_q * (len_k - len_q) + len_q * (len_q + 1) // 2
    full = min(len_q, len_k)
    return full * (full + 1) // 2 + (len_q - full) * len_k


def packed_attention_flops(cu_q, cu_k, heads: int, head_dim: int, causal: bool = True) -> int:
    """Forward FLOPs over packed segments: QK^T and PV, 2 * D each per visible pair and head."""
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    pairs = 0
    for s in range(len(cu_q) - 1):
        lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        pairs += causal_pairs(lq, lk) if causal else lq * lk
    return 4 * heads * head_dim * pairs


@register_flop_formula(torch.ops.fusedvlm.packed_attention, get_raw=True)
def _forward_flops(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, out_val=None) -> int:
    return packed_attention_flops(cu_q.tolist(), cu_k.tolist(), q.shape[1], q.shape[2], causal)


@register_flop_formula(torch.ops.fusedvlm.packed_attention_backward, get_raw=True)
def _backward_flops(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, backend, out_val=None) -> int:
    # dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: twice the forward (torch's convention
    # for SDPA; the recomputed Q K^T is not counted).
    return 2 * packed_attention_flops(cu_q.tolist(), cu_k.tolist(), q.shape[1], q.shape[2], causal)


# --------------------------------------------------------------------------- public op


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Block-diagonal (bottom-right causal) attention over a packed stream.

    q (Tq, Hq, D), k/v (Tk, Hkv, D), cu_seqlens_* int32 (n + 1,) -> (Tq, Hq, D), softmax(scale
    q k^T) v for any finite ``scale`` (default D^-1/2); a NaN in a row's inputs gives NaN in that
    row on every path. Runs ``torch.ops.fusedvlm.packed_attention`` (Triton on CUDA or under
    ``TRITON_INTERPRET=1``, the C++ kernel on CPU), or the reference where neither is available
    or ``FUSEDVLM_BACKEND=torch``, as :func:`fusedvlm.backend.implementation` decides. ``max_seqlen_*``, the
    longest segment, is optional as in flash-attn: on CUDA it can shrink the launch grid.

    Computes (and returns) in :func:`fusedvlm.backend.compute_dtype` of q, k, v: the autocast
    dtype under autocast, else the widest of theirs; softmax statistics stay fp32.

    Every call runs :func:`check_args` first, whichever backend then runs it. Offset values are
    checked for CPU tensors once per call, by the C++ kernel where it runs, else by
    :func:`check_offset_values`; for CUDA tensors once where the pack is built
    (:func:`fusedvlm.packing.check_cu_seqlens`), not in every call.
    """

    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    cu_seqlens_q, cu_seqlens_k, scale = check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    if not (q.dtype == k.dtype == v.dtype) or autocast_enabled(q):
        # Mixed inputs (e.g. RoPE'd q/k in fp32 next to a bf16 v under autocast) meet in one
        # dtype the way SDPA's do; the casts are differentiable, so gradients return in each input's.
        dtype = compute_dtype(q, k, v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    backend = implementation(q)
    if backend != "cpp":  # the C++ kernel checks the offset values itself
        check_offset_values(q, k, cu_seqlens_q, cu_seqlens_k, causal)
        if backend == "torch":
            return _reference.packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale)
    return _OP(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend)[0]
