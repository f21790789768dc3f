"""The fusion decoder (design §5): a Llama-style decoder over packed token streams.

Every sample is one segment of a pack ``x (T, C)`` with ``cu_seqlens (n + 1,)``; attention is
block-diagonal causal (through :func:`fusedvlm.kernels.packed_attention`), RoPE positions
restart at 0 in every sample. Module names match Hugging Face ``LlamaModel`` so that its state
dict loads directly (``embed_tokens``, ``layers.i.self_attn.{q,k,v,o}_proj``,
``layers.i.mlp.{gate,up,down}_proj``, ``layers.i.{input,post_attention}_layernorm``, ``norm``).

Prefix reuse: with ``use_cache=True`` the decoder returns a :class:`FusionCache` holding every
layer's keys/values (after RoPE) per sample. Feeding new tokens with that cache appends them
to each sample: they get positions after the cached prefix and attend to it (causality is
bottom-right aligned), so the result equals running the concatenated sequence from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusedvlm.config import FusionConfig
from fusedvlm.kernels import packed_attention
from fusedvlm.model.llama import apply_rope, rms_norm, rope_cos_sin, swiglu
from fusedvlm.packing import (
    check_cu_seqlens,
    cu_seqlens_from_lengths,
    interleave_index,
    lengths_from_cu_seqlens,
    positions_in_segment,
    segment_ids,
)


@dataclass
class FusionCache:
    """Keys/values of every layer for n samples: ``keys[l]``, ``values[l]`` are (Tk, Hkv, D)
    packs with offsets ``cu_seqlens`` (n + 1,)."""

    cu_seqlens: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def lengths(self) -> torch.Tensor:
        return lengths_from_cu_seqlens(self.cu_seqlens)

    def select(self, samples: list[int]) -> FusionCache:
        """The cache of a subset of samples, in the given order (e.g. one image of a batch)."""
        cu = self.cu_seqlens.tolist()
        idx = (
            torch.cat([torch.arange(cu[s], cu[s + 1]) for s in samples])
            if samples
            else torch.zeros(0, dtype=torch.long)
        )
        idx = idx.to(self.cu_seqlens.device)
        new_cu = cu_seqlens_from_lengths([cu[s + 1] - cu[s] for s in samples], device=self.cu_seqlens.device)
        return FusionCache(new_cu, [k[idx] for k in self.keys], [v[idx] for v in self.values])


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class FusionAttention(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c, bias=False)

    def forward(self, x, cos, sin, cu_seqlens, past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None):
        """x (T, C) -> (T, C), plus this layer's full keys/values (past merged with new)."""
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        cu_k = cu_seqlens
        if past is not None:
            past_k, past_v, (index_old, index_new, cu_k) = past
            k = _scatter_merge(past_k, index_old, k, index_new)
            v = _scatter_merge(past_v, index_old, v, index_new)
        out = packed_attention(q, k, v, cu_seqlens, cu_k, causal=True)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim)), (k, v)


def _scatter_merge(
    old: torch.Tensor, index_old: torch.Tensor, new: torch.Tensor, index_new: torch.Tensor
) -> torch.Tensor:
    out = new.new_empty((old.shape[0] + new.shape[0], *new.shape[1:]))
    out[index_old] = old.to(new.dtype)
    out[index_new] = new
    return out


class FusionMLP(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class FusionDecoderLayer(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.self_attn = FusionAttention(cfg)
        self.mlp = FusionMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens, past=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class FusionDecoder(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(FusionDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Llama's initialisation: N(0, 0.02) for every linear and the embedding.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cache: FusionCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, FusionCache | None]:
        """inputs_embeds (T, C) packed with ``cu_seqlens`` (n + 1,) -> hidden (T, C) after the
        final RMSNorm, and the updated cache when ``use_cache``."""
        t = inputs_embeds.shape[0]
        # The pack's offsets are checked once here, not in every layer's attention call; a
        # compiled graph (which cannot read them back) relies on its caller's eager checks.
        compiling = torch.compiler.is_compiling()
        if not compiling:
            check_cu_seqlens(cu_seqlens, t)
        positions = positions_in_segment(cu_seqlens, t)
        merge = None
        if cache is not None:
            if cache.cu_seqlens.numel() != cu_seqlens.numel():
                raise ValueError(
                    f"cache holds {cache.cu_seqlens.numel() - 1} samples, input has {cu_seqlens.numel() - 1}"
                )
            cu_cache = cache.cu_seqlens.to(cu_seqlens.device)
            prefix = lengths_from_cu_seqlens(cu_cache)
            positions = positions + prefix[segment_ids(cu_seqlens, t)]
            merge = interleave_index(cu_cache, cu_seqlens)
        if t and not compiling and int(positions.max()) >= self.cfg.max_positions:
            raise ValueError(
                f"fusion sequence of {int(positions.max()) + 1} tokens exceeds max_positions={self.cfg.max_positions}"
            )
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past = None
            if cache is not None:
                past = (cache.keys[i], cache.values[i], merge)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, (k, v) = checkpoint(layer, x, cos, sin, cu_seqlens, past, use_reentrant=False)
            else:
                x, (k, v) = layer(x, cos, sin, cu_seqlens, past)
            if use_cache:
                keys.append(k)
                values.append(v)
        x = self.norm(x)
        new_cache = None
        if use_cache:
            cu_new = merge[2] if merge is not None else cu_seqlens
            new_cache = FusionCache(cu_new, keys, values)
        return x, new_cache
