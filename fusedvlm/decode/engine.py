"""What every decode engine offers (:class:`DecodeEngine`) and what the static-cache engines
share: the cache that grows in buckets, the step compiled once per (batch, bucket), and
inductor's on-disk cache of compiled steps."""

from __future__ import annotations

import abc
import contextlib
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from fusedvlm.notice import notice
from fusedvlm.timing import sync

# The static caches grow in buckets of this many positions (doubling), so one compiled step
# serves every context length up to its bucket and a conversation recompiles a few times at most.
FIRST_BUCKET = 256


@dataclass
class CompileStats:
    seconds: float = 0.0  # first-call (trace + compile) time of every compiled shape
    graphs: int = 0


class DecodeCache(Protocol):
    """The part of Hugging Face's cache API the chat session rolls a failed turn back through."""

    def get_seq_length(self, layer_idx: int = 0) -> int: ...

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop that many), as DynamicCache.crop."""


@runtime_checkable
class DecodeEngine(Protocol):
    """Prefill and one-token steps of a causal LM over a KV cache of the engine's own kind.

    ``name`` is the ``--decode`` choice that selects the engine; ``path`` is what runs and is
    reported: the name, with ``-compiled`` / ``-eager`` for an engine whose step can compile."""

    name: str
    compiled: bool
    reason: str  # why make_engine chose this engine (printed with the path)
    device: torch.device
    compile_stats: CompileStats

    @property
    def path(self) -> str: ...

    def step_path(self, batch: int) -> str:
        """The path a step of ``batch`` rows runs: ``path``, unless the engine steps large batches
        another way."""
        return self.path

    def new_cache(self, batch: int = 1) -> DecodeCache: ...

    def prefill(self, embeds: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """embeds (B, L, d) appended to the cache -> fp32 next-token logits (B, V)."""

    def step(self, tokens: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """tokens (B,) fed at the cache's length -> fp32 logits (B, V)."""

    def prepare(self, cache: DecodeCache, upto: int) -> float:
        """Get ready to decode up to ``upto`` positions in ``cache``; returns the seconds spent
        compiling (kept out of every timing)."""


# ------------------------------------------------------------------------------------ compiling


def compile_default() -> bool:
    """Whether the decode step compiles unless told otherwise: yes, but ``FUSEDVLM_COMPILE=0`` turns
    it off for a whole process (the test suite does, keeping compilation to its own tests; false,
    no and off too)."""
    from fusedvlm.env import env_flag

    return env_flag("FUSEDVLM_COMPILE", True)


def compile_cache_dir() -> str:
    from fusedvlm.model.llm import cache_dir

    return os.path.join(cache_dir(), "inductor")


def compile_cache_status() -> str:
    """One line for ``fusedvlm info``: how many compiled graphs the decode-step cache holds."""
    graphs = os.path.join(compile_cache_dir(), "fxgraph")
    n = sum(len(files) for _, _, files in os.walk(graphs))
    if not n:
        return f"empty ({compile_cache_dir()}; the first chat compiles, or run `fusedvlm build` ahead)"
    return f"warm, {n} compiled graph(s) in {compile_cache_dir()}"


def enable_compile_cache() -> None:
    """Keep inductor's compiled artefacts under ~/.cache/fusedvlm (a temporary directory by default)
    so a second run skips codegen, unless the user chose a TORCHINDUCTOR_CACHE_DIR. Importing
    torch._dynamo fills the variable in with the default, and inductor reads it at every cache
    access, so a default value is replaced rather than kept."""
    with contextlib.suppress(ImportError):  # torch without inductor: nothing to cache
        import torch._inductor.config as inductor_config
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir()
        inductor_config.fx_graph_cache = True


