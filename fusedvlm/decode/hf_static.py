"""The ``hf-static`` decode path: Hugging Face's own forward over HF's ``StaticCache``, the
one-token step compiled once per (batch, cache bucket), for causal LMs the lean step does not
cover (Qwen2/3, Gemma, GPT-NeoX, GPT-2, ...). Less lean than our step (HF's Python and masks
are traced in), but the graph removes the per-step overhead all the same."""

from __future__ import annotations

import torch

from fusedvlm.decode.engine import FIRST_BUCKET, BucketedCache, StaticCacheEngine
from fusedvlm.decode.hf import hf_logits, hf_prefill
from fusedvlm.hf_compat import cache_kwarg


def hf_static_unsupported(hf) -> str | None:
    """Why HF's forward cannot decode this causal LM over HF's ``StaticCache`` in one compiled
    graph with exact turn rollback, or None when it can."""
    cls = type(hf)
    config = hf.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{cls.__name__} is an encoder-decoder model"
    if not getattr(cls, "_supports_static_cache", True):  # transformers 4.x spelled support this way
        return f"{cls.__name__} does not support a static cache"
    if not getattr(cls, "_can_compile_fullgraph", False):
        return f"{cls.__name__} does not declare its forward compilable in one graph (_can_compile_fullgraph)"
    if hasattr(cls, "_supports_default_dynamic_cache") and not cls._supports_default_dynamic_cache():
        return f"{cls.__name__} keeps a cache of its own kind"
    attn = getattr(config, "_attn_implementation", None) or ""
    if "flash" in attn:
        return f"attention implementation {attn!r} does not compile over a static cache"
    if not getattr(config, "max_position_embeddings", None):
        return "the config gives no max_position_embeddings to bound the static cache"
    try:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return "this transformers has no per-layer StaticCache (transformers >= 5 needed)"
    try:
        layers = StaticCache(config=config, max_cache_len=1).layers  # tensors are allocated lazily: cheap
    except Exception as e:
        return f"HF StaticCache cannot be built for this config ({type(e).__name__}: {e})"
    # Sliding-window and linear-attention layers forget positions, so crop() cannot undo a turn.
    other = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
    if other:
        return f"its cache layers {other} cannot be rolled back exactly (only full-attention StaticLayer can)"
    if not all(hasattr(layer, "cumulative_length") for layer in layers):
        # Older static layers are written at positions the caller passes; HFStaticCache moves this length.
        return "this transformers' StaticLayer keeps no cumulative_length (transformers >= 5 needed)"
    return None


class HFStaticCache(BucketedCache):
    """HF's ``StaticCache`` (``.hf``) behind the bucketed cache: ``get_seq_length()`` is a Python
    int (HF's is a tensor, so that the compiled step never specialises on it) and every length
    change is mirrored into HF's ``cumulative_length`` in place."""

    def __init__(self, config, *, batch: int, max_capacity: int, capacity: int = FIRST_BUCKET):
        from transformers import StaticCache

        super().__init__(max_capacity)
        self._make = lambda cap: StaticCache(config=config, max_cache_len=cap)
        self._batch = batch
        self.hf = self._make(min(capacity, max_capacity))

    @property
    def capacity(self) -> int:
        return self.hf.layers[0].max_cache_len

    @property
    def batch_size(self) -> int:
        return self._batch

    def _set_length(self, length: int) -> None:
        self.length = length
        for layer in self.hf.layers:
            layer.cumulative_length.fill_(length)  # in place: compiled graphs hold its address

    def _grow(self, capacity: int) -> None:
        new = self._make(capacity)
        n = self.length
        for old, layer in zip(self.hf.layers, new.layers):
            if old.is_initialized:  # allocated by the first forward, with its dtype and device
                layer.lazy_initialization(old.keys[:, :, :0], old.values[:, :, :0])
                layer.keys[:, :, :n] = old.keys[:, :, :n]
                layer.values[:, :, :n] = old.values[:, :, :n]
        self.hf = new
        self._set_length(n)


class HFStaticEngine(StaticCacheEngine):
    """HF's own forward over :class:`HFStaticCache`."""

    name = "hf-static"

    def __init__(self, hf, *, compile: bool = True, reason: str = ""):
        self.hf = hf
        self.max_capacity = hf.config.max_position_embeddings
        self._cache_kw = cache_kwarg(hf)
        super().__init__(self._forward_step, hf.get_input_embeddings().weight.device, compile=compile, reason=reason)

    def new_cache(self, batch: int = 1) -> HFStaticCache:
        return HFStaticCache(self.hf.config, batch=batch, max_capacity=self.max_capacity)

    def _forward_step(self, tokens: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """tokens (B,) at positions (B, 1) through HF's forward -> fp32 logits (B, V). The
        position is a tensor and HF's cache length too, so the graph depends on shapes only."""
        return hf_logits(self.hf, self._cache_kw, cache, position, input_ids=tokens[:, None])

    def _step_inputs(self, cache: HFStaticCache, start: int) -> tuple:
        return torch.full((cache.batch_size, 1), start, device=self.device), cache.hf

    def _prefill(self, embeds: torch.Tensor, cache: HFStaticCache, start: int) -> torch.Tensor:
        return hf_prefill(self.hf, self._cache_kw, cache.hf, embeds, start)
