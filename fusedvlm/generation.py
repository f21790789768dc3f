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

from fusedvlm.timing import sync


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are decoded; ``fusedvlm chat`` takes its flags from these fields
    (:mod:`fusedvlm.options`)."""

    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per answer"})
    do_sample: bool = field(
        default=False, metadata={"help": "sample instead of greedy decoding", "aliases": ("--sample",)}
    )
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature when sampling"})
    top_k: int = field(default=0, metadata={"help": "sample from the k likeliest tokens only (0: all)"})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling: the smallest set of tokens with this probability"}
    )
    seed: int | None = field(default=None, metadata={"help": "seeds sampling"})
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
    compile_s: float = 0.0  # compiling the decode step for this answer's cache bucket, not in ``seconds``
    path: str = "hf"  # the decode engine that ran (fusedvlm.decode)

    @property
    def tokens_per_s(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else float("nan")


def as_engine(llm):
    """A decode engine (fusedvlm.decode) as is; a Hugging Face model gets the ``hf`` engine."""
    from fusedvlm.decode import make_engine
    from fusedvlm.decode.engine import DecodeEngine

    return llm if isinstance(llm, DecodeEngine) else make_engine(llm, "hf")


@torch.no_grad()
def prefill(llm, inputs_embeds: torch.Tensor, past_key_values=None, past_length: int = 0) -> PrefillResult:
    """inputs_embeds (L, d) appended after ``past_length`` cached tokens -> next-token logits.

    ``llm`` is a Hugging Face causal LM or a decode engine; ``past_key_values`` is a cache it
    made (None: a new one)."""
    engine = as_engine(llm)
    cache = engine.new_cache() if past_key_values is None else past_key_values
    if cache.get_seq_length() != past_length:
        raise ValueError(f"past_length {past_length} but the KV cache holds {cache.get_seq_length()} tokens")
    device = inputs_embeds.device
    sync(device)
    t0 = time.perf_counter()
    logits = engine.prefill(inputs_embeds[None], cache)[0]
    sync(device)
    return PrefillResult(logits, cache, past_length + inputs_embeds.shape[0], time.perf_counter() - t0)


def next_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """Pick the next token from (vocab,) logits."""
    if not cfg.do_sample:
        return int(logits.argmax())
    # Shifted so that the largest logit is 0 before the division: a tiny temperature (1e-45)
    # then gives -inf to the others and 0 to the best (greedy, its limit) instead of inf - inf
    # = NaN in the softmax; the shift leaves the softmax as it is for every other temperature.
    logits = logits.float()
    logits = (logits - logits.max()) / cfg.temperature
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
    """Generate from a prefilled state until EOS or ``max_new_tokens``.

    Compilation for the cache bucket this answer needs happens before the clock starts and is
    reported apart (``DecodeResult.compile_s``)."""
    engine = as_engine(llm)
    device = engine.device
    if cfg.ignore_eos:
        eos_ids = set()
    generator = None
    if cfg.do_sample:
        generator = torch.Generator()
        generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    ids: list[int] = []
    latencies: list[float] = []
    logits, cache, length = state.logits, state.past_key_values, state.length
    # No step follows when one token is asked for (it comes from the prefill logits).
    compile_s = engine.prepare(cache, length + cfg.max_new_tokens - 1) if cfg.max_new_tokens > 1 else 0.0
    sync(device)
    t_start = time.perf_counter()
    tok = next_token(logits, cfg, generator)
    ids.append(tok)
    while tok not in eos_ids and len(ids) < cfg.max_new_tokens:
        t0 = time.perf_counter()
        logits = engine.step(torch.tensor([tok], device=device), cache)
        length += 1
        tok = next_token(logits[0], cfg, generator)
        ids.append(tok)
        sync(device)
        latencies.append(time.perf_counter() - t0)
    sync(device)
    seconds = time.perf_counter() - t_start
    return DecodeResult(ids, ids[-1] in eos_ids, seconds, cache, length, latencies, compile_s, engine.path)
