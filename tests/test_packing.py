import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedvlm.packing import (
    check_cu_seqlens,
    cu_seqlens_from_lengths,
    interleave,
    lengths_from_cu_seqlens,
    pack,
    positions_in_segment,
    segment_ids,
    unpack,
)

lengths_st = st.lists(st.integers(0, 9), min_size=0, max_size=8)


@settings(max_examples=60, deadline=None)
@given(lengths_st)
def test_lengths_roundtrip(lengths):
    cu = cu_seqlens_from_lengths(lengths)
    assert cu.dtype == torch.int32 and cu.numel() == len(lengths) + 1
    assert lengths_from_cu_seqlens(cu).tolist() == lengths
    check_cu_seqlens(cu, sum(lengths))


@settings(max_examples=60, deadline=None)
@given(lengths_st)
def test_segment_ids_and_positions(lengths):
    cu = cu_seqlens_from_lengths(lengths)
    seg = segment_ids(cu).tolist()
    pos = positions_in_segment(cu).tolist()
    expected_seg = [i for i, n in enumerate(lengths) for _ in range(n)]
    expected_pos = [j for n in lengths for j in range(n)]
    assert seg == expected_seg and pos == expected_pos


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=6))
def test_pack_unpack_roundtrip(lengths):
    parts = [torch.randn(n, 3) for n in lengths]
    packed, cu = pack(parts)
    assert packed.shape == (sum(lengths), 3)
    for a, b in zip(unpack(packed, cu), parts):
        assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=6))
def test_interleave_is_per_segment_concatenation(pairs):
    la, lb = [p[0] for p in pairs], [p[1] for p in pairs]
    a_parts = [torch.randn(n, 2) for n in la]
    b_parts = [torch.randn(n, 2) for n in lb]
    a, cu_a = pack(a_parts)
    b, cu_b = pack(b_parts)
    merged, cu_m = interleave(a, cu_a, b, cu_b)
    assert lengths_from_cu_seqlens(cu_m).tolist() == [x + y for x, y in pairs]
    for seg, x, y in zip(unpack(merged, cu_m), a_parts, b_parts):
        assert torch.equal(seg, torch.cat([x, y]))


@pytest.mark.parametrize(
    "cu, total, match",
    [
        (torch.tensor([0, 2], dtype=torch.int64), None, "int32"),
        (torch.tensor([1, 2], dtype=torch.int32), None, r"\[0\] must be 0"),
        (torch.tensor([0, 3, 2], dtype=torch.int32), None, "non-decreasing"),
        (torch.tensor([0, 3], dtype=torch.int32), 4, "has 4 tokens"),
        (torch.zeros(0, dtype=torch.int32), None, "1-D"),
    ],
)
def test_bad_cu_seqlens(cu, total, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(cu, total)


def test_bad_lengths_and_packs():
    with pytest.raises(ValueError, match=">= 0"):
        cu_seqlens_from_lengths([2, -1])
    with pytest.raises(ValueError, match="trailing shape"):
        pack([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="segments; they must match"):
        interleave(torch.zeros(2, 1), cu_seqlens_from_lengths([2]), torch.zeros(2, 1), cu_seqlens_from_lengths([1, 1]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_rows_places_rows_and_mask_on_the_chosen_side(side):
    from fusedvlm.packing import pad_rows

    out, mask = pad_rows([[1, 2, 3], [], [4]], -1, side=side)
    if side == "right":
        assert out.tolist() == [[1, 2, 3], [-1, -1, -1], [4, -1, -1]]
    else:
        assert out.tolist() == [[1, 2, 3], [-1, -1, -1], [-1, -1, 4]]
    assert mask.tolist() == (out != -1).long().tolist() and out.dtype == torch.long
    empty, empty_mask = pad_rows([], 0)
    assert empty.shape == empty_mask.shape == (0, 0)
    with pytest.raises(ValueError, match="padding side"):
        pad_rows([[1]], 0, side="middle")


def test_pad_tokens_pads_each_field_with_its_own_value():
    from fusedvlm.chat import IGNORE_INDEX, Tokens
    from fusedvlm.packing import pad_tokens

    rows = [Tokens([5, 6], [True, False], [IGNORE_INDEX, 6]), Tokens([7], [False], [7])]
    ids, fused, labels, mask = pad_tokens(rows, pad_id=0)
    assert ids.tolist() == [[5, 6], [7, 0]] and fused.tolist() == [[True, False], [False, False]]
    assert labels.tolist() == [[IGNORE_INDEX, 6], [7, IGNORE_INDEX]] and mask.tolist() == [[1, 1], [1, 0]]
    assert fused.dtype == torch.bool
