"""The ``hf`` decode path: Hugging Face's own forward with its dynamic cache, for any causal LM
(and the forward calls the ``hf-static`` path shares)."""

from __future__ import annotations

import torch

from fusedvlm.decode.engine import CompileStats, DecodeEngine
from fusedvlm.hf_compat import cache_kwarg


def hf_logits(hf, cache_kw: str, cache, position_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """HF's forward over ``cache`` (passed as ``cache_kw``) at position_ids (B, T) -> fp32
    logits of the last position (B, V)."""
    out = hf(**inputs, position_ids=position_ids, use_cache=True, **{cache_kw: cache})
    return out.logits[:, -1].float()


def hf_prefill(hf, cache_kw: str, cache, embeds: torch.Tensor, start: int) -> torch.Tensor:
    """embeds (B, L, d) at positions start .. start + L - 1 -> fp32 next-token logits (B, V);
    the LM head runs on the last position only."""
    B, L, _ = embeds.shape
    positions = torch.arange(start, start + L, device=embeds.device)[None].expand(B, -1)
    return hf_logits(hf, cache_kw, cache, positions, inputs_embeds=embeds, logits_to_keep=1)


class HFEngine(DecodeEngine):
    """Hugging Face forward with its own (dynamic) cache: the path every causal LM had first."""

    name = path = "hf"
    compiled = False  # nothing to compile: the dynamic cache changes shape every step

    def __init__(self, hf, *, reason: str = ""):
        self.hf = hf
        self.device = hf.get_input_embeddings().weight.device
        self.reason = reason
        self.compile_stats = CompileStats()
        self._cache_kw = cache_kwarg(hf)

    def new_cache(self, batch: int = 1):
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, cache) -> torch.Tensor:
        return hf_prefill(self.hf, self._cache_kw, cache, embeds, cache.get_seq_length())

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        positions = torch.full((tokens.shape[0], 1), cache.get_seq_length(), device=self.device)
        return hf_logits(self.hf, self._cache_kw, cache, positions, input_ids=tokens[:, None])

    def prepare(self, cache, upto: int) -> float:
        return 0.0
