"""fusedvlm.quant: int8 weight-only linear layers for the frozen LLM (--llm-quant int8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedvlm.quant import Int8Linear, is_quantized, quantize_llm


def test_int8_linear_matches_float_within_quantisation_error():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (40,)
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


def test_bf16_cpu_kernel_equals_dequantised_product():
    torch.manual_seed(1)
    lin = nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    q = Int8Linear(lin)
    x = torch.randn(5, 128).bfloat16()
    fast = q(x)  # torch's _weight_int8pack_mm
    slow = (x.float() @ q.qweight.float().t()) * q.scale.float()
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - slow).norm() / slow.norm() < 1e-2


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
    with pytest.raises(ValueError, match="int8 LLM .* hf path only"):
        model.decode_engine("lean")
    answer = ChatSession(model, torch.rand(3, 64, 64), decode="auto").ask(
        "What is it?", GenerationConfig(max_new_tokens=3, ignore_eos=True)
    )
    assert answer.decode_path == "hf" and len(answer.ids) == 3
    with pytest.raises(ValueError, match="--llm-quant must be one of"):
        quantize_llm(model.llm, "int4")
