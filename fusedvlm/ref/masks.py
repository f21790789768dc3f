"""Attention-mask objects for packed streams, in the spirit of xformers' attn_bias classes.

A mask object describes the pattern (segment lengths, causality) without building it; kernels
read ``cu_seqlens_q`` / ``cu_seqlens_k``. ``materialize`` builds the dense (Tq, Tk) mask, for
tests, debugging and the dense-masked-SDPA baseline only.

* :class:`BlockDiagonalMask`: query segment i sees every key of key segment i.
* :class:`BlockDiagonalCausalMask`: query segment i sees key segment i causally, aligned
  bottom-right (flash-attn varlen convention, xformers' ``BlockDiagonalCausalFromBottomRightMask``):
  with Lq queries and Lk >= Lq keys, query r sees keys c <= r + (Lk - Lq). With equal lengths
  this is plain causal attention per segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fusedvlm.packing import cu_seqlens_from_lengths, positions_in_segment, segment_ids


@dataclass(frozen=True)
class BlockDiagonalMask:
    q_seqlen: tuple[int, ...]
    kv_seqlen: tuple[int, ...]

    causal = False

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqlen: Sequence[int] | None = None):
        q = tuple(int(x) for x in q_seqlen)
        kv = q if kv_seqlen is None else tuple(int(x) for x in kv_seqlen)
        if len(kv) != len(q):
            raise ValueError(f"{len(q)} query segments but {len(kv)} key segments")
        if any(x < 0 for x in q + kv):
            raise ValueError(f"segment lengths must be >= 0, got q={list(q)} kv={list(kv)}")
        if cls.causal:
            for i, (lq, lk) in enumerate(zip(q, kv)):
                if lk < lq:
                    raise ValueError(f"segment {i}: {lk} keys < {lq} queries; a causal segment needs len_k >= len_q")
        return cls(q, kv)

    @property
    def cu_seqlens_q(self) -> torch.Tensor:
        return cu_seqlens_from_lengths(self.q_seqlen)

    @property
    def cu_seqlens_k(self) -> torch.Tensor:
        return cu_seqlens_from_lengths(self.kv_seqlen)

    @property
    def shape(self) -> tuple[int, int]:
        return sum(self.q_seqlen), sum(self.kv_seqlen)

    def materialize(self, dtype: torch.dtype = torch.bool, device=None) -> torch.Tensor:
        """Dense (Tq, Tk) mask: bool (True = may attend) or additive float (0 / -inf)."""
        cu_q, cu_k = self.cu_seqlens_q.to(device), self.cu_seqlens_k.to(device)
        tq, tk = self.shape
        seg_q, seg_k = segment_ids(cu_q, tq), segment_ids(cu_k, tk)
        allowed = seg_q[:, None] == seg_k[None, :]
        if self.causal:
            lens_q = (cu_q[1:] - cu_q[:-1]).to(torch.int64)
            lens_k = (cu_k[1:] - cu_k[:-1]).to(torch.int64)
            # Bottom-right: row r of its segment sees columns c <= r + (Lk - Lq).
            limit = positions_in_segment(cu_q, tq) + (lens_k - lens_q)[seg_q]
            allowed &= positions_in_segment(cu_k, tk)[None, :] <= limit[:, None]
        if dtype == torch.bool:
            return allowed
        if not dtype.is_floating_point:
            raise ValueError(f"materialize() builds a bool or floating mask, got {dtype}")
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.tensor(float("-inf"), dtype=dtype, device=device))


@dataclass(frozen=True)
class BlockDiagonalCausalMask(BlockDiagonalMask):
    causal = True


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockDiagonalMask,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Upstream-style baseline: one SDPA over the whole pack with the dense (Tq, Tk) mask.

    q (Tq, Hq, D), k/v (Tk, Hkv, D) -> (Tq, Hq, D). Costs O(Tq * Tk) time and mask memory
    whatever the packing; query rows with no visible key (an empty non-causal key segment) give 0.
    """
    tq, tk = mask.shape
    if q.shape[0] != tq or k.shape[0] != tk or v.shape[0] != tk:
        raise ValueError(f"mask is {tq} x {tk} tokens but q has {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of key/value heads ({hkv})")
    allowed = mask.materialize(torch.bool, q.device)
    kh = k.transpose(0, 1).repeat_interleave(hq // hkv, 0)
    vh = v.transpose(0, 1).repeat_interleave(hq // hkv, 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kh[None], vh[None], attn_mask=allowed, scale=scale
    )[0].transpose(0, 1)
    if tq and not mask.causal:
        out = torch.where(allowed.any(1)[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
