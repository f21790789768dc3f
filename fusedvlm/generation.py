"""Generation with a KV cache, prefill and decode as separate, timed phases.

``prefill`` runs the prompt embeddings through the LLM once and keeps its KV cache;
``decode`` extends it one token at a time (greedy, or sampling with temperature / top-k /
top-p) until EOS or ``max_new_tokens``. Timings synchronise CUDA so that they are real.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    # Generate exactly max_new_tokens (benchmarks: the paper decodes a fixed 256 tokens).
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        # Written as `not x > 0` so that NaN is refused too (every comparison with NaN is False).
        if not math.isfinite(self.temperature) or (self.do_sample and not self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (vocab,) logits of the next token
    past_key_values: object
    length: int  # tokens now in the cache
    seconds: float


@dataclass
class DecodeResult:
    """Generated ids; the cache then holds every token but the last generated one."""

    ids: list[int]
    stopped_on_eos: bool
    seconds: float
    past_key_values: object
    length: int  # tokens now in the cache
    token_latencies_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(llm, inputs_embeds: torch.Tensor, past_key_values=None, past_length: int = 0) -> PrefillResult:
    """inputs_embeds (L, d) appended after ``past_length`` cached tokens -> next-token logits."""
    device = inputs_embeds.device
    _sync(device)
    t0 = time.perf_counter()
    length = past_length + inputs_embeds.shape[0]
    out = llm(
        inputs_embeds=inputs_embeds[None],
        past_key_values=past_key_values,
        use_cache=True,
        position_ids=torch.arange(past_length, length, device=device)[None],
        logits_to_keep=1,
    )
    logits = out.logits[0, -1].float()
    _sync(device)
    return PrefillResult(logits, out.past_key_values, length, time.perf_counter() - t0)


def next_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """Pick the next token from (vocab,) logits."""
    if not cfg.do_sample:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def decode(llm, state: PrefillResult, cfg: GenerationConfig, eos_ids: set[int]) -> DecodeResult:
    """Generate from a prefilled state until EOS or ``max_new_tokens``."""
    device = llm.get_input_embeddings().weight.device
    if cfg.ignore_eos:
        eos_ids = set()
    generator = None
    if cfg.do_sample:
        generator = torch.Generator()
        generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    ids: list[int] = []
    latencies: list[float] = []
    logits, past, length = state.logits, state.past_key_values, state.length
    _sync(device)
    t_start = time.perf_counter()
    tok = next_token(logits, cfg, generator)
    ids.append(tok)
    while tok not in eos_ids and len(ids) < cfg.max_new_tokens:
        t0 = time.perf_counter()
        out = llm(
            input_ids=torch.tensor([[tok]], device=device),
            past_key_values=past,
            use_cache=True,
            position_ids=torch.tensor([[length]], device=device),
        )
        past, length = out.past_key_values, length + 1
        tok = next_token(out.logits[0, -1].float(), cfg, generator)
        ids.append(tok)
        _sync(device)
        latencies.append(time.perf_counter() - t0)
    _sync(device)
    seconds = time.perf_counter() - t_start
    return DecodeResult(ids, ids[-1] in eos_ids, seconds, past, length, latencies)
