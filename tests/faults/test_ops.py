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
    # tests/conftest.py starts the session with FUSEDVLM_BACKEND=cpp, so the Triton case must
    # set "auto" itself (tests/kernels/conftest.py does it for that folder only).
    if request.param == "auto":
        from fusedvlm.backend import interpreter_enabled, triton_available

        if not (triton_available() and interpreter_enabled()):
            pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 at session start)")
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


# --------------------------------------------------------------------------- one argument check
# Each op's check_args runs before any backend is picked: the same bad input gives the same
# error on C++, torch and the Triton interpreter (on 29b7c74 the C++ and Triton paths returned
# uninitialised memory for meta offsets, Triton read strided offsets / lf_token as other values
# and aborted the process on a negative offset).


def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize("where", ["cu_seqlens_q", "cu_seqlens_k", "k"], ids=["cu_q_meta", "cu_k_meta", "k_meta"])
def test_attention_meta_tensor_among_cpu_ones_is_refused(path, where):
    q, k, v = _qkv([4, 6])
    cu = cu_seqlens_from_lengths([4, 6])
    args = {"cu_seqlens_q": cu, "cu_seqlens_k": cu, "k": k}
    args[where] = _meta(args[where])
    message = "q, k, v must be on one device" if where == "k" else f"{where} is on meta but q is on cpu"
    with pytest.raises(ValueError, match=message):
        packed_attention(q, args["k"], v, args["cu_seqlens_q"], args["cu_seqlens_k"])


@pytest.mark.parametrize("where", ["cu_seqlens", "h_b"])
def test_psi_meta_tensor_among_cpu_ones_is_refused(path, where):
    a, b = torch.randn(10, 8), torch.randn(10, 8)
    cu = cu_seqlens_from_lengths([4, 6])
    message = (
        "cu_seqlens is on meta but h_a is on cpu" if where == "cu_seqlens" else "h_a and h_b must be on one device"
    )
    with pytest.raises(ValueError, match=message):
        pairwise_cosine_stats(a, _meta(b) if where == "h_b" else b, _meta(cu) if where == "cu_seqlens" else cu)


def test_direct_op_call_with_meta_offsets_is_refused():
    # torch.ops.fusedvlm.* skips the public check; a meta offset sends the call to the fake kernel.
    q, k, v = _qkv([4, 6])
    cu = _meta(cu_seqlens_from_lengths([4, 6]))
    with pytest.raises((ValueError, RuntimeError), match="different devices|is on meta"):
        torch.ops.fusedvlm.packed_attention(q, k, v, cu, cu, None, None, True, 0.25, "cpp")
    with pytest.raises((ValueError, RuntimeError), match="different devices|is on meta"):
        torch.ops.fusedvlm.pairwise_cosine_stats(q[:, 0], k[:, 0], cu, True, "cpp")


def _strided(values: list[int]) -> torch.Tensor:
    """The offsets as every other entry of a longer int32 tensor: a non-contiguous view."""
    full = torch.tensor([x for value in values for x in (value, 999)], dtype=torch.int32)
    view = full[::2]
    assert not view.is_contiguous()
    return view


def test_attention_strided_offsets_read_as_given(path):
    lengths = [5, 1, 9]
    q, k, v = _qkv(lengths, seed=3)
    offsets = [0, 5, 6, 15]
    got = packed_attention(q, k, v, _strided(offsets), _strided(offsets))
    torch.testing.assert_close(got.double(), _attention_math(q, k, v, lengths, 16**-0.5), atol=2e-5, rtol=2e-5)


def test_psi_strided_offsets_read_as_given(path):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(11, 16, generator=g), torch.randn(11, 16, generator=g)
    want = pairwise_cosine_stats(a, b, cu_seqlens_from_lengths([4, 7]))
    got = pairwise_cosine_stats(a, b, _strided([0, 4, 11]))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, equal_nan=True)


def test_local_merge_strided_lf_token_and_bias_read_as_given(path):
    from fusedvlm.kernels import local_merge
    from fusedvlm.ref.local_merge import local_merge as ref_local_merge

    g = torch.Generator().manual_seed(5)
    x, weight = torch.randn(2, 16, 8, generator=g), torch.randn(8, 8, 3, 3, generator=g)
    lf_wide, bias_wide = torch.randn(8, 2, generator=g), torch.randn(8, 3, generator=g)
    lf, bias = lf_wide[:, 1], bias_wide[:, 2]
    assert not lf.is_contiguous() and not bias.is_contiguous()
    got = local_merge(x, weight, lf, bias=bias)
    want = ref_local_merge(x.double(), weight.double(), lf.double(), bias=bias.double())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("offsets", [[0, -3, 10], [0, 7, 4, 10]], ids=["negative", "decreasing"])
def test_psi_bad_offsets_raise_not_abort(path, offsets):
    a, b = torch.randn(10, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing"):
        pairwise_cosine_stats(a, b, torch.tensor(offsets, dtype=torch.int32))


def test_attention_bad_offsets_raise(path):
    q, k, v = _qkv([10])
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be non-decreasing"):
        packed_attention(q, k, v, torch.tensor([0, -3, 10], dtype=torch.int32))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda q, k, v, cu: packed_attention(q, k, v, cu, scale="0.25"), TypeError, "scale must be a real number"),
        (lambda q, k, v, cu: packed_attention(q, k, v, cu, causal="no"), TypeError, "causal must be a bool"),
        (
            lambda q, k, v, cu: pairwise_cosine_stats(q[:, 0], k[:, 0], cu, positive="no"),
            TypeError,
            "positive must be a bool",
        ),
    ],
    ids=["scale_str", "causal_str", "positive_str"],
)
def test_scalar_types_are_checked(path, call, error, message):
    # The torch path accepted scale="0.25" and positive="no" (a truthy string) on 29b7c74.
    q, k, v = _qkv([4, 6])
    with pytest.raises(error, match=message):
        call(q, k, v, cu_seqlens_from_lengths([4, 6]))


def test_local_merge_residual_must_be_bool(path):
    from fusedvlm.kernels import local_merge

    x, weight, lf = torch.randn(1, 16, 8), torch.randn(8, 8, 3, 3), torch.randn(8)
    with pytest.raises(TypeError, match="residual must be a bool"):
        local_merge(x, weight, lf, residual="no")
    for grid in [(4, 4, 1), "4x4", (4.0, 4.0)]:
        with pytest.raises(ValueError, match=r"grid must be a pair of ints"):
            local_merge(x, weight, lf, grid=grid)
