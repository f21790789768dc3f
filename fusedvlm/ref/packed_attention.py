"""Reference packed attention: one SDPA call per segment, clear over fast.

q (Tq, Hq, D), k/v (Tk, Hkv, D), Hq a multiple of Hkv (grouped-query attention).
``cu_seqlens_q`` / ``cu_seqlens_k`` are int32 (n + 1,) offsets; without ``cu_seqlens_k``
key segments equal query segments. Causality is aligned bottom-right as in flash-attn's
varlen API: with Lq queries and Lk >= Lq keys in a segment (a cached prefix of
Lk - Lq tokens), query i sees keys j <= i + (Lk - Lq). Returns (Tq, Hq, D); a NaN in a query
row's inputs gives NaN in that row, and any finite ``scale`` works, as on the kernels' paths.

This is also the ops' torch path (``FUSEDVLM_BACKEND=torch`` or no C++ build), so it keeps to
SDPA's fused per-segment kernel: ``is_causal`` where Lq == Lk (measured 1.5-2x faster on CPU
than the same segment with an explicit mask), the (Lq, Lk) mask of one segment otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedvlm.packing import check_cu_seqlens


def causal_mask(lq: int, lk: int, device=None) -> torch.Tensor:
    """(lq, lk) bool, True where query i may attend key j (bottom-right aligned)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if scale <= 0:
        q, scale = q * scale, 1.0  # the CPU flash SDPA kernel returns NaN for a scale <= 0
    out = q.new_zeros(q.shape)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk < lq and causal:
            raise ValueError(f"segment {s}: {lk} keys < {lq} queries; a causal segment needs len_k >= len_q")
        if lk == 0:
            continue  # non-causal queries with no key at all attend to nothing: output 0
        qs = q[q0:q1].transpose(0, 1)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        mask = causal_mask(lq, lk, q.device) if causal and lq != lk else None
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and lq == lk, scale=scale)
        out[q0:q1] = o.transpose(0, 1)
    # SDPA's CPU kernel gives 0, not NaN, for a query row holding a NaN.
    out = torch.where(torch.isnan(q).any(-1, keepdim=True), float("nan"), out)
    return out.to(out_dtype)
