"""Ops under bad input: the same answer on every path (C++, torch fallback, Triton interpreter).

* packed_attention computes softmax(scale q k^T) for any finite scale, zero and negative
  included (the CPU flash SDPA kernel returned NaN for scale <= 0);
* a NaN in a query row gives NaN in that row and nowhere else (it gave 0 on the CPU);
* pairwise_cosine_stats propagates a NaN row into every prefix that holds it (it counted as a
  zero vector), and rows of 1e20 or 1e-30 give the cosines of their directions (they gave 0, or
  NaN under Triton, for identical rows whose cosine is 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedvlm.kernels import packed_attention, pairwise_cosine_stats
from fusedvlm.packing import cu_seqlens_from_lengths

PATHS = [
    pytest.param("cpp", id="cpp"),
    pytest.param("torch", id="torch"),
    pytest.param("auto", id="triton", marks=pytest.mark.interpreter),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("FUSEDVLM_BACKEND", request.param)
    return request.param


def _attention_math(q, k, v, lengths, scale):
    """Explicit float64 softmax(scale q k^T) v per causal segment (GQA by repetition)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    start = 0
    for n in lengths:
        qs = q[start : start + n].double().transpose(0, 1)
        ks = k[start : start + n].double().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[start : start + n].double().transpose(0, 1).repeat_interleave(group, 0)
        s = (scale * qs @ ks.transpose(1, 2)).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out[start : start + n] = (torch.softmax(s, -1) @ vs).transpose(0, 1)
        start += n
    return out


def _qkv(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return torch.randn(t, 4, 16, generator=g), torch.randn(t, 2, 16, generator=g), torch.randn(t, 2, 16, generator=g)


@pytest.mark.parametrize("scale", [0.0, -0.3, -2.0])
def test_attention_any_finite_scale(path, scale):
    lengths = [7, 1, 20]
    q, k, v = _qkv(lengths)
    got = packed_attention(q, k, v, cu_seqlens_from_lengths(lengths), scale=scale)
    torch.testing.assert_close(got.double(), _attention_math(q, k, v, lengths, scale), atol=2e-5, rtol=2e-5)


def test_attention_non_finite_scale_is_rejected(path):
    q, k, v = _qkv([4])
    with pytest.raises(ValueError, match="scale must be finite"):
        packed_attention(q, k, v, cu_seqlens_from_lengths([4]), scale=math.inf)


def test_attention_nan_query_gives_nan_row(path):
    lengths = [6, 9]
    q, k, v = _qkv(lengths)
    q[8, 1, 3] = float("nan")  # token 8 (segment 1), head 1
    out = packed_attention(q, k, v, cu_seqlens_from_lengths(lengths))
    assert out[8, 1].isnan().all()
    rest = torch.ones(out.shape[:2], dtype=torch.bool)
    rest[8, 1] = False
    assert torch.isfinite(out[rest]).all()


def test_attention_nan_key_reaches_the_rows_that_see_it(path):
    lengths = [6, 9]
    q, k, v = _qkv(lengths)
    k[10, 0, 0] = float("nan")  # segment 1, position 4, key head 0 -> query heads 0 and 1
    out = packed_attention(q, k, v, cu_seqlens_from_lengths(lengths))
    assert out[10:15, :2].isnan().all()  # positions 4.. of segment 1 see it
    assert torch.isfinite(out[:10]).all() and torch.isfinite(out[:, 2:]).all()


def test_psi_nan_row_propagates(path):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(12, 32, generator=g), torch.randn(12, 32, generator=g)
    a[7, 5] = float("nan")  # pair 1 = tokens 5..11, its third token
    stats = pairwise_cosine_stats(a, b, cu_seqlens_from_lengths([5, 7]))
    for s in (stats.eq, stats.ab, stats.aa):  # every prefix of pair 1 that holds the row
        assert s[7:].isnan().all()
        assert torch.isfinite(s[6])
    assert torch.isfinite(stats.eq[:7]).all() and torch.isfinite(stats.ab[1:5]).all() and torch.isfinite(stats.ab[6])
    # bb and the divergence never read a's row 7 as a cosine: bb stays finite.
    assert torch.isfinite(stats.bb[6:]).all()


@pytest.mark.parametrize("magnitude", [1e20, 1e-30, 3e38])
def test_psi_huge_and_tiny_identical_rows_have_cosine_one(path, magnitude):
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(1, 64, generator=g)
    direction /= direction.abs().max()
    rows = (direction * magnitude).expand(6, 64).contiguous()
    stats = pairwise_cosine_stats(rows, rows.clone(), cu_seqlens_from_lengths([6]))
    torch.testing.assert_close(stats.eq, torch.ones(6), atol=1e-5, rtol=0)
    for s in (stats.ab, stats.aa, stats.bb):
        assert s[0].isnan()
        torch.testing.assert_close(s[1:], torch.ones(5), atol=1e-5, rtol=0)


def test_psi_zero_rows_still_count_as_cosine_zero(path):
    a = torch.randn(4, 8)
    b = a.clone()
    b[2] = 0
    stats = pairwise_cosine_stats(a, b, cu_seqlens_from_lengths([4]))
    torch.testing.assert_close(stats.eq[2], torch.tensor(2 / 3), atol=1e-5, rtol=0)
