"""Mask objects: the dense pattern they materialise and the dense-masked-SDPA baseline."""

from __future__ import annotations

import pytest
import torch

from fusedvlm.ref.masks import BlockDiagonalCausalMask, BlockDiagonalMask, dense_masked_attention
from fusedvlm.ref.packed_attention import packed_attention as ref_packed_attention


def _blocks(lq, lk, causal):
    """The expected (Tq, Tk) pattern, written out block by block."""
    out = torch.zeros(sum(lq), sum(lk), dtype=torch.bool)
    r0 = c0 = 0
    for a, b in zip(lq, lk):
        for i in range(a):
            for j in range(b):
                out[r0 + i, c0 + j] = (j <= i + (b - a)) if causal else True
        r0, c0 = r0 + a, c0 + b
    return out


@pytest.mark.parametrize("lq,lk", [([3, 0, 1, 5], None), ([2, 4, 0], [5, 4, 2]), ([], None), ([0], [3])])
def test_materialize_matches_blocks(lq, lk):
    for cls in (BlockDiagonalCausalMask, BlockDiagonalMask):
        mask = cls.from_seqlens(lq, lk)
        dense = mask.materialize()
        assert dense.dtype == torch.bool
        assert torch.equal(dense, _blocks(lq, lk or lq, cls.causal))
        assert mask.shape == tuple(dense.shape)


def test_additive_mask_and_offsets():
    mask = BlockDiagonalCausalMask.from_seqlens([2, 3], [4, 3])
    assert mask.cu_seqlens_q.tolist() == [0, 2, 5] and mask.cu_seqlens_q.dtype == torch.int32
    assert mask.cu_seqlens_k.tolist() == [0, 4, 7]
    add = mask.materialize(torch.float32)
    assert torch.equal(add == 0, mask.materialize())
    assert torch.isneginf(add[~mask.materialize()]).all()


@pytest.mark.parametrize(
    "args,message",
    [
        (([3, 2], [3]), "2 query segments but 1 key segments"),
        (([3, -1],), ">= 0"),
        (([4], [3]), "segment 0: 3 keys < 4 queries"),
    ],
)
def test_from_seqlens_rejects_bad_lengths(args, message):
    with pytest.raises(ValueError, match=message):
        BlockDiagonalCausalMask.from_seqlens(*args)


def test_materialize_rejects_integer_dtype():
    with pytest.raises(ValueError, match="bool or floating"):
        BlockDiagonalMask.from_seqlens([2]).materialize(torch.int64)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_masked_attention_matches_per_segment_reference(causal):
    lq, lk = [4, 1, 0, 9], [6, 1, 2, 9] if causal else [6, 0, 2, 9]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lk), 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lk), 2, 16, generator=g, dtype=torch.float64)
    cls = BlockDiagonalCausalMask if causal else BlockDiagonalMask
    mask = cls.from_seqlens(lq, lk)
    want = ref_packed_attention(q, k, v, mask.cu_seqlens_q, mask.cu_seqlens_k, causal=causal)
    torch.testing.assert_close(dense_masked_attention(q, k, v, mask), want)


def test_dense_masked_attention_checks_token_counts():
    mask = BlockDiagonalCausalMask.from_seqlens([3])
    with pytest.raises(ValueError, match="mask is 3 x 3 tokens"):
        dense_masked_attention(torch.zeros(4, 1, 8), torch.zeros(3, 1, 8), torch.zeros(3, 1, 8), mask)
