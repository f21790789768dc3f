"""Local merge: Triton kernel (interpreter, and GPU when present), C++ CPU kernel (direct and
Winograd forms) and torch path vs the eager reference chain, forward and every gradient,
tolerances from tests/kernels/tolerances.py.

The reference runs with ``upcast=True`` (fp32 maths; fp64 for the C++ kernel) on the same
dtype-rounded inputs, so the tolerance covers the implementation's rounding in its own dtype.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fusedvlm.backend import implementation
from fusedvlm.kernels import local_merge
from fusedvlm.kernels.common import merged_tokens_per_view
from fusedvlm.ref.local_merge import local_merge as ref_local_merge
from tests.kernels.tolerances import tol

# The package re-exports the function under the module's name, so fetch the module itself.
lm = importlib.import_module("fusedvlm.kernels.local_merge")
OP = "local_merge"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (V, H, W, C_in, C_out, residual, bias, dtype)
INTERPRETER_CASES = [
    (2, 7, 7, 40, 40, True, True, F32),  # odd grid, C not a multiple of the block
    (2, 5, 5, 40, 40, True, True, F16),
    (1, 4, 6, 24, 36, False, True, F32),  # non-square, C_in != C_out
    (1, 3, 3, 16, 16, True, False, BF16),
    (1, 1, 3, 16, 16, True, False, F32),  # one-row grid: odd parity classes are empty rows
    (1, 14, 14, 16, 16, True, False, F32),
    (1, 16, 16, 16, 16, True, True, F16),
    (1, 24, 24, 16, 16, True, False, F32),  # the paper's grid
]


def _inputs(v, h, w, c_in, c_out, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(v, h * w, c_in, generator=g)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)
    lf = torch.randn(c_out, generator=g)
    b = torch.randn(c_out, generator=g) if bias else None
    grad = torch.randn(v, merged_tokens_per_view(h, w), c_out, generator=g)
    return [t.to(dtype) if t is not None else None for t in (x, weight, lf, b, grad)]


def _run(fn, x, weight, lf, b, grad, device="cpu", **kw):
    """Output and gradients (x, weight, lf[, bias]) of fn, on CPU in fp32."""
    leaves = [t.detach().to(device).clone().requires_grad_() for t in (x, weight, lf, b) if t is not None]
    bias = leaves[3] if b is not None else None
    out = fn(*leaves[:3], bias=bias, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(device))
    return [out.detach().cpu().float()] + [g.cpu().float() for g in grads]


def check_matches_reference(case, device="cpu", strided=False, exact_reference=False):
    """``exact_reference``: the reference computes in fp64 (else in fp32) on the same inputs."""
    v, h, w, c_in, c_out, residual, bias, dtype = case
    x, weight, lf, b, grad = _inputs(v, h, w, c_in, c_out, bias, dtype)
    kw = dict(residual=residual, grid=(h, w))
    if exact_reference:
        want = _run(ref_local_merge, *[t if t is None else t.double() for t in (x, weight, lf, b, grad)], **kw)
    else:
        want = _run(ref_local_merge, x, weight, lf, b, grad, upcast=True, **kw)
    if strided:  # x and the output gradient stored token-major, read through strided views
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        grad = grad.transpose(0, 1).contiguous().transpose(0, 1)
    got = _run(local_merge, x, weight, lf, b, grad, device=device, **kw)
    names = ["out", "dx", "dweight", "dlf", "dbias"]
    for name, g, r in zip(names, got, want):
        assert g.shape == r.shape, name
        torch.testing.assert_close(g, r, **tol(OP, dtype), msg=lambda m, name=name: f"{name}: {m}")


def _no_torch_path(*args, **kwargs):
    raise AssertionError("the torch path ran where the Triton kernel should have")


def _no_triton(*args, **kwargs):
    raise AssertionError("the Triton kernel ran where the torch path should have")


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "case", INTERPRETER_CASES, ids=lambda c: "V{}_{}x{}_{}to{}_res{}_bias{}_{}".format(*c[:7], str(c[7])[6:])
)
def test_triton_matches_reference(case, monkeypatch):
    monkeypatch.setattr(lm, "_torch_forward", _no_torch_path)
    check_matches_reference(case)


@pytest.mark.interpreter
def test_triton_strided_x_and_grad(monkeypatch):
    monkeypatch.setattr(lm, "_torch_forward", _no_torch_path)
    check_matches_reference((2, 3, 3, 16, 16, True, True, F32), strided=True)


CPU_CASES = INTERPRETER_CASES + [
    (2, 7, 7, 40, 40, True, True, BF16),
    (3, 2, 5, 8, 12, False, False, F32),
]


# The torch path picks one F.conv2d or the Winograd form by size; force each in turn.
TORCH_PATHS = {"conv": False, "winograd": True}
TORCH_CASES = [(case, path) for case in CPU_CASES for path in TORCH_PATHS if path == "conv" or case[7] == F32]


@pytest.mark.parametrize(
    "case, path",
    TORCH_CASES,
    ids=lambda c: c if isinstance(c, str) else "V{}_{}x{}_{}to{}_res{}_bias{}_{}".format(*c[:7], str(c[7])[6:]),
)
def test_torch_path_matches_reference(case, path, monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    monkeypatch.setattr(lm, "_kernels", _no_triton)
    monkeypatch.setattr(lm, "_use_winograd", lambda x, weight: TORCH_PATHS[path] and x.dtype == F32)
    check_matches_reference(case)


@pytest.mark.parametrize("path", sorted(TORCH_PATHS))
def test_torch_path_strided_and_frozen_weight(path, monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    monkeypatch.setattr(lm, "_kernels", _no_triton)
    monkeypatch.setattr(lm, "_use_winograd", lambda x, weight: TORCH_PATHS[path] and x.dtype == F32)
    check_matches_reference((2, 3, 3, 16, 16, True, True, F32), strided=True)
    # Only x needs a gradient.
    x, weight, lf, b, grad = _inputs(2, 5, 5, 16, 16, True, F32)
    xr = x.clone().requires_grad_()
    out = local_merge(xr, weight, lf, bias=b)
    (dx,) = torch.autograd.grad(out, xr, grad)
    xe = x.clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(ref_local_merge(xe, weight, lf, bias=b), xe, grad)
    torch.testing.assert_close(dx, dx_ref, **tol(OP, F32))


def _check_out_buffer():
    v, h, w, c = 2, 5, 5, 24
    x, weight, lf, _, _ = _inputs(v, h, w, c, c, False, F32)
    tpv = merged_tokens_per_view(h, w)
    x.requires_grad_()
    want = ref_local_merge(x, weight, lf)
    probe = torch.randn(v, tpv, c)
    (dx_want,) = torch.autograd.grad((want * probe).sum(), x)
    for shape in [(v * tpv, c), (v, tpv, c)]:
        buf = torch.full((3 + v * tpv + 2, c), 7.0)
        target = buf[3 : 3 + v * tpv].view(shape)
        got = local_merge(x, weight, lf, out=target)
        assert got.data_ptr() == target.data_ptr() and got.shape == target.shape
        torch.testing.assert_close(buf[3 : 3 + v * tpv].view(v, tpv, c), want.detach(), **tol(OP, F32))
        assert (buf[:3] == 7).all() and (buf[-2:] == 7).all()
        (dx,) = torch.autograd.grad((buf[3 : 3 + v * tpv].view(v, tpv, c) * probe).sum(), x)
        torch.testing.assert_close(dx, dx_want, **tol(OP, F32))
        with torch.no_grad():
            target.zero_()
            assert local_merge(x, weight, lf, out=target).data_ptr() == target.data_ptr()
        torch.testing.assert_close(buf[3 : 3 + v * tpv].view(v, tpv, c), want.detach(), **tol(OP, F32))


@pytest.mark.interpreter
def test_out_buffer_triton(monkeypatch):
    monkeypatch.setattr(lm, "_torch_forward", _no_torch_path)
    _check_out_buffer()


@pytest.mark.parametrize("path", sorted(TORCH_PATHS))
def test_out_buffer_torch(path, monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    monkeypatch.setattr(lm, "_kernels", _no_triton)
    monkeypatch.setattr(lm, "_use_winograd", lambda x, weight: TORCH_PATHS[path] and x.dtype == F32)
    _check_out_buffer()


def test_paper_shape_torch_path(monkeypatch):
    # 10 views of 24x24 -> 145 tokens per view, 1450 in all (design §4), at a width that
    # takes the Winograd form by default.
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    x, weight, lf, _, _ = _inputs(10, 24, 24, 512, 512, False, F32)
    assert lm._use_winograd(x, weight)
    out = local_merge(x, weight, lf)
    assert out.shape == (10, 145, 512)
    torch.testing.assert_close(out, ref_local_merge(x, weight, lf), **tol(OP, F32))
    assert torch.equal(out[:, 144], lf.expand(10, 512))


def _check_mixed_dtypes():
    # bf16 tokens with fp32 parameters (autocast-style training): computed in bf16, parameter
    # gradients returned in fp32.
    x, weight, lf, b, grad = _inputs(2, 5, 5, 16, 16, True, F32)
    want = _run(ref_local_merge, x.to(BF16), weight.to(BF16), lf.to(BF16), b.to(BF16), grad.to(BF16), upcast=True)
    leaves = [x.to(BF16).requires_grad_(), weight.requires_grad_(), lf.requires_grad_(), b.requires_grad_()]
    out = local_merge(*leaves[:3], bias=leaves[3])
    assert out.dtype == BF16
    grads = torch.autograd.grad(out, leaves, grad.to(BF16))
    assert [g.dtype for g in grads] == [BF16, F32, F32, F32]
    for g, r in zip([out] + list(grads), want):
        torch.testing.assert_close(g.detach().float(), r, **tol(OP, BF16))


@pytest.mark.interpreter
def test_mixed_dtypes_triton(monkeypatch):
    monkeypatch.setattr(lm, "_torch_forward", _no_torch_path)
    _check_mixed_dtypes()


def test_mixed_dtypes_torch(monkeypatch):
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    monkeypatch.setattr(lm, "_kernels", _no_triton)
    _check_mixed_dtypes()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, w, lf: dict(x=x[0]), r"x must be \(V, H\*W, C_in\)"),
        (lambda x, w, lf: dict(x=x[:, :10]), "not a square grid"),
        (lambda x, w, lf: dict(grid=(4, 5)), r"grid \(4, 5\) does not hold 16 tokens"),
        (lambda x, w, lf: dict(weight=w[:, :, :2]), r"weight must be \(C_out, 8, 3, 3\)"),
        (lambda x, w, lf: dict(lf_token=lf[:3]), r"lf_token must be \(8,\)"),
        (lambda x, w, lf: dict(bias=lf[:3]), r"bias must be \(8,\)"),
        (
            lambda x, w, lf: dict(weight=torch.zeros(6, 8, 3, 3), lf_token=torch.zeros(6)),
            "residual needs C_in == C_out",
        ),
        (lambda x, w, lf: dict(out=torch.empty(2, 5, 8, dtype=torch.float16)), "out dtype"),
        (lambda x, w, lf: dict(lf_token=lf.int()), "floating point"),
        (lambda x, w, lf: dict(x=x.double(), weight=w.double(), lf_token=lf.double()), "not supported"),
        (lambda x, w, lf: dict(out=torch.empty(2, 4, 8)), r"out must be \(2, 5, 8\) or \(10, 8\)"),
        (lambda x, w, lf: dict(out=torch.empty(8, 10).t()), "contiguous rows"),
        (lambda x, w, lf: dict(x=x[:, :0]), "empty dimension"),
    ],
)
def test_bad_input_raises(make, match):
    x, w, lf = torch.randn(2, 16, 8), torch.randn(8, 8, 3, 3), torch.randn(8)
    args = dict(x=x, weight=w, lf_token=lf)
    args.update(make(x, w, lf))
    with pytest.raises((ValueError, TypeError), match=match):
        local_merge(args.pop("x"), args.pop("weight"), args.pop("lf_token"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "case", INTERPRETER_CASES + [(10, 24, 24, 256, 256, True, True, BF16), (10, 24, 24, 256, 256, True, False, F16)]
)
def test_triton_gpu_matches_reference(case, monkeypatch):
    monkeypatch.setattr(lm, "_torch_forward", _no_torch_path)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    check_matches_reference(case, device="cuda")


# --------------------------------------------------------------------------- GPU tiles, interpreted
def _gpu_tile_cases():
    """Per GPU configuration (kernels/local_merge.py TILE_CONFIGS; one for fp32, one for
    fp16/bf16): output rows V*(P+1), parity-class rows V*Ho*Wo and dW rows V*P across BLOCK_M /
    BLOCK_K, channels at BLOCK_N + 1 and BLOCK_N exactly, C_in = BLOCK_K - 1, a 3-row output."""
    cases = []
    for cfg, dtype in zip(lm.TILE_CONFIGS["local_merge"], (F32, BF16)):
        bm, bn, bk = cfg[:3]
        cases += [
            (cfg, (2, 11, 11, bn + 1, bn + 1, True, True, dtype)),  # 74 rows, 72 per parity class, 2 column tiles
            (cfg, (1, 14, 18, bn, bn, True, False, dtype)),  # exactly one 64-row tile, C = BLOCK_N
            (cfg, (1, 1, 3, bk - 1, 8, False, True, dtype)),  # 3 rows, C_in one short of BLOCK_K
        ]
    return cases


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "cfg,case",
    _gpu_tile_cases(),
    ids=lambda x: "x".join(map(str, x[:3])) if len(x) == 5 else "V{}_{}x{}_{}to{}".format(*x[:5]),
)
def test_triton_gpu_tiles_match_reference(cfg, case, monkeypatch):
    from fusedvlm.backend import force_tiles

    monkeypatch.setattr(lm, "_torch_forward", _no_torch_path)
    with force_tiles(local_merge=cfg):
        check_matches_reference(case)


# --------------------------------------------------------------------------- C++ CPU kernel

needs_cpp = pytest.mark.skipif(
    "not __import__('fusedvlm.native').native.available()", reason="the C++ CPU kernels could not be built here"
)
# The C++ kernel's two forms (csrc/local_merge.inc winograd_form picks one by size), each forced
# in turn through FUSEDVLM_MERGE_FORM; "torch" is the op's fallback kernel (FUSEDVLM_BACKEND=torch).
CPP_FORMS = {"cpp-direct": "direct", "cpp-winograd": "winograd"}


def _use_path(path, monkeypatch):
    """Runs the op on ``path``: the torch path and Triton fail if called on a C++ path."""
    monkeypatch.setattr(lm, "_kernels", _no_triton)
    if path == "torch":
        monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
        return
    monkeypatch.setenv("FUSEDVLM_BACKEND", "cpp")
    monkeypatch.setenv("FUSEDVLM_MERGE_FORM", CPP_FORMS[path])
    monkeypatch.setattr(lm, "_torch_forward", _no_torch_path)
    assert lm.native.load().local_merge_winograd_cpu(2, 7, 7, 8, 8) == (CPP_FORMS[path] == "winograd")


@pytest.fixture(params=sorted(CPP_FORMS))
def cpp_form(request, monkeypatch):
    return _use_path(request.param, monkeypatch)


_CASE_ID = "V{}_{}x{}_{}to{}_res{}_bias{}_{}".format
# (V, H, W, C_in, C_out, residual, bias, dtype): odd and even sides, 1x1 and one-row grids,
# non-square grids, one and several views, C_in != C_out without residual, every dtype.
CPP_CASES = [
    (2, 7, 7, 40, 40, True, True, F32),
    (1, 1, 1, 8, 8, True, True, F32),
    (1, 1, 2, 8, 8, True, False, F32),
    (2, 2, 1, 8, 8, False, True, F32),
    (3, 3, 5, 12, 12, True, True, F32),
    (2, 6, 4, 16, 16, True, False, F32),
    (1, 5, 8, 24, 36, False, True, F32),
    (2, 9, 7, 16, 16, True, True, F32),
    (1, 24, 24, 16, 16, True, False, F32),
    (2, 7, 7, 40, 40, True, True, BF16),
    (2, 5, 5, 40, 40, True, True, F16),
    (1, 4, 6, 24, 36, False, False, F16),
]


@needs_cpp
@pytest.mark.parametrize("case", CPP_CASES, ids=lambda c: _CASE_ID(*c[:7], str(c[7])[6:]))
def test_cpp_matches_fp64_reference(case, cpp_form):
    check_matches_reference(case, exact_reference=True)


@needs_cpp
def test_cpp_strided_inputs_and_partial_gradients(cpp_form):
    check_matches_reference((2, 3, 3, 16, 16, True, True, F32), strided=True, exact_reference=True)
    x, weight, lf, b, grad = _inputs(2, 5, 7, 16, 16, True, F32)
    want_x, want_w = torch.autograd.grad(
        ref_local_merge(x.requires_grad_(), weight.requires_grad_(), lf, bias=b, grid=(5, 7)), (x, weight), grad
    )
    for leaf, want in ((x, want_x), (weight, want_w)):  # only one of x and weight needs a gradient
        leaves = [t.detach().clone().requires_grad_(t is leaf) for t in (x, weight)]
        out = local_merge(*leaves, lf, bias=b, grid=(5, 7))
        (got,) = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad)
        torch.testing.assert_close(got, want, **tol(OP, F32))


@needs_cpp
def test_cpp_out_buffer(cpp_form):
    _check_out_buffer()


@needs_cpp
def test_cpp_mixed_dtypes(cpp_form):
    _check_mixed_dtypes()


@needs_cpp
def test_cpp_paper_shape():
    """The paper's merge (10 views of 24x24, 145 tokens each), where the C++ kernel picks its
    Winograd form. The weight gradient sums 1440 pixels to
    entries of ~100, where fp32 itself errs by more than the table's atol: each output's error
    against fp64 is bounded by the fp32 eager chain's own (F.conv2d) plus that atol."""
    x, weight, lf, b, grad = _inputs(10, 24, 24, 256, 256, True, F32)
    assert lm.native.load().local_merge_winograd_cpu(10, 24, 24, 256, 256)
    assert implementation(x) == "cpp"
    got = _run(local_merge, x, weight, lf, b, grad)
    exact = _run(ref_local_merge, *[t.double() for t in (x, weight, lf, b, grad)])
    fp32 = _run(ref_local_merge, x, weight, lf, b, grad)
    for name, g, e, r in zip(["out", "dx", "dweight", "dlf", "dbias"], got, exact, fp32):
        err, ref_err = (g - e).abs().max().item(), (r - e).abs().max().item()
        assert err <= ref_err + tol(OP, F32)["atol"], f"{name}: {err:.3g} vs the fp32 chain's {ref_err:.3g}"


