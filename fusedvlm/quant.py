"""Weight-only int8 for the frozen LLM (docs/design.md; issue 22): every ``nn.Linear`` of the LLM
becomes :class:`Int8Linear`, int8 weights with one scale per output channel (symmetric,
absmax / 127), quantised once at load. Activations stay in the LLM's dtype; the embedding
table, norms, vision tower and fusion module keep theirs.

A decode step reads each weight once, so halving the bytes (bf16 -> int8) is what speeds it
up on a bandwidth-bound CPU: with bf16 activations the CPU path is torch's
``_weight_int8pack_mm`` (int8 read, converted in registers). Other cases (fp32 activations,
GPUs) multiply by the int8 weight converted to the activation dtype and scale the result: the
same numbers, with the memory saving but not the speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedvlm.config import LLM_QUANT_CHOICES


class Int8Linear(nn.Module):
    """``y = (x @ q.T) * scale + bias`` with ``q`` int8 (out, in) and ``scale`` (out,)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # One output row at a time would be slower; one fp32 copy of one weight is small.
        w32 = w.float()
        scale = w32.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        del w32
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(w.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        scale = self.scale.to(x.dtype)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, scale)
        else:
            y = F.linear(x2, self.qweight.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_llm(llm: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every ``nn.Linear`` of ``llm`` (attention, MLP, LM head) in place; ``none``
    leaves it as it is. A tied LM head (shared with the embedding) is left in float."""
    if method not in LLM_QUANT_CHOICES:
        raise ValueError(f"--llm-quant must be one of {LLM_QUANT_CHOICES}, got {method!r}")
    if method == "none":
        return llm
    embed = llm.get_input_embeddings().weight
    for mod in list(llm.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and child.weight is not embed:
                setattr(mod, child_name, Int8Linear(child))
    llm.fusedvlm_quant = method  # read by the decode-path choice (the lean step reads float weights)
    return llm


def is_quantized(llm: nn.Module | None) -> bool:
    return getattr(llm, "fusedvlm_quant", "none") != "none"