def _compile_step(fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled once per input shape: inductor C++ on a CPU, CUDA graphs on a GPU."""
    enable_compile_cache()
    # One graph per (batch, bucket): more than dynamo's default 8 recompiles of one function.
    limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, dynamic=False, fullgraph=True)


def _first_calls(engine: StaticCacheEngine, key: tuple[int, int], warm: Callable[[], None]) -> float:
    """Run ``warm`` (the compiled step's first calls for the shape ``key``) and book its time as
    compilation; on any compiler failure the engine goes back to its eager step, which is exact."""
    notice(
        f"compiling the {engine.path} decode step for batch {key[0]}, {key[1]} cache positions (once per cache "
        f"bucket: up to a minute on a CPU, seconds when cached under {compile_cache_dir()})"
    )
    t0 = time.perf_counter()
    try:
        warm()
        sync(engine.device)
    except Exception as e:
        warnings.warn(
            f"torch.compile of the decode step failed ({type(e).__name__}: {e}); decoding uncompiled", stacklevel=3
        )
        engine._uncompile()
        engine.reason += f"; compiling failed ({type(e).__name__})"
        return 0.0
    seconds = time.perf_counter() - t0
    notice(f"decode step compiled in {seconds:.1f} s")
    engine._seen.add(key)
    engine.compile_stats.seconds += seconds
    engine.compile_stats.graphs += 1
    return seconds


# ------------------------------------------------------------------------------------ static cache


class BucketedCache(abc.ABC):
    """A KV cache of fixed capacity per layer that the compiled step writes in place. Positions
    >= ``get_seq_length()`` are stale and masked out, so ``crop`` only moves the length.
    Capacity grows by doubling buckets up to ``max_capacity``, copying the cached positions
    once per bucket (a new bucket is a new shape: one more compiled graph)."""

    def __init__(self, max_capacity: int):
        self.max_capacity = max_capacity
        self.length = 0

    @property
    @abc.abstractmethod
    def capacity(self) -> int: ...

    @property
    @abc.abstractmethod
    def batch_size(self) -> int: ...

    @abc.abstractmethod
    def _grow(self, capacity: int) -> None:
        """Move the first ``length`` positions into buffers of ``capacity`` positions."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def _set_length(self, length: int) -> None:
        self.length = length

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop that many), as DynamicCache.crop."""
        if max_length < 0:
            max_length = self.length - abs(max_length)
        if max_length < 0:
            raise ValueError(f"cannot crop a cache of {self.length} tokens by more than its length")
        self._set_length(min(self.length, max_length))

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions in all (the next bucket that holds them)."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise ValueError(
                f"the conversation needs {needed} LLM positions, more than the LLM's context of {self.max_capacity}"
            )
        cap = self.capacity
        while cap < needed:
            cap *= 2
        self._grow(min(cap, self.max_capacity))


class StaticCacheEngine(DecodeEngine):
    """An engine over a :class:`BucketedCache` whose one-token step compiles once per (batch,
    bucket); prefill runs uncompiled (prompt lengths vary, and it is GEMM-bound, so the Python
    overhead is small). Subclasses give the eager step and what it takes besides the tokens."""

    # True when the step reads nothing but its tensor arguments and the weights, so that a
    # compiled bucket's graph stays valid without its full guards (see step); HF modules keep
    # Python state in their caches and layers, so only the lean engine says so.
    tensor_only_inputs = False

    def __init__(self, eager_step: Callable, device: torch.device, *, compile: bool, reason: str):
        self.device = device
        self.compiled = compile
        self.reason = reason
        self.compile_stats = CompileStats()
        self._seen: set[tuple[int, int]] = set()
        self._eager_step = eager_step
        self._step = _compile_step(eager_step, device) if compile else eager_step

    @property
    def path(self) -> str:
        return f"{self.name}-{'compiled' if self.compiled else 'eager'}"

    @abc.abstractmethod
    def _step_inputs(self, cache: BucketedCache, start: int) -> tuple:
        """The step's arguments after the tokens, for a token at position ``start``."""

    @abc.abstractmethod
    def _prefill(self, embeds: torch.Tensor, cache: BucketedCache, start: int) -> torch.Tensor:
        """embeds (B, L, d) written at positions start .. start + L - 1 -> fp32 logits (B, V)."""

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, cache: BucketedCache) -> torch.Tensor:
        """embeds (B, L, d) appended to the cache -> fp32 next-token logits (B, V)."""
        start = cache.get_seq_length()
        cache.reserve(start + embeds.shape[1])
        logits = self._prefill(embeds, cache, start)
        cache.length = start + embeds.shape[1]
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: BucketedCache) -> torch.Tensor:
        """tokens (B,) fed at the cache's length -> fp32 logits (B, V)."""
        start = cache.get_seq_length()
        cache.reserve(start + 1)
        inputs = self._step_inputs(cache, start)
        if self.tensor_only_inputs and self.compiled and (cache.batch_size, cache.capacity) in self._seen:
            # This bucket's graph was compiled (and its guards passed) in prepare(). The guards
            # re-check, every step, state that a decode never changes (each weight, the module,
            # grad mode), about 1 ms of smol's 27 ms step on a 2-core CPU; only those that tell
            # the compiled buckets apart run here.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                logits = self._step(tokens, *inputs)
        else:
            logits = self._step(tokens, *inputs)
        cache.length = start + 1
        # CUDA graph outputs live in a pool that the next replay overwrites.
        return logits.clone() if self.device.type == "cuda" else logits

    @torch.no_grad()
    def prepare(self, cache: BucketedCache, upto: int) -> float:
        """Grow the cache to the bucket holding ``upto`` positions (capped at the context) and
        compile the step for it once; returns the seconds spent compiling (0 when cached).

        The warm-up calls write K/V at the first free position, which the mask hides until real
        steps overwrite it; the length is put back after them."""
        cache.reserve(min(upto, cache.max_capacity))
        key = (cache.batch_size, cache.capacity)
        start = cache.get_seq_length()
        if not self.compiled or key in self._seen or start >= cache.capacity:
            return 0.0
        tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=self.device)

        def warm():
            try:
                # CUDA graphs warm up on the first call and record on the next ones; a step may
                # advance the write position (HF's static cache does), so no more calls than
                # free positions.
                for _ in range(min(3 if self.device.type == "cuda" else 1, cache.capacity - start)):
                    self._step(tokens, *self._step_inputs(cache, start))
            finally:
                cache.crop(start)

        return _first_calls(self, key, warm)

    def _uncompile(self) -> None:
        self.compiled, self._step = False, self._eager_step