@pytest.mark.parametrize("path", ["torch"] + sorted(CPP_FORMS))
def test_nan_reaches_exactly_the_outputs_that_read_it(path, monkeypatch):
    """A NaN token makes NaN exactly the merged tokens whose taps (or residual) read it; a NaN
    output gradient makes NaN exactly the token gradients of the pixels that output read, its
    channel of the weight gradient and bias gradient; as the fp64 reference chain does."""
    if path != "torch" and not lm.native.available():
        pytest.skip("the C++ CPU kernels could not be built here")
    _use_path(path, monkeypatch)
    monkeypatch.setattr(lm, "_use_winograd", lambda x, weight: True)  # the torch path's Winograd form
    v, h, w, c = 2, 9, 7, 8
    x, weight, lf, b, grad = _inputs(v, h, w, c, c, True, F32)
    for iy, ix in ((3, 5), (4, 2), (0, 0), (8, 6)):
        xn, gn = x.clone(), grad.clone()
        xn[1, iy * w + ix, 2] = float("nan")
        gn[0, (iy // 2) * ((w + 1) // 2) + ix // 2, 5] = float("nan")
        for inputs in ((xn, grad), (x, gn)):
            got = _run(local_merge, inputs[0], weight, lf, b, inputs[1], grid=(h, w))
            want = _run(ref_local_merge, *[t.double() for t in (inputs[0], weight, lf, b, inputs[1])], grid=(h, w))
            assert want[1 if inputs[0] is x else 0].isnan().any()  # a NaN token reaches out, a NaN grad dx
            for name, g, r in zip(["out", "dx", "dweight", "dlf", "dbias"], got, want):
                assert torch.equal(g.isnan(), r.isnan()), f"{name}, NaN at {(iy, ix)}"
                torch.testing.assert_close(g.nan_to_num(), r.nan_to_num(), **tol(OP, F32))


@pytest.mark.parametrize("path", sorted(CPP_FORMS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_opcheck_and_gradients_match_reference(with_bias, path, monkeypatch):
    """The fusedvlm::local_merge op itself (what compiled graphs and FLOP counting see), its
    CPU backward included: opcheck, then gradients against the eager reference chain."""
    if path != "torch" and not lm.native.available():
        pytest.skip("the C++ CPU kernels could not be built here")
    _use_path(path, monkeypatch)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5 * 3, 8, generator=g, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, generator=g, requires_grad=True)
    lf = torch.randn(8, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True) if with_bias else None
    results = torch.library.opcheck(torch.ops.fusedvlm.local_merge.default, (x, w, lf, b, True, 5, 3, "cpp"))
    assert set(results.values()) == {"SUCCESS"}, results
    got = torch.ops.fusedvlm.local_merge(x, w, lf, b, True, 5, 3, "cpp")
    leaves = [t for t in (x, w, lf, b) if t is not None]
    grads = torch.autograd.grad(got.square().sum(), leaves)
    want = ref_local_merge(x, w, lf, bias=b, residual=True, grid=(5, 3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, e in zip(grads, torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_cpp_autograd_node(monkeypatch):
    """csrc/ops.cpp's node: gradients for exactly the inputs that require them (bias included),
    forward-mode AD refused by name."""
    if not lm.native.available():
        pytest.skip("the C++ CPU kernels could not be built here")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "cpp")
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 5 * 3, 8, generator=g), torch.randn(8, 8, 3, 3, generator=g)
    lf = torch.randn(8, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    out = local_merge(x, w, lf, bias=b, grid=(5, 3))
    assert out.grad_fn.name() == "LocalMergeBackward"
    got = torch.autograd.grad(out.square().sum(), (lf, b))
    want = ref_local_merge(x, w, lf, bias=b, residual=True, grid=(5, 3))
    for a, e in zip(got, torch.autograd.grad(want.square().sum(), (lf, b))):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="local_merge: forward-mode AD is not implemented"):
        local_merge(fwAD.make_dual(x, torch.ones_like(x)), w, lf, grid=(5, 3))
