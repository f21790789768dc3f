"""fusedvlm.quant: int8 weight-only linear layers for the frozen LLM (--llm-quant int8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedvlm import native
from fusedvlm.quant import KERNEL_MAX_ROWS, Int8Linear, int8_linear, is_quantized, quantize_llm, quantize_weight

needs_cpp = pytest.mark.skipif("not __import__('fusedvlm.native').native.available()", reason="C++ kernels not built")


def test_int8_linear_matches_float_within_quantisation_error():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (40,) and q.scale.dtype == torch.float32
    assert q.int8_weight() == (q.qweight, q.scale)
    # Per-channel absmax: every row uses the full int8 range and dequantises within half a step.
    assert torch.equal(q.qweight.abs().amax(1), torch.full((40,), 127, dtype=torch.int8))
    deq = q.qweight.float() * q.scale[:, None]
    assert (deq - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-7
    x = torch.randn(2, 3, 96)
    ref = lin(x)
    out = q(x)
    assert out.shape == ref.shape
    assert (out - ref).norm() / ref.norm() < 0.01
    assert torch.allclose(out, x @ deq.t() + lin.bias, atol=1e-5)


@pytest.mark.parametrize("beyond", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_paths_equal_the_dequantised_product(beyond, dtype):
    """Up to KERNEL_MAX_ROWS rows our kernel, beyond them torch's int8 ops: the same numbers."""
    torch.manual_seed(1)
    lin = nn.Linear(128, 64).to(dtype)
    q = Int8Linear(lin)
    rows = KERNEL_MAX_ROWS[dtype] + 1 if beyond else 5
    x = torch.randn(rows, 128).to(dtype)
    out = q(x)
    slow = (x.double() @ q.qweight.double().t()) * q.scale.double() + lin.bias.double()
    assert out.dtype == dtype and out.shape == (rows, 64)
    assert (out.double() - slow).norm() / slow.norm() < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@needs_cpp
def test_decode_rows_run_our_kernel(monkeypatch):
    calls = []
    real = native.load()

    class Spy:
        def linear(self, *args):
            calls.append(len(args))
            return real.linear(*args)

    monkeypatch.setattr(native, "load", lambda: Spy())
    q = Int8Linear(nn.Linear(32, 16).to(torch.bfloat16))
    x = torch.randn(2, 1, 32).bfloat16()
    y = q(x)
    assert calls == [4] and y.shape == (2, 1, 16)  # x, weights, biases, scales
    q(torch.randn(KERNEL_MAX_ROWS[torch.bfloat16] + 1, 32).bfloat16())
    assert calls == [4]  # a prefill-size x: torch's _weight_int8pack_mm


def test_quantize_weight_is_per_row_absmax():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]]).bfloat16()
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (3, 3) and s.shape == (3,)
    torch.testing.assert_close(s, torch.tensor([1.0 / 127, torch.finfo(torch.float32).tiny / 127, 3.0 / 127]))
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 64, -32]


@needs_cpp
def test_int8_linear_takes_several_weights_in_one_call():
    """The decode engines' hook: q, k, v of a layer side by side, in x's dtype."""
    torch.manual_seed(2)
    lins = [nn.Linear(96, n, bias=n != 8) for n in (24, 8, 8)]
    qs = [Int8Linear(lin) for lin in lins]
    x = torch.randn(3, 96)
    y = int8_linear(x, [m.int8_weight() for m in qs], [m.bias for m in qs])
    assert y.shape == (3, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, torch.cat([m(x) for m in qs], -1))
    yb = int8_linear(x.bfloat16(), [m.int8_weight() for m in qs], [None] * 3)
    assert yb.dtype == torch.bfloat16


def test_quantize_llm_and_decode_path():
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.model import FusedVLM
    from fusedvlm.session import ChatSession

    torch.manual_seed(0)
    model = FusedVLM.from_preset("tiny").eval()
    embed = model.llm.get_input_embeddings().weight
    linears = [n for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)]
    assert quantize_llm(model.llm, "none") is model.llm and not is_quantized(model.llm)
    quantize_llm(model.llm, "int8")
    assert is_quantized(model.llm)
    modules = dict(model.llm.named_modules())
    assert linears and all(isinstance(modules[n], Int8Linear) for n in linears)
    assert model.llm.get_input_embeddings().weight is embed  # the embedding table stays float
    assert not any(isinstance(m, Int8Linear) for m in model.fuser.modules())
    with pytest.raises(ValueError, match="int8 LLM .* lean or hf path only"):
        model.decode_engine("hf-static")
    answer = ChatSession(model, torch.rand(3, 64, 64), decode="auto", compile=False).ask(
        "What is it?", GenerationConfig(max_new_tokens=3, ignore_eos=True)
    )
    assert answer.decode_path.startswith("lean") and len(answer.ids) == 3
    with pytest.raises(ValueError, match="--llm-quant must be one of"):
        quantize_llm(model.llm, "int4")


@needs_cpp
def test_lean_step_reads_the_int8_weights():
    """The lean engine decodes an int8 LLM from its int8 weights and scales (our kernel, no float
    copy): prefill and step logits equal HF's forward over the same Int8Linear modules."""
    from fusedvlm.decode import make_engine
    from fusedvlm.model import FusedVLM

    torch.manual_seed(0)
    llm = quantize_llm(FusedVLM.from_preset("tiny").eval().llm, "int8")
    embeds = llm.get_input_embeddings()(torch.tensor([[1, 5, 9, 3, 7]]))
    logits = {}
    for name in ("lean", "hf"):
        engine = make_engine(llm, name, compile=False)
        cache = engine.new_cache(1)
        first = engine.prefill(embeds, cache)
        logits[name] = (first, engine.step(first.argmax(-1), cache))
    lean = make_engine(llm, "lean", compile=False).model
    assert lean.layers[0][0].dtype == torch.int8 and lean.scales[0][0].dtype == torch.float32
    torch.testing.assert_close(logits["lean"], logits["hf"], atol=1e-4, rtol=1e-4)
