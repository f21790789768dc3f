"""Decoder pieces of a Llama-style block: RMSNorm, RoPE, SwiGLU (the fusion decoder's; the lean
LLM decode step, fusedvlm/decode/lean.py, uses the first two).

Numerics follow Hugging Face ``LlamaModel`` so that a state dict loads into either and
gives the same outputs: RMSNorm in fp32 then cast back, RoPE with the "rotate half"
(non-interleaved) convention, cos/sin computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., C), weight (C,): weight * x / sqrt(mean(x^2) + eps), computed in fp32."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) -> cos, sin (T, head_dim): frequencies theta^(-2i/d), halves repeated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, H, D), cos/sin (T, D) -> rotated x (..., T, H, D) in x's dtype.

    Keeping x's dtype matters under autocast: cos/sin follow the (fp32) embeddings while the
    projections come out bf16, and q/k must stay in v's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), weights in nn.Linear layout (out, in)."""
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
