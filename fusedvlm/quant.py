"""Weight-only int8 for the frozen LLM (docs/design.md; issue 22): every ``nn.Linear`` of the LLM
becomes :class:`Int8Linear`, int8 weights with one fp32 scale per output channel (symmetric,
absmax / 127), quantised once at load. Activations stay in the LLM's dtype; the embedding
table, norms, vision tower and fusion module keep theirs.

A decode step reads each weight once, so halving the bytes (bf16 -> int8) is what speeds it
up on a bandwidth-bound CPU. On the CPU a few rows of x (a decode step) go through our
matrix-vector kernel, ``fusedvlm::linear`` with scales (int8 read, converted in registers,
fp32 sums; :func:`int8_linear`, which a decode engine calls with the ``(qweight, scale)`` pairs
of :meth:`Int8Linear.int8_weight`); more rows (a prefill) with bf16 activations go through
torch's ``_weight_int8pack_mm``. Other cases (GPUs, no C++ kernels) multiply by the int8 weight
converted to the activation dtype and scale the result: the same numbers, with the memory saving
but not the speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusedvlm.config import LLM_QUANT_CHOICES

# Rows of x up to which Int8Linear takes our kernel on the CPU, by activation dtype: it converts
# each weight vector once per pair of rows, so its cost grows with the rows where a GEMM's does
# not. Measured (bench/results/amd-epyc-2core-avx2/int8_matvec_1t.txt, AVX2, one thread): with
# bf16 x it beat _weight_int8pack_mm up to 256 rows (1.3-1.5x) and was 0.9x at 1024; with fp32 x
# it beat dequantise + F.linear (a BLAS GEMM) up to 16-64 rows and lost from 64-256 on. fp16 x
# (not measured) goes the fp32 way: its torch path is the same dequantised GEMM.
KERNEL_MAX_ROWS = {torch.bfloat16: 256, torch.float32: 32, torch.float16: 32}


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q (N, K) int8, scale (N,) fp32), symmetric per output row:
    ``w ~= q * scale[:, None]``, each row's absmax at +-127."""
    # One output row at a time would be slower; one fp32 copy of one weight is small.
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(
    x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor]], biases: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """x (..., K) fp32/bf16/fp16 times each int8 weight (N_i, K) with its fp32 scale (N_i,), plus
    bias (N_i,) in x's dtype or None -> (..., sum N_i) in x's dtype, the outputs side by side: one
    call of ``fusedvlm::linear`` on the CPU (fp32 sums), several weights sharing one x (q, k,
    v) in one parallel region. Built for a few rows of x (a decode step); raises
    ``NativeUnavailable`` without the C++ kernels."""
    from fusedvlm import native

    return native.load().linear(x, [q for q, _ in weights], list(biases), [s for _, s in weights])


class Int8Linear(nn.Module):
    """``y = (x @ q.T) * scale + bias`` with ``q`` int8 (out, in) and ``scale`` fp32 (out,)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight (out, in) int8, scale (out,) fp32): what :func:`int8_linear` takes."""
        return self.qweight, self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) times int8 q (N, K) with fp32 scale (N,), plus bias (N,) or None -> (..., N) in
    x's dtype, on whichever path is fastest for that many rows (module docstring)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, q.shape[1])
    bias = None if bias is None else bias.to(x.dtype)
    if x.device.type == "cpu" and x2.shape[0] <= KERNEL_MAX_ROWS.get(x.dtype, 0) and _kernel_takes():
        y = int8_linear(x2, [(q, scale)], [bias])
    else:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
        else:
            y = F.linear(x2, q.to(x.dtype)) * scale.to(x.dtype)
        if bias is not None:
            y = y + bias
    return y.reshape(*lead, q.shape[0])


def int8_parts(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, scale) of a projection: an :class:`Int8Linear`'s int8 weight and fp32 scales, or
    an ``nn.Linear``'s float weight and None."""
    if isinstance(linear, Int8Linear):
        return linear.qweight, linear.scale
    return linear.weight, None


def _kernel_takes() -> bool:
    from fusedvlm import native

    return native.available()


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
    llm.fusedvlm_quant = method  # read by the decode-path choice (only the lean step and HF's take int8)
    return llm


def is_quantized(llm: nn.Module | None) -> bool:
    return getattr(llm, "fusedvlm_quant", "none") != "none"
