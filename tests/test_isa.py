"""The C++ kernels' ISA variants (csrc/variant.h): every variant this CPU runs gives the
reference's results, the choice is validated, the wide instructions stay inside the variants,
and the build is keyed by the sources' content. Also the matrix-vector kernel of the decode step
(fusedvlm::linear)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fusedvlm import native
from fusedvlm.packing import cu_seqlens_from_lengths
from fusedvlm.ref.local_merge import local_merge as ref_merge
from fusedvlm.ref.packed_attention import packed_attention as ref_attention
from fusedvlm.ref.pairwise_cosine import pairwise_cosine_stats as ref_cosine

needs_cpp = pytest.mark.skipif("not __import__('fusedvlm.native').native.available()", reason="C++ kernels not built")


@pytest.fixture(params=native.ISAS)
def isa(request):
    """Each variant in turn (skipped where this CPU cannot run it); the default is put back."""
    if not native.available():
        pytest.skip("C++ kernels not built")
    if request.param not in native.supported_isas():
        pytest.skip(f"this CPU cannot run {request.param} (it runs {native.supported_isas()})")
    before = native.isa()
    native.set_isa(request.param)
    yield request.param
    native.set_isa(before)


def test_default_is_the_widest_this_cpu_runs():
    if not native.available():
        pytest.skip("C++ kernels not built")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    supported = native.supported_isas()
    assert supported[0] == "baseline"
    if os.environ.get("FUSEDVLM_ISA", "auto") in ("", "auto"):
        assert native.isa() == supported[-1]
    if " avx2" in flags and " fma" in flags and " f16c" in flags:
        assert "avx2" in supported
    assert ("avx512" in supported) == (" avx512f" in flags and " avx512bw" in flags)


def test_bad_choices_are_refused_naming_the_allowed_ones(monkeypatch):
    monkeypatch.setenv("FUSEDVLM_ISA", "sse9")
    with pytest.raises(ValueError, match="FUSEDVLM_ISA='sse9'.*auto, baseline, avx2, avx512"):
        native.requested_isa()
    monkeypatch.setenv("FUSEDVLM_ISA", " AVX2 ")
    assert native.requested_isa() == "avx2"
    monkeypatch.setenv("FUSEDVLM_ISA", "auto")
    assert native.requested_isa() is None
    with pytest.raises(ValueError, match="unknown kernel variant 'neon'; choose from baseline, avx2, avx512"):
        native.set_isa("neon")


@needs_cpp
def test_a_variant_this_cpu_lacks_is_refused():
    missing = [name for name in native.ISAS if name not in native.supported_isas()]
    if not missing:
        pytest.skip("this CPU runs every variant")
    with pytest.raises(ValueError, match=f"'{missing[0]}' needs instructions this CPU lacks; it runs: baseline"):
        native.set_isa(missing[0])


@needs_cpp
def test_fusedvlm_isa_picks_the_variant_in_a_new_process():
    code = "from fusedvlm import native; print(native.isa()); print(native.status())"
    env = {**os.environ, "FUSEDVLM_ISA": "baseline"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == "baseline"
    assert "ISA variant baseline (FUSEDVLM_ISA" in done.stdout


def test_attention_matches_the_reference(isa):
    torch.manual_seed(0)
    lengths = [1, 37, 90]  # one row, several register tiles, causal staircases
    cu = cu_seqlens_from_lengths(lengths)
    q, k, v = (torch.randn(sum(lengths), h, 20, dtype=torch.float64) for h in (4, 2, 2))  # GQA, d not a lane multiple
    mod = native.load()
    out, lse = mod.packed_attention_fwd_cpu(q.float(), k.float(), v.float(), cu, cu, True, 0.3)
    torch.testing.assert_close(out.double(), ref_attention(q, k, v, cu, scale=0.3), atol=2e-6, rtol=1e-5)
    g = torch.randn_like(q)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_attention(qr, kr, vr, cu, scale=0.3).backward(g)
    grads = mod.packed_attention_bwd_cpu(g.float(), q.float(), k.float(), v.float(), out, lse, cu, cu, True, 0.3)
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_pairwise_cosine_matches_the_reference(isa):
    torch.manual_seed(1)
    cu = cu_seqlens_from_lengths([3, 150])
    a, b = torch.randn(153, 24), torch.randn(153, 24)
    got = native.load().pairwise_cosine_stats_cpu(a, b, cu, True)
    for g, w in zip(got, ref_cosine(a, b, cu)):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("winograd", [False, True])
def test_local_merge_matches_the_reference(isa, winograd):
    torch.manual_seed(2)
    x = torch.randn(2, 5 * 7, 12, dtype=torch.float64)
    w, lf, b = torch.randn(12, 12, 3, 3, dtype=torch.float64), torch.randn(12, dtype=torch.float64), torch.randn(12)
    mod = native.load()
    out = mod.local_merge_fwd_cpu(x.float(), w.float(), lf.float(), b, True, 5, 7, winograd)
    want = ref_merge(x, w, lf, bias=b.double(), residual=True, grid=(5, 7))
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn_like(want)
    ref_merge(xr, wr, lf, bias=b.double(), residual=True, grid=(5, 7)).backward(g)
    dx, dw, dlf, db = mod.local_merge_bwd_cpu(g.float(), x.float(), w.float(), True, True, 5, 7, True, True, winograd)
    torch.testing.assert_close(dx.double(), xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw.double(), wr.grad, atol=1e-3, rtol=1e-4)


# bf16 keeps 8 significant bits: the output's rounding dominates the error.
LINEAR_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", list(LINEAR_TOL))
@pytest.mark.parametrize("rows,k", [(1, 67), (3, 64), (4, 5)])
def test_linear_matches_f_linear(isa, dtype, rows, k):
    """Several weights in one call (row tiles and tails, K tails of every lane width), biases or
    None, leading dimensions kept; fp32 accumulation whatever the weight dtype."""
    torch.manual_seed(3)
    x = torch.randn(rows, 1, k).to(dtype)
    ws = [torch.randn(n, k).to(dtype) for n in (9, 4, 1)]
    bs = [torch.randn(9).to(dtype), None, torch.randn(1).to(dtype)]
    y = native.load().linear(x, ws, bs)
    assert y.shape == (rows, 1, 14) and y.dtype == dtype
    want = torch.cat(
        [F.linear(x.double(), w.double(), b.double() if b is not None else None) for w, b in zip(ws, bs)], -1
    )
    err = (y.double() - want).abs().max() / want.abs().max()
    assert err < LINEAR_TOL[dtype], err


@needs_cpp
def test_linear_threads_split_rows_between_weights():
    """A call large enough to run on every thread: each output row computed once, by its weight."""
    torch.manual_seed(4)
    x = torch.randn(2, 256)
    ws = [torch.randn(n, 256) for n in (301, 1, 250)]
    y = native.load().linear(x, ws, [None] * 3)
    torch.testing.assert_close(y, torch.cat([F.linear(x, w) for w in ws], -1), atol=1e-4, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize(
    "change,message",
    [
        ({"w": torch.randn(4, 9)}, r"weight 0 must be \(out, 8\) for x of shape \[2, 8\], got \[4, 9\]"),
        ({"w": torch.randn(4, 8).bfloat16()}, "weight 0 is torch.bfloat16 but x is torch.float32; they must match"),
        ({"w": torch.randn(8, 4).t()}, "weight 0 must be contiguous"),
        ({"b": torch.randn(5)}, r"bias 0 must be \(4,\), got \[5\]"),
        ({"x": torch.randn(2, 8, dtype=torch.float64)}, "x must be float32, bfloat16 or float16, got torch.float64"),
    ],
)
def test_linear_refuses_bad_input(change, message):
    args = {"x": torch.randn(2, 8), "w": torch.randn(4, 8), "b": None, **change}
    with pytest.raises(ValueError, match=message):
        native.load().linear(args["x"], [args["w"]], [args["b"]])
    with pytest.raises(ValueError, match="2 weights but 1 biases"):
        native.load().linear(torch.randn(2, 8), [torch.randn(4, 8)] * 2, [None])


@needs_cpp
@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.uname().machine == "x86_64" and shutil.which("objdump")),
    reason="needs objdump on x86-64 Linux",
)
def test_wide_instructions_stay_inside_their_variant():
    """No function outside fusedvlm::avx2 / fusedvlm::avx512 holds a VEX/EVEX instruction (what
    -mavx2 on a whole file would leak into the shared inline code of torch's headers), and the
    AVX2 variant holds no AVX-512 one: the baseline variant and the dispatch run on any x86-64."""
    name, directory = native.build_dir(native._cflags())
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", str(directory / f"{name}.so")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    leaks, wide, fn = {}, {"avx2": 0, "avx512": 0}, ""
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].split():
            continue
        vector = parts[1].split()[0].startswith("v") or "%ymm" in line or "%zmm" in line
        evex = "%zmm" in line or re.search(r"%k[1-7]\b", line)
        variant = "avx512" if "fusedvlm::avx512::" in fn else "avx2" if "fusedvlm::avx2::" in fn else None
        if vector and variant is None or evex and variant == "avx2":
            leaks.setdefault(fn, line.strip())
        elif vector:
            wide[variant] += 1
    assert not leaks, list(leaks.items())[:5]
    assert wide["avx2"] > 100 and wide["avx512"] > 100, wide  # the variants are really compiled wide


def test_build_directory_is_keyed_by_source_content(tmp_path):
    """Two checkouts of the same sources share one build; a changed byte gets a new one."""
    src = native.source_dir()
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    flags = native._cflags()
    assert native.build_dir(flags, a) == native.build_dir(flags, b) == native.build_dir(flags)
    with open(b / "isa.cpp", "a") as f:
        f.write("\n")
    assert native.build_dir(flags, b)[1] != native.build_dir(flags, a)[1]
    assert native.build_dir(flags + ["-g"], a)[1] != native.build_dir(flags, a)[1]


def test_build_directory_does_not_depend_on_the_venv(monkeypatch):
    """Each checkout's `make install` has a venv of its own: the same sources and torch version
    share one build whatever folder torch was installed in."""
    here = native.build_dir(native._cflags())
    monkeypatch.setattr(
        native, "_ldflags", lambda: ["-L/another/venv/lib/python3.11/site-packages/torch/lib", "-lgomp"]
    )
    assert native.build_dir(native._cflags()) == here


def _int8(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return q, torch.rand(n, generator=gen) * 0.02 + 1e-3


# The int8 products are exact in fp32 (|q| <= 127 times x): the error is the fp32 sum's, or the
# bf16 output's rounding.
INT8_TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", list(INT8_TOL))
@pytest.mark.parametrize("n,k", [(1, 1), (7, 123), (123, 4097), (4, 64), (5, 96)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 17])
def test_int8_linear_matches_the_dequantised_weights_in_fp64(isa, dtype, n, k, rows):
    """int8 weights with fp32 scales, several per call (n rows, then 9 and 21: 4-row tiles with
    single rows left over), biases or None, leading dimensions kept. The widths cover AVX2's
    32-weight blocks: none (1), blocks then 8-wide steps and single weights (123), cache lines
    then one weight (4097), lines only (64), lines then one block (96); the single-row tiles
    (1 and 3 rows, 17: pairs, then the last row alone) read them, pairs of rows do not."""
    gen = torch.Generator().manual_seed(n * 31 + k + rows)
    x = torch.randn(rows, 1, k, generator=gen).to(dtype)
    qs = [_int8(m, k, gen) for m in (n, 9, 21)]
    bs = [torch.randn(n, generator=gen).to(dtype), None, torch.randn(21, generator=gen).to(dtype)]
    y = native.load().linear(x, [q for q, _ in qs], bs, [s for _, s in qs])
    assert y.shape == (rows, 1, n + 30) and y.dtype == dtype
    want = torch.cat(
        [
            F.linear(x.double(), q.double() * s.double()[:, None], None if b is None else b.double())
            for (q, s), b in zip(qs, bs)
        ],
        -1,
    )
    err = (y.double() - want).abs().max() / want.abs().max()
    assert err < INT8_TOL[dtype], err


@needs_cpp
@pytest.mark.parametrize("rows", [1, 3])
def test_int8_linear_threads_split_rows_between_weights(rows):
    """Calls large enough for every thread: each thread's range starts on a 4-row tile, and its
    prefetches two tiles ahead run past the end of its range (and of the weight) harmlessly."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 512, generator=gen)
    qs = [_int8(n, 512, gen) for n in (301, 1, 250, 4096)]
    y = native.load().linear(x, [q for q, _ in qs], [None] * 4, [s for _, s in qs])
    want = torch.cat([F.linear(x.double(), q.double() * s.double()[:, None]) for q, s in qs], -1)
    assert (y.double() - want).abs().max() / want.abs().max() < INT8_TOL[torch.float32]


@needs_cpp
@pytest.mark.parametrize(
    "change,message",
    [
        ({"s": [torch.rand(4)] * 2}, "1 weights but 2 scales"),
        ({"s": [torch.rand(5)]}, r"scale 0 must be \(4,\), one per output row of weight 0, got \[5\]"),
        ({"s": [torch.rand(4, 1)]}, r"scale 0 must be \(4,\), one per output row of weight 0, got \[4, 1\]"),
        ({"s": [torch.rand(4).bfloat16()]}, "scale 0 must be torch.float32, got torch.bfloat16"),
        ({"w": torch.randn(4, 8)}, "weight 0 is torch.float32 but scales were given; they go with torch.int8"),
        ({"s": None}, r"weight 0 is torch.int8 and needs scales \(float32, one per output row\)"),
        ({"w": torch.zeros(4, 9, dtype=torch.int8)}, r"weight 0 must be \(out, 8\)"),
        ({"x": torch.zeros(2, 8, dtype=torch.int8)}, "x must be float32, bfloat16 or float16, got torch.int8"),
    ],
)
def test_int8_linear_refuses_bad_input(change, message):
    args = {"x": torch.randn(2, 8), "w": torch.zeros(4, 8, dtype=torch.int8), "s": [torch.rand(4)], **change}
    with pytest.raises(ValueError, match=message):
        native.load().linear(args["x"], [args["w"]], [None], args["s"])


@needs_cpp
def test_int8_linear_has_shapes_for_the_compiler():
    """The fake kernel (native._register_fakes) takes the scales too: torch.compile traces it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, q, s = torch.empty(2, 3, 8), torch.empty(5, 8, dtype=torch.int8), torch.empty(5)
        y = torch.ops.fusedvlm.linear(x, [q, q], [None, None], [s, s])
    assert y.shape == (2, 3, 10)


# decode_attention sums in fp32 over at most a few hundred keys: the error is the fp32 sums' or,
# for a half-precision q, the output's rounding.
DECODE_ATTENTION_TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _decode_attention_reference(q, k, v, pos, scale):
    """fusedvlm.ref.packed_attention in fp64, one segment per batch row: its T queries against
    the cache's first pos + T keys, bottom-right causal (query t sees keys j <= pos + t)."""
    B, H, T, D = q.shape
    S = pos + T
    out = ref_attention(
        q.double().transpose(1, 2).reshape(B * T, H, D),
        k[:, :, :S].double().transpose(1, 2).reshape(B * S, -1, D),
        v[:, :, :S].double().transpose(1, 2).reshape(B * S, -1, D),
        cu_seqlens_from_lengths([T] * B),
        cu_seqlens_from_lengths([S] * B),
        scale=scale,
    )
    return out.view(B, T, H, D).transpose(1, 2)


@pytest.mark.parametrize("dtype", list(DECODE_ATTENTION_TOL))
@pytest.mark.parametrize(
    "batch,heads,kv_heads,rows,d,pos",
    [(1, 4, 4, 1, 64, 0), (2, 6, 2, 1, 128, 37), (1, 9, 3, 3, 20, 100), (3, 2, 1, 2, 72, 5)],
)
def test_decode_attention_matches_the_reference_in_fp64(isa, dtype, batch, heads, kv_heads, rows, d, pos):
    """The lean step's attention over its cache (csrc/decode_attention.inc): one key (pos
    0), grouped heads, several new rows, head dimensions with vector tails, the cache a view of a
    larger buffer (its bucket) whose keys past pos + T hold garbage that must not be read."""
    gen = torch.Generator().manual_seed(batch * 100 + heads + rows + d + pos)
    capacity = pos + rows + 5
    q = torch.randn(batch, heads, rows, d, generator=gen).to(dtype)
    buf = torch.randn(2, batch, kv_heads, capacity + 3, d, generator=gen).to(dtype)
    buf[:, :, :, pos + rows :] = float("nan")
    k, v = buf[0, :, :, :capacity], buf[1, :, :, :capacity]
    out = native.load().decode_attention(q, k, v, torch.tensor([pos]), d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    want = _decode_attention_reference(q, k.nan_to_num(), v.nan_to_num(), pos, d**-0.5)
    err = (out.double() - want).abs().max() / want.abs().max()
    assert err < DECODE_ATTENTION_TOL[dtype], err


@needs_cpp
def test_decode_attention_splits_heads_between_threads():
    """A call large enough for every thread (above the serial threshold), fp32 q on a bf16 cache
    as the lean step's fp32 model never makes but a caller may."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 32, 1, 128, generator=gen)
    k, v = (torch.randn(2, 8, 600, 128, generator=gen).bfloat16() for _ in range(2))
    out = native.load().decode_attention(q, k, v, torch.tensor([511]), 0.1)
    want = _decode_attention_reference(q, k, v, 511, 0.1)
    assert (out.double() - want).abs().max() / want.abs().max() < DECODE_ATTENTION_TOL[torch.float32]


@needs_cpp
@pytest.mark.parametrize(
    "change,message",
    [
        ({"q": torch.randn(4, 1, 8)}, r"must be 4-D"),
        ({"v": torch.randn(1, 2, 9, 8)}, r"k \[1, 2, 16, 8\] and v \[1, 2, 9, 8\] differ"),
        ({"v": torch.randn(1, 2, 16, 8).bfloat16()}, "k and v dtypes differ"),
        ({"q": torch.randn(1, 4, 1, 6)}, "differ in batch or head dimension"),
        ({"q": torch.randn(1, 3, 1, 8)}, "3 query heads are not a multiple of 2 key/value heads"),
        ({"pos": torch.tensor([16])}, "1 rows at position 16 do not fit a cache of 16"),
        ({"pos": torch.tensor([-1], dtype=torch.int32)}, "at position -1"),
        ({"pos": torch.tensor([3.0])}, "pos must be a one-element integer tensor on the CPU, got Float of shape"),
        (
            {"pos": torch.tensor([3, 4])},
            r"pos must be a one-element integer tensor on the CPU, got Long of shape \[2\]",
        ),
        ({"k": torch.randn(1, 2, 8, 16).transpose(2, 3), "v": torch.randn(1, 2, 8, 16).transpose(2, 3)}, "contiguous"),
        (
            {"k": torch.zeros(1, 2, 16, 8, dtype=torch.int8), "v": torch.zeros(1, 2, 16, 8, dtype=torch.int8)},
            "float32, bfloat16 or float16",
        ),
    ],
)
def test_decode_attention_refuses_bad_input(change, message):
    args = {"q": torch.randn(1, 4, 1, 8), "k": torch.randn(1, 2, 16, 8), "v": torch.randn(1, 2, 16, 8)}
    args["pos"] = torch.tensor([3])
    args.update(change)
    with pytest.raises(ValueError, match=message):
        native.load().decode_attention(args["q"], args["k"], args["v"], args["pos"], 0.3)
