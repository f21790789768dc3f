"""Packed attention: Triton kernel (interpreter) and torch path vs an fp64 reference.

Error bound (tests/kernels/tolerances.py): for the output and each of dq, dk, dv,
max|impl - ref64| <= ERROR_RATIO * max|ref_dtype - ref64| + ATOL_FLOOR[dtype], where ref_dtype
is the per-segment SDPA reference run in the same dtype as the implementation.
"""

from __future__ import annotations

import random

import pytest
import torch

from fusedvlm.backend import implementation
from fusedvlm.kernels.packed_attention import packed_attention
from fusedvlm.packing import cu_seqlens_from_lengths
from fusedvlm.ref.masks import BlockDiagonalCausalMask, BlockDiagonalMask, dense_masked_attention
from fusedvlm.ref.packed_attention import packed_attention as ref_packed_attention
from tests.kernels.tolerances import ATOL_FLOOR, ERROR_RATIO

OP = "packed_attention"


def _inputs(lq, lk, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lk), hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lk), hkv, d, generator=g, dtype=torch.float64)
    do = torch.randn(sum(lq), hq, d, generator=g, dtype=torch.float64)
    return q, k, v, do, cu_seqlens_from_lengths(lq), cu_seqlens_from_lengths(lk)


def _run(fn, q, k, v, do, cu_q, cu_k, dtype, **kw):
    """Output and (dq, dk, dv) of fn on inputs rounded to dtype, all returned as float64."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu_q, cu_k, **kw)
    if out.requires_grad:
        out.backward(do.to(dtype))
    # A leaf no output depends on (an empty pack) has no gradient: it is zero.
    return [out.detach().double()] + [
        torch.zeros_like(t, dtype=torch.float64) if t.grad is None else t.grad.double() for t in leaves
    ]


def check_against_fp64(lq, lk, hq, hkv, d, dtype, seed=0, causal=True, scale=None):
    q, k, v, do, cu_q, cu_k = _inputs(lq, lk, hq, hkv, d, dtype, seed)
    # The fp64 reference sees the same dtype-rounded inputs as the implementation.
    q, k, v, do = (t.to(dtype).double() for t in (q, k, v, do))
    kw = dict(causal=causal, scale=scale)
    exact = _run(ref_packed_attention, q, k, v, do, cu_q, cu_k, torch.float64, **kw)
    same_dtype = _run(ref_packed_attention, q, k, v, do, cu_q, cu_k, dtype, **kw)
    got = _run(packed_attention, q, k, v, do, cu_q, cu_k, dtype, **kw)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, same_dtype, exact):
        assert g.shape == e.shape, name
        assert torch.isfinite(g).all(), name
        if e.numel() == 0:
            continue
        err = (g - e).abs().max().item()
        ref_err = (r - e).abs().max().item()
        bound = ERROR_RATIO[OP] * ref_err + ATOL_FLOOR[(OP, dtype)]
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


# (q lengths, k lengths or None, Hq, Hkv, D, dtype): odd lengths, empty and 1-token segments,
# 123, prefix-cached keys, grouped-query heads, every supported dtype and D in {32, 64, 128}.
CASES = [
    ([1, 0, 23, 40], None, 2, 2, 32, torch.float32),
    ([5, 17, 0, 1], [30, 17, 3, 9], 4, 2, 64, torch.float16),
    ([123], None, 2, 1, 128, torch.bfloat16),
    ([0, 7, 33], [2, 41, 33], 3, 1, 64, torch.float32),
]


def _random_packing(seed):
    rng = random.Random(seed)
    lq = [rng.choice([0, 1, rng.randint(2, 40)]) for _ in range(rng.randint(0, 3))] + [rng.randint(2, 40)]
    rng.shuffle(lq)
    lk = [x + rng.choice([0, 0, rng.randint(1, 30)]) for x in lq]
    hkv = rng.choice([1, 2])
    return (
        lq,
        lk,
        hkv * rng.choice([1, 2]),
        hkv,
        rng.choice([32, 64]),
        rng.choice([torch.float32, torch.float16, torch.bfloat16]),
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("lq,lk,hq,hkv,d,dtype", CASES)
def test_triton_matches_fp64_reference(lq, lk, hq, hkv, d, dtype):
    check_against_fp64(lq, lk or lq, hq, hkv, d, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_triton_random_packings(seed):
    lq, lk, hq, hkv, d, dtype = _random_packing(seed)
    check_against_fp64(lq, lk, hq, hkv, d, dtype, seed=seed)


@pytest.mark.interpreter
def test_triton_non_causal_with_empty_key_segment():
    check_against_fp64([9, 4, 20], [17, 0, 20], 2, 1, 32, torch.float32, causal=False)


def check_strided_inputs_match_dense_sdpa():
    """q as a view into one fused projection, the way a decoder layer produces it."""
    lq, lk = [3, 30, 1], [19, 30, 1]
    q, k, v, do = (t.float() for t in _inputs(lq, lk, 4, 2, 32, torch.float32, 7)[:4])
    mask = BlockDiagonalCausalMask.from_seqlens(lq, lk)
    fused = torch.cat([q.reshape(q.shape[0], -1), torch.zeros(q.shape[0], 8)], 1).requires_grad_()
    qv = fused[:, : 4 * 32].view(-1, 4, 32)
    assert not qv.is_contiguous()
    kt, vt = k.clone().requires_grad_(), v.clone().requires_grad_()
    got = packed_attention(qv, kt, vt, mask.cu_seqlens_q, mask.cu_seqlens_k)
    got.backward(do)
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    want = dense_masked_attention(qd, kd, vd, mask)
    want.backward(do)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.grad[:, : 4 * 32].view(-1, 4, 32), qd.grad, atol=1e-5, rtol=1e-5)
    assert not fused.grad[:, 4 * 32 :].any()
    torch.testing.assert_close(kt.grad, kd.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vt.grad, vd.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
def test_triton_matches_dense_masked_sdpa_on_strided_inputs():
    check_strided_inputs_match_dense_sdpa()


def check_empty_pack(lengths):
    cu = cu_seqlens_from_lengths(lengths)
    q = torch.zeros(0, 2, 32, requires_grad=True)
    out = packed_attention(q, q, q, cu)
    assert out.shape == (0, 2, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.interpreter
@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_triton_empty_pack(lengths):
    check_empty_pack(lengths)


@pytest.mark.parametrize("lq,lk,hq,hkv,d,dtype", CASES)
def test_torch_path_matches_fp64_reference(lq, lk, hq, hkv, d, dtype, monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    check_against_fp64(lq, lk or lq, hq, hkv, d, dtype)


@pytest.mark.parametrize("seed", range(6))
def test_torch_path_random_packings(seed, monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    lq, lk, hq, hkv, d, dtype = _random_packing(100 + seed)
    check_against_fp64(lq, lk, hq, hkv, d, dtype, seed=seed)


def test_torch_path_matches_dense_masked_sdpa(monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    lq, lk = [50, 1, 0, 123], [80, 1, 5, 123]
    q, k, v, _, cu_q, cu_k = (
        t.float() if t.is_floating_point() else t for t in _inputs(lq, lk, 4, 4, 64, torch.float32, 3)
    )
    for mask in (BlockDiagonalCausalMask.from_seqlens(lq, lk), BlockDiagonalMask.from_seqlens(lq, lk)):
        got = packed_attention(q, k, v, cu_q, cu_k, causal=mask.causal)
        torch.testing.assert_close(got, dense_masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_scale_argument(monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    q, k, v, _, cu_q, cu_k = (
        t.float() if t.is_floating_point() else t for t in _inputs([6, 9], [6, 9], 2, 2, 32, torch.float32, 5)
    )
    got = packed_attention(q, k, v, cu_q, scale=0.3)
    torch.testing.assert_close(got, ref_packed_attention(q, k, v, cu_q, scale=0.3))
    assert not torch.allclose(got, packed_attention(q, k, v, cu_q))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(cu_q=torch.tensor([0, 4, 10], dtype=torch.int64)), "int32"),
        (dict(cu_q=cu_seqlens_from_lengths([4, 5])), "but the tensor has 10 tokens"),
        (dict(cu_k=cu_seqlens_from_lengths([10])), "they must match"),
        (
            dict(cu_q=cu_seqlens_from_lengths([7, 3]), cu_k=cu_seqlens_from_lengths([4, 6])),
            "segment 0: 4 keys < 7 queries",
        ),
        (dict(k=torch.zeros(10, 3, 16), v=torch.zeros(10, 3, 16)), "multiple of key/value heads"),
        (dict(q=torch.zeros(10, 4, 16, dtype=torch.float64)), "float32, float16 or bfloat16"),
        # Checked before the inputs meet in one dtype: an integer q is not cast to k's.
        (dict(q=torch.zeros(10, 4, 16, dtype=torch.int64)), "q must be float32, float16 or bfloat16"),
        (dict(v=torch.zeros(10, 2, 8)), "same shape"),
        (dict(q=torch.zeros(10, 4)), "(T, H, D)"),
    ],
)
def test_bad_input_is_named(change, message):
    args = dict(
        q=torch.zeros(10, 4, 16),
        k=torch.zeros(10, 2, 16),
        v=torch.zeros(10, 2, 16),
        cu_q=cu_seqlens_from_lengths([4, 6]),
        cu_k=None,
    )
    args.update(change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        packed_attention(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"])


# --------------------------------------------------------------------------- C++ CPU kernel

needs_cpp = pytest.mark.skipif(
    "not __import__('fusedvlm.native').native.available()", reason="the C++ CPU kernels could not be built here"
)


@pytest.fixture
def cpp(monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "cpp")


@needs_cpp
@pytest.mark.parametrize("lq,lk,hq,hkv,d,dtype", CASES)
def test_cpp_matches_fp64_reference(lq, lk, hq, hkv, d, dtype, cpp):
    check_against_fp64(lq, lk or lq, hq, hkv, d, dtype)


@needs_cpp
@pytest.mark.parametrize("seed", range(4))
def test_cpp_random_packings(seed, cpp):
    lq, lk, hq, hkv, d, dtype = _random_packing(200 + seed)
    check_against_fp64(lq, lk, hq, hkv, d, dtype, seed=seed)


@needs_cpp
def test_cpp_long_segments_span_many_tiles(cpp):
    """Several query blocks and key chunks per segment, a long cached prefix, GQA."""
    check_against_fp64([300, 129, 1], [700, 129, 65], 4, 2, 64, torch.float32)


@needs_cpp
def test_cpp_non_causal_with_empty_key_segment(cpp):
    check_against_fp64([9, 4, 20], [17, 0, 20], 2, 1, 32, torch.float32, causal=False)


@needs_cpp
@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_cpp_empty_pack(lengths, cpp):
    check_empty_pack(lengths)


@needs_cpp
def test_cpp_matches_dense_masked_sdpa_on_strided_inputs(cpp):
    check_strided_inputs_match_dense_sdpa()


@needs_cpp
def test_cpp_autograd_node(cpp):
    """csrc/ops.cpp's node: the gradient of the one input that requires it, saved tensors freed
    by the backward, forward-mode AD refused by name."""
    q, k, v, do, cu, _ = (
        t.float() if t.is_floating_point() else t for t in _inputs([5, 7], [5, 7], 4, 2, 16, torch.float64, 3)
    )
    q.requires_grad_()
    out = packed_attention(q, k, v, cu)
    assert out.grad_fn.name() == "PackedAttentionBackward"
    out.backward(do)
    q_ref = q.detach().clone().requires_grad_()
    ref_packed_attention(q_ref, k, v, cu, cu).backward(do)
    torch.testing.assert_close(q.grad, q_ref.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward(do)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="packed_attention: forward-mode AD is not implemented"):
        packed_attention(fwAD.make_dual(q, torch.ones_like(q)), k, v, cu)


# The C++ forward's boundaries: row tiles of 4, column tiles of 64 keys (32 under AVX2), query
# blocks of 64, P V key passes of 128, online-softmax chunks of 512; segments of at most 1024
# keys are one unit with every head when a pack has >= 4 segments per thread, else a unit is a
# (segment, kv head), cut into row ranges when there are fewer than 4 per thread. The thread
# count is pinned so that each test reaches the path it names.
STAIRCASE_LENGTHS = [1, 15, 16, 17, 31, 33, 63, 64, 65, 123]


@needs_cpp
@pytest.mark.parametrize("shift", [0, 1, 15, 16, 17, 64, 65])
def test_cpp_staircase_whole_segment_units(shift, cpp, two_threads):
    """Many segments: whole-segment units, the staircase at every tile edge, cached prefixes
    of len_k - len_q keys, GQA 2:1."""
    lq = STAIRCASE_LENGTHS + [0] + STAIRCASE_LENGTHS[::-1]
    check_against_fp64(lq, [n + shift for n in lq], 4, 2, 64, torch.float32, seed=shift)


@needs_cpp
@pytest.mark.parametrize("lq", STAIRCASE_LENGTHS)
@pytest.mark.parametrize("shift", [0, 17, 64])
def test_cpp_staircase_row_range_units(lq, shift, cpp, two_threads):
    """One segment and one kv head: row-range units (a query block each from 65 rows on)."""
    check_against_fp64([lq], [lq + shift], 2, 1, 64, torch.float32, seed=lq)


@needs_cpp
def test_cpp_key_chunks_and_long_segment_beside_short_ones(cpp, two_threads):
    """Online softmax across 512-key chunks, in a whole-segment unit (<= 1024 keys) and in the
    (segment, kv head) units of a segment past 1024 keys packed among short ones."""
    lq = [511, 3, 5, 7, 9, 11, 13, 700, 1030]
    lk = [513, 3, 5, 7, 9, 11, 1024, 1025, 1030]
    check_against_fp64(lq, lk, 2, 1, 16, torch.float32)


@needs_cpp
@pytest.mark.parametrize("d", [8, 40, 80, 128])
@pytest.mark.parametrize("n_seg", [1, 9])
def test_cpp_head_dims_off_the_vector_width(d, n_seg, cpp, two_threads):
    """D padded to the vector width inside the kernels (8, 40, 80) and D wider than one tile (80, 128)."""
    lq = [37, 70, 5, 1, 64, 20, 9, 33, 2][:n_seg]
    check_against_fp64(lq, [n + 3 for n in lq], 2, 2, d, torch.float32, seed=d)


@needs_cpp
@pytest.mark.parametrize("n_seg", [2, 9])
def test_cpp_non_causal_empty_key_segments(n_seg, cpp, two_threads):
    lq = [9, 4, 20, 70, 1, 5, 6, 7, 8][:n_seg]
    lk = [17, 0, 20, 3, 0, 5, 6, 7, 8][:n_seg]
    check_against_fp64(lq, lk, 2, 1, 32, torch.float32, causal=False)


# The C++ backward's boundaries: query blocks of 64 rows, key chunks of 256 (outer loop; a block
# starts at the first that sees the chunk), row tiles as the forward's, key tiles of the same
# height for dK, dV (each summed from the first row that sees its first key).
@needs_cpp
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [33, 64])
def test_cpp_backward_crosses_blocks_and_chunks(causal, d, cpp, two_threads):
    """1-token and 123-row segments, cached prefixes past a 256-key chunk, GQA 3:1, D off the
    vector width."""
    lq = [300, 1, 123, 70, 0, 5]
    lk = [600, 1, 123, 321, 4, 5]
    check_against_fp64(lq, lk, 6, 2, d, torch.float32, seed=d, causal=causal)


@needs_cpp
@pytest.mark.parametrize("scale", [0.0, -0.5, 3.0])
def test_cpp_backward_any_finite_scale(scale, cpp):
    check_against_fp64([40, 1, 90], [70, 1, 90], 4, 2, 32, torch.float32, seed=7, scale=scale)


@needs_cpp
@pytest.mark.parametrize("n_seg", [1, 9])
def test_cpp_backward_nan_query_row_reaches_only_what_it_touches(n_seg, cpp, two_threads):
    """A NaN in query 66 (head 0, kv head 0 under GQA 2:1) of a 70-row segment: its dq row and
    the dk, dv rows of the keys it sees (0..66) are NaN; keys 67..69, in its row and key tiles
    but past its limit, and every other row stay finite."""
    lengths = [70] + [5] * (n_seg - 1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths), 2, 16, generator=g)
    k, v = (torch.randn(sum(lengths), 1, 16, generator=g) for _ in range(2))
    q[66, 0, 3] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    packed_attention(q, k, v, cu_seqlens_from_lengths(lengths)).sum().backward()
    nan_q = torch.zeros(q.shape[:2], dtype=torch.bool)
    nan_q[66, 0] = True
    nan_kv = torch.zeros(k.shape[:2], dtype=torch.bool)
    nan_kv[:67, 0] = True
    assert q.grad[nan_q].isnan().all() and torch.isfinite(q.grad[~nan_q]).all()
    for t in (k, v):
        assert t.grad[nan_kv].isnan().all() and torch.isfinite(t.grad[~nan_kv]).all()


@needs_cpp
@pytest.mark.parametrize("n_seg", [1, 9])
def test_cpp_nan_key_reaches_only_the_rows_that_see_it(n_seg, cpp, two_threads):
    """A NaN key inside a row tile's staircase but past some of its rows' limits: those rows,
    which compute its score in the tile and must drop it, stay finite."""
    lengths = [70] + [5] * (n_seg - 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=g) for _ in range(3))
    k[41, 1] = float("nan")  # segment 0, key 41, kv head 1 (row tile 40..43)
    q[66, 0, 3] = float("nan")  # segment 0, query 66, head 0
    out = packed_attention(q, k, v, cu_seqlens_from_lengths(lengths))
    nan = torch.zeros(out.shape[:2], dtype=torch.bool)
    nan[41:70, 1] = True
    nan[66, 0] = True
    assert out[nan].isnan().all()
    assert torch.isfinite(out[~nan]).all()


def test_nan_query_row_and_nonpositive_scale_on_every_path(op_backend):
    """A NaN in a query row makes exactly that (row, head) NaN, and scale 0 or < 0 gives the
    softmax of those scores, on the torch path (the reference, whose CPU SDPA gives 0 for a NaN
    query and NaN for scale <= 0 unless handled) as on the kernels."""
    lengths = [5, 9]
    cu = cu_seqlens_from_lengths(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=g) for _ in range(3))
    q[7, 1, 3] = float("nan")
    out = packed_attention(q, k, v, cu)
    nan = torch.zeros(out.shape[:2], dtype=torch.bool)
    nan[7, 1] = True
    assert out[nan].isnan().all() and torch.isfinite(out[~nan]).all(), op_backend
    q[7, 1, 3] = 0.0
    for scale in (0.0, -0.5):
        want = torch.cat(
            [  # explicit softmax(scale q k^T) v per segment, in fp64
                torch.einsum(
                    "hij,jhd->ihd",
                    (scale * torch.einsum("ihd,jhd->hij", q[a:b].double(), k[a:b].double()))
                    .masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
                    .softmax(-1),
                    v[a:b].double(),
                )
                for a, b in ((0, 5), (5, 14))
            ]
        )
        torch.testing.assert_close(packed_attention(q, k, v, cu, scale=scale).double(), want, atol=1e-5, rtol=1e-5)


@needs_cpp
def test_cpp_pooled_output_is_never_handed_out_while_alive(cpp):
    """Outputs of >= 1 MiB come from a pool that their deleter refills: a live output keeps its
    values through later calls, and a recycled buffer gives the right answer, gradients included."""
    lengths = [64] * 64  # 4096 tokens x 4 heads x 16 = 1 MiB of float32 output
    cu = cu_seqlens_from_lengths(lengths)
    g = torch.Generator().manual_seed(0)
    q1, k1, v1, q2, k2, v2 = (torch.randn(4096, 4, 16, generator=g) for _ in range(6))
    out1 = packed_attention(q1, k1, v1, cu)
    kept = out1.clone()
    for _ in range(3):
        out2 = packed_attention(q2, k2, v2, cu)
        assert out2.data_ptr() != out1.data_ptr()
        torch.testing.assert_close(out2, ref_packed_attention(q2, k2, v2, cu), atol=1e-5, rtol=1e-5)
        del out2
    torch.testing.assert_close(out1, kept, atol=0, rtol=0)
    check_against_fp64(lengths, lengths, 4, 2, 16, torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(cu_q=cu_seqlens_from_lengths([4, 5])), "but the tensor has 10 tokens"),
        (
            dict(cu_q=cu_seqlens_from_lengths([7, 3]), cu_k=cu_seqlens_from_lengths([4, 6])),
            "segment 0: 4 keys < 7 queries",
        ),
        (
            dict(
                cu_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32), cu_k=torch.tensor([0, 6, 4, 10], dtype=torch.int32)
            ),
            "must be non-decreasing",
        ),
        (dict(cu_q=torch.tensor([1, 4, 10], dtype=torch.int32)), r"cu_seqlens_q\[0\] must be 0, got 1"),
        (dict(cu_k=torch.tensor([0, -1, 4, -1, 9], dtype=torch.int32)[::2]), r"cu_seqlens_k\[-1\] = 9 but the tensor"),
        (dict(cu_k=torch.tensor([0, 11, 10], dtype=torch.int32)), r"cu_seqlens_k must be non-decreasing"),
    ],
)
def test_bad_offsets_are_named_on_every_cpu_path(backend, change, message, monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", backend)
    args = dict(
        q=torch.zeros(10, 4, 16),
        k=torch.zeros(10, 2, 16),
        v=torch.zeros(10, 2, 16),
        cu_q=cu_seqlens_from_lengths([4, 6]),
        cu_k=None,
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        packed_attention(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"])


def test_opcheck():
    """Schema, fake kernel and autograd registration of the op, on the implementation this
    session chooses (the torch path never reaches the op)."""
    backend = implementation(torch.zeros(1))
    if backend == "torch":
        pytest.skip("no op kernel here: the C++ kernels are not built and Triton cannot run")
    q, k, v, _, cu_q, cu_k = (
        t.float() if t.is_floating_point() else t
        for t in _inputs([5, 1, 0, 12], [9, 1, 3, 12], 4, 2, 16, torch.float32, 11)
    )
    for causal in (True, False):
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 12, 12, causal, 0.25, backend)
        results = torch.library.opcheck(torch.ops.fusedvlm.packed_attention.default, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_max_seqlen_is_accepted():
    q, k, v, _, cu_q, cu_k = (
        t.float() if t.is_floating_point() else t for t in _inputs([6, 9], [6, 9], 2, 2, 32, torch.float32, 5)
    )
    torch.testing.assert_close(
        packed_attention(q, k, v, cu_q, max_seqlen_q=9, max_seqlen_k=9), packed_attention(q, k, v, cu_q)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_cuda_kernel_matches_fp64_reference(dtype, d):
    """The compiled kernel at its GPU tile sizes: long segments, a cached prefix, GQA."""
    lq, lk = [1, 0, 123, 700, 257], [1, 3, 123, 900, 257]
    q, k, v, do, cu_q, cu_k = _inputs(lq, lk, 8, 2, d, dtype, d)
    q, k, v, do = (t.to(dtype).double() for t in (q, k, v, do))
    exact = _run(ref_packed_attention, q, k, v, do, cu_q, cu_k, torch.float64)
    same_dtype = _run(ref_packed_attention, q, k, v, do, cu_q, cu_k, dtype)
    cuda = [t.cuda() for t in (q, k, v, do, cu_q, cu_k)]
    got = [t.cpu() for t in _run(packed_attention, *cuda, dtype)]
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, same_dtype, exact):
        err, ref_err = (g - e).abs().max().item(), (r - e).abs().max().item()
        assert err <= ERROR_RATIO[OP] * ref_err + ATOL_FLOOR[(OP, dtype)], (
            f"{name}: {err:.3g} vs reference {ref_err:.3g}"
        )


# --------------------------------------------------------------------------- GPU tiles, interpreted
# Every (BLOCK_M, BLOCK_N) a GPU launch can choose (kernels/packed_attention.py TILE_CONFIGS;
# num_warps / num_stages do not change what the interpreter computes), forward and backward
# paired up so that each configuration runs once, on a pack whose lengths sit on every tile
# boundary of both: 1, t - 1, t, t + 1 for each block size t, several tiles, cached prefixes
# of t - 2 .. t + 1 keys and shorter / longer than a tile, a one-query (decode) segment after a
# long prefix, an empty one; GQA 2:1. (An off-by-one in the forward's unmasked-tile limit fails
# three of the five configurations here.)
def _distinct_blocks(name):
    from fusedvlm.kernels.packed_attention import TILE_CONFIGS

    return list(dict.fromkeys(cfg[:2] for cfg in TILE_CONFIGS[name]))


def _tile_pairs():
    fwd, bwd = _distinct_blocks("packed_attention_fwd"), _distinct_blocks("packed_attention_bwd")
    n = max(len(fwd), len(bwd))
    return [(fwd[min(i, len(fwd) - 1)], bwd[min(i, len(bwd) - 1)]) for i in range(n)]


def tile_boundary_packing(blocks):
    sizes = sorted(set(blocks))
    lq = [1] + [t + e for t in sizes for e in (-1, 0, 1)] + [2 * sizes[-1] + 3]
    lq = list(dict.fromkeys(lq))
    lk = list(lq)
    big, small = sizes[-1], sizes[0]
    # The causal diagonal crosses a key tile edge where the prefix is about a multiple of a tile.
    prefixed = [
        (3, small - 2),
        (3, small - 1),
        (small + 1, small),
        (3, small + 1),
        (big + 1, big - 1),
        (big - 1, 3),
        (1, 2 * big + 7),
        (0, 5),
    ]
    for q, prefix in prefixed:
        lq.append(q)
        lk.append(q + prefix)
    return lq, lk


@pytest.mark.interpreter
@pytest.mark.parametrize("fwd,bwd", _tile_pairs(), ids=lambda b: "x".join(map(str, b)))
def test_triton_gpu_tiles_match_fp64_reference(fwd, bwd):
    from fusedvlm.backend import force_tiles
    from fusedvlm.kernels.packed_attention import TILE_CONFIGS

    lq, lk = tile_boundary_packing(fwd + bwd)
    # The largest tiles in fp32 (IEEE dots), the smaller ones in bf16 (rounded inputs, fp32 maths).
    dtype = torch.float32 if max(fwd) >= 64 else torch.bfloat16
    full = {
        name: next(c for c in TILE_CONFIGS[name] if c[:2] == b)
        for name, b in (("packed_attention_fwd", fwd), ("packed_attention_bwd", bwd))
    }
    with force_tiles(**full):
        check_against_fp64(lq, lk, 2, 1, 16, dtype)


@pytest.mark.interpreter
def test_triton_gpu_tiles_non_causal():
    from fusedvlm.backend import force_tiles
    from fusedvlm.kernels.packed_attention import TILE_CONFIGS

    fwd, bwd = TILE_CONFIGS["packed_attention_fwd"][0], TILE_CONFIGS["packed_attention_bwd"][0]
    with force_tiles(packed_attention_fwd=fwd, packed_attention_bwd=bwd):
        check_against_fp64([1, 63, 129, 5], [1, 70, 129, 0], 2, 2, 16, torch.float32, causal=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fwd,bwd", _tile_pairs(), ids=lambda b: "x".join(map(str, b)))
def test_cuda_every_tile_config_matches_fp64_reference(fwd, bwd):
    """Each GPU configuration compiled and run natively (d = 64 bf16: every one fits the
    shared-memory budget), on the tile-boundary packing of the interpreter test."""
    from fusedvlm.backend import force_tiles
    from fusedvlm.kernels.packed_attention import TILE_CONFIGS

    dtype = torch.bfloat16
    lq, lk = tile_boundary_packing(fwd + bwd)
    q, k, v, do, cu_q, cu_k = _inputs(lq, lk, 4, 2, 64, dtype, 1)
    q, k, v, do = (t.to(dtype).double() for t in (q, k, v, do))
    exact = _run(ref_packed_attention, q, k, v, do, cu_q, cu_k, torch.float64)
    same_dtype = _run(ref_packed_attention, q, k, v, do, cu_q, cu_k, dtype)
    full = {
        name: [c for c in TILE_CONFIGS[name] if c[:2] == b]
        for name, b in (("packed_attention_fwd", fwd), ("packed_attention_bwd", bwd))
    }
    # Configurations that differ only in warps / stages compile differently: run each.
    for f in full["packed_attention_fwd"]:
        for b in full["packed_attention_bwd"]:
            with force_tiles(packed_attention_fwd=f, packed_attention_bwd=b):
                got = [t.cpu() for t in _run(packed_attention, *(t.cuda() for t in (q, k, v, do, cu_q, cu_k)), dtype)]
            for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, same_dtype, exact):
                err, ref_err = (g - e).abs().max().item(), (r - e).abs().max().item()
                assert err <= ERROR_RATIO[OP] * ref_err + ATOL_FLOOR[(OP, dtype)], (
                    f"{f} {b} {name}: {err:.3g} vs {ref_err:.3g}"
                )
