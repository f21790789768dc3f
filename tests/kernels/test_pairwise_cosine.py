"""Prefix psi statistics: Triton kernel (interpreter) and torch path vs the n x n reference.

Error bound (tests/kernels/tolerances.py), per statistic: max|impl - ref64| <= ERROR_RATIO *
max|ref_dtype - ref64| + ATOL_FLOOR[dtype], where ref64 is the float64 reference and ref_dtype
the reference computed in the implementation's dtype, both on the same dtype-rounded inputs.
div is compared relative to max(1, |div|) because it grows with the prefix length.
"""

from __future__ import annotations

import pytest
import torch

from fusedvlm.backend import implementation
from fusedvlm.kernels import PsiStats, pairwise_cosine_stats
from fusedvlm.packing import cu_seqlens_from_lengths
from fusedvlm.ref.pairwise_cosine import pairwise_cosine_stats as ref_stats
from tests.kernels.tolerances import ATOL_FLOOR, ERROR_RATIO

OP = "pairwise_cosine"


def _pack(lengths, d, seed, zero_rows=()):
    """Two correlated branches: a shared direction plus noise, so that cosines of both signs
    occur and f = max(0, .) matters; some rows set to exact zeros."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    common = torch.randn(d, generator=g, dtype=torch.float64)
    a = 0.4 * common + torch.randn(total, d, generator=g, dtype=torch.float64)
    b = 0.5 * a + 0.3 * common + torch.randn(total, d, generator=g, dtype=torch.float64)
    for branch, row in zero_rows:
        (a if branch == "a" else b)[row] = 0
    return a, b, cu_seqlens_from_lengths(lengths)


def _scaled(stats: PsiStats, name: str, exact: PsiStats) -> torch.Tensor:
    x = getattr(stats, name).double()
    return x / getattr(exact, name).double().abs().clamp_min(1) if name == "div" else x


def check_matches_reference(lengths, d, dtype, positive, seed=0, zero_rows=()):
    a, b, cu = _pack(lengths, d, seed, zero_rows)
    a, b = a.to(dtype), b.to(dtype)
    exact = ref_stats(a, b, cu, positive=positive, upcast=True)
    same_dtype = ref_stats(a, b, cu, positive=positive, upcast=False)
    got = pairwise_cosine_stats(a, b, cu, positive=positive)
    assert isinstance(got, PsiStats)
    first = torch.zeros(sum(lengths), dtype=torch.bool)
    first[cu[:-1][torch.tensor(lengths) > 0].long()] = True
    for name in PsiStats._fields:
        g = getattr(got, name)
        assert g.shape == (sum(lengths),) and g.dtype == torch.float32, name
        # Cross terms are NaN exactly at the first token of every pair, nowhere else.
        expect_nan = first if name in ("ab", "aa", "bb") else torch.zeros_like(first)
        assert torch.equal(g.isnan(), expect_nan), name
        assert not g.isinf().any(), name
        if g.numel() == 0:
            continue
        gs, es, rs = (_scaled(s, name, exact).nan_to_num() for s in (got, exact, same_dtype))
        err = (gs - es).abs().max().item()
        ref_err = (rs - es).abs().max().item()
        bound = ERROR_RATIO[OP] * ref_err + ATOL_FLOOR[(OP, dtype)]
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"
    return got


# (lengths, d, dtype): 1-token and empty pairs, 123, d not a multiple of any block.
CASES = [
    ([1, 37, 0, 5], 40, torch.float32),
    ([123], 24, torch.float16),
    ([20, 1, 33], 72, torch.bfloat16),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("positive", [True, False], ids=["positive", "signed"])
@pytest.mark.parametrize("lengths,d,dtype", CASES)
def test_triton_matches_reference(lengths, d, dtype, positive):
    assert implementation(torch.zeros(1)) == "triton"
    check_matches_reference(lengths, d, dtype, positive)


@pytest.mark.parametrize("positive", [True, False], ids=["positive", "signed"])
@pytest.mark.parametrize(
    "lengths,d,dtype", CASES + [([600, 3, 257], 48, torch.float32), ([300, 1], 64, torch.bfloat16)]
)
@pytest.mark.parametrize("cpu_backend", ["cpp", "torch"])
def test_cpu_paths_match_reference(lengths, d, dtype, positive, cpu_backend, monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", cpu_backend)
    assert implementation(torch.zeros(1)) != "triton"
    # 600 and 257 tokens span several row tiles (256 in torch, 128 in C++), diagonal and off-diagonal.
    check_matches_reference(lengths, d, dtype, positive, seed=1)


def test_opcheck():
    # Not test_aot_dispatch_dynamic: its eager-vs-traced comparison does not treat the NaN
    # cross terms of every first token as equal.
    a, b = torch.randn(40, 24), torch.randn(40, 24)
    for positive in (True, False):
        results = torch.library.opcheck(
            torch.ops.fusedvlm.pairwise_cosine_stats.default,
            (a, b, cu_seqlens_from_lengths([1, 30, 0, 9]), positive, implementation(a)),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
        assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("positive", [True, False], ids=["positive", "signed"])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_zero_vectors_have_zero_cosine(backend, positive):
    assert (implementation(torch.zeros(1)) == "triton") == (backend == "triton")
    # Rows 0 and 2 of a, 2 and 5 of b are zero: their cosines count as 0, nothing turns NaN.
    zero_rows = [("a", 0), ("a", 2), ("b", 2), ("b", 5)]
    got = check_matches_reference([4, 3], 20, torch.float32, positive, seed=2, zero_rows=zero_rows)
    assert got.eq[0].item() == 0 and got.eq[2].item() == pytest.approx(got.eq[1].item() * 2 / 3, abs=1e-6)
    # All-zero pair: every statistic is exactly 0 (cross terms from n = 2 on).
    z = torch.zeros(3, 8)
    s = pairwise_cosine_stats(z, z, cu_seqlens_from_lengths([3]), positive=positive)
    assert torch.equal(s.eq, torch.zeros(3)) and torch.equal(s.div, torch.zeros(3))
    for x in (s.ab, s.aa, s.bb):
        assert x[0].isnan() and torch.equal(x[1:], torch.zeros(2))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_hand_computed_pair(backend):
    assert (implementation(torch.zeros(1)) == "triton") == (backend == "triton")
    # a = (e1, e2), b = (e1, -e1): eq = (1, 1/2); ab over i != j: c(a1, b2) = -1, c(a2, b1) = 0.
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [-1.0, 0.0]])
    cu = cu_seqlens_from_lengths([2])
    pos = pairwise_cosine_stats(a, b, cu, positive=True)
    sgn = pairwise_cosine_stats(a, b, cu, positive=False)
    assert pos.eq.tolist() == [1.0, 0.5] and sgn.eq.tolist() == [1.0, 0.5]
    assert pos.ab[1].item() == 0.0 and sgn.ab[1].item() == pytest.approx(-0.5)
    assert pos.aa[1].item() == 0.0 and sgn.bb[1].item() == pytest.approx(-1.0) and pos.bb[1].item() == 0.0
    # sum (a - b) = (-2, 0), then (-1, 2).
    assert pos.div.tolist() == pytest.approx([2.0, 5**0.5])


def test_signed_torch_path_is_not_the_gram_loop(monkeypatch):
    # The signed mode must use the O(n d) prefix-sum identities: no (n x n) product allowed.
    import fusedvlm.kernels.pairwise_cosine as mod

    real_matmul = torch.Tensor.__matmul__

    def guarded(x, y):
        assert not (x.dim() == 2 and y.dim() == 2 and x.shape[0] > 1 and y.shape[1] > 1), "Gram product in signed mode"
        return real_matmul(x, y)

    a, b, cu = _pack([50, 7], 16, 3)
    expected = ref_stats(a.float(), b.float(), cu, positive=False)
    monkeypatch.setattr(torch.Tensor, "__matmul__", guarded)
    got = mod._torch_pairwise_cosine_stats(a.float(), b.float(), cu, positive=False)
    monkeypatch.undo()
    for name in PsiStats._fields:
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_empty_pack(backend):
    assert (implementation(torch.zeros(1)) == "triton") == (backend == "triton")
    z = torch.zeros(0, 12)
    s = pairwise_cosine_stats(z, z, torch.zeros(1, dtype=torch.int32))
    assert all(getattr(s, k).shape == (0,) for k in PsiStats._fields)


def test_bad_inputs_name_the_problem():
    a = torch.randn(5, 4)
    cu = cu_seqlens_from_lengths([2, 3])
    with pytest.raises(ValueError, match="one shape"):
        pairwise_cosine_stats(a, torch.randn(4, 4), cu)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        pairwise_cosine_stats(a.double(), a.double(), cu)
    with pytest.raises(ValueError, match=r"\(T, d\)"):
        pairwise_cosine_stats(a[None], a[None], cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        pairwise_cosine_stats(a, a, cu_seqlens_from_lengths([2, 2]))
    with pytest.raises(ValueError, match="int32"):
        pairwise_cosine_stats(a, a, cu.long())
    with pytest.raises(ValueError, match="d must be >= 1"):
        pairwise_cosine_stats(a[:, :0], a[:, :0], cu)


# --------------------------------------------------------------------------- GPU tiles, interpreted
def _gpu_tile_cases():
    """Every GPU row / Gram configuration (kernels/pairwise_cosine.py TILE_CONFIGS) on pairs of
    1, t - 1, t, t + 1 and 2t + 2 tokens for the Gram tile t, and a hidden size one past the
    row kernel's d-chunk (so the Gram kernel's d-chunks are ragged too)."""
    from fusedvlm.kernels.pairwise_cosine import TILE_CONFIGS

    cases = []
    for row in TILE_CONFIGS["pairwise_cosine_row"]:
        for gram in TILE_CONFIGS["pairwise_cosine_gram"]:
            t = gram[0]
            cases.append((row, gram, [1, t - 1, t, t + 1, 2 * t + 2], row[1] + 1))
    return cases


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "row,gram,lengths,d", _gpu_tile_cases(), ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else None
)
def test_triton_gpu_tiles_match_reference(row, gram, lengths, d, dtype):
    from fusedvlm.backend import force_tiles

    with force_tiles(pairwise_cosine_row=row, pairwise_cosine_gram=gram):
        # positive for fp32, signed for bf16: both reductions at every tile config
        check_matches_reference(lengths, d, dtype, positive=dtype == torch.float32, seed=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("positive", [True, False], ids=["positive", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_kernel_matches_reference(dtype, positive):
    """The compiled kernels at their GPU tiles: pairs from 1 to several Gram tiles, d = 896
    (a real hidden size, many d-chunks)."""
    lengths, d = [1, 63, 64, 65, 300, 0, 1000], 896
    a, b, cu = _pack(lengths, d, 5)
    a, b = a.to(dtype), b.to(dtype)
    exact = ref_stats(a, b, cu, positive=positive, upcast=True)
    same_dtype = ref_stats(a, b, cu, positive=positive, upcast=False)
    assert implementation(a.cuda()) == "triton"
    got = pairwise_cosine_stats(a.cuda(), b.cuda(), cu.cuda(), positive=positive)
    for name in PsiStats._fields:
        g = getattr(got, name).cpu()
        assert torch.equal(g.isnan(), getattr(exact, name).isnan()), name
        gs, es, rs = (
            _scaled(s, name, exact).nan_to_num() for s in (PsiStats(*(x.cpu() for x in got)), exact, same_dtype)
        )
        err, ref_err = (gs - es).abs().max().item(), (rs - es).abs().max().item()
        assert err <= ERROR_RATIO[OP] * ref_err + ATOL_FLOOR[(OP, dtype)], (
            f"{name}: {err:.3g} vs reference {ref_err:.3g}"
        )
