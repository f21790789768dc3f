"""LLM decode engines: a lean Llama decoder over a static KV cache (compiled once per
(batch, cache bucket), gpt-fast style), with Hugging Face eager as the fallback.

Why a lean decoder: one decode step of a small LLM is a chain of GEMVs that only have to
stream the weights once. Hugging Face's forward spends most of a step in Python (module
calls, cache bookkeeping, mask building) and its dynamic cache reallocates every step, so it
reaches a third of the memory-bandwidth limit on a CPU. The lean step reads the HF weights in
place (no copy), writes K/V into preallocated buffers and is traced by ``torch.compile`` into
one graph: inductor C++ on a CPU, CUDA graphs (``mode="reduce-overhead"``) on a GPU.

Paths, chosen by :func:`make_engine` and reported as ``engine.path`` / ``engine.reason``:

* ``lean-compiled``: Llama-family config (Llama-2, Vicuna, SmolLM2), compiled step;
* ``lean-eager``: the same step uncompiled (``--no-compile``, or torch.compile unavailable);
* ``hf-static-compiled``: any other HF causal LM whose cache can be static (Qwen2/3, Gemma,
  GPT-NeoX, GPT-2, ...): HF's own forward over HF's ``StaticCache``, the one-token forward
  compiled once per (batch, cache bucket). Less lean than our step (HF's Python and masks are
  traced in), but the graph removes the per-step overhead all the same;
* ``hf-static-eager``: the same uncompiled (``--decode hf-static --no-compile``; ``auto`` takes
  ``hf`` instead: the path is there for its compiled step);
* ``hf``: Hugging Face forward with its DynamicCache (any causal LM; also ``--decode hf``).

Every engine keeps the KV cache in an object with the Hugging Face cache API the chat session
relies on for rollback: ``get_seq_length()`` and ``crop(n)``.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedvlm.hf_compat import cache_kwarg
from fusedvlm.notice import notice
from fusedvlm.timing import sync

DECODE_PATHS = ("auto", "lean", "hf-static", "hf")
# The static cache grows in buckets of this many positions (doubling), so one compiled step
# serves every context length up to its bucket and a conversation recompiles a few times at most.
FIRST_BUCKET = 256
# RoPE variants whose frequencies do not depend on the sequence length: one table serves all.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
# Activations of the Llama MLP that the lean step implements (design §5 uses SiLU).
LEAN_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# Rows of activations (batch x new tokens) up to which the lean step's projections run our
# matrix-vector kernel (fusedvlm_cpu::linear) on a CPU: it streams each weight once and reuses
# it from L1 for every row, so up to a few rows it stays memory-bound; more rows are a GEMM.
MATVEC_MAX_ROWS = 4


# ------------------------------------------------------------------------------------ cache


def _cropped_length(length: int, max_length: int) -> int:
    """The length after ``crop(max_length)`` with DynamicCache's meaning: keep the first
    ``max_length`` positions, or, when negative, drop that many from the end."""
    if max_length < 0:
        max_length = length - abs(max_length)
    if max_length < 0:
        raise ValueError(f"cannot crop a cache of {length} tokens by more than its length")
    return min(length, max_length)


def _bucket_for(needed: int, capacity: int, max_capacity: int) -> int:
    """The capacity (doubling from ``capacity``, capped at ``max_capacity``) that holds ``needed``."""
    if needed > max_capacity:
        raise ValueError(
            f"the conversation needs {needed} LLM positions, more than the LLM's context of {max_capacity}"
        )
    cap = capacity
    while cap < needed:
        cap *= 2
    return min(cap, max_capacity)


class StaticKVCache:
    """Keys and values of every layer in preallocated tensors, one (B, kv_heads, capacity,
    head_dim) pair per layer: the compiled step writes each in place (one tensor spanning all
    layers would make inductor copy it whole at every write). Positions >= ``get_seq_length()``
    are stale and masked out, so ``crop`` only moves the length. Capacity grows by doubling
    buckets up to ``max_capacity`` (copying once per bucket)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        *,
        max_capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int = FIRST_BUCKET,
    ):
        self.max_capacity = max_capacity
        self.length = 0
        shape = (batch, kv_heads, min(capacity, max_capacity), head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._mark_static()

    def _mark_static(self) -> None:
        # CUDA graphs need the cache at a fixed address; the step mutates it in place.
        if self.k[0].device.type == "cuda":
            for t in (*self.k, *self.v):
                torch._dynamo.mark_static_address(t)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop that many), as DynamicCache.crop."""
        self.length = _cropped_length(self.length, max_length)

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions in all (the next bucket that holds them)."""
        if needed <= self.capacity:
            return
        cap = _bucket_for(needed, self.capacity, self.max_capacity)
        for tensors in (self.k, self.v):
            for i, old in enumerate(tensors):
                new = old.new_zeros(*old.shape[:2], cap, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                tensors[i] = new
        self._mark_static()


# ------------------------------------------------------------------------------------ lean Llama


def lean_unsupported(config) -> str | None:
    """Why the lean Llama step cannot run this HF config, or None when it can."""
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not in the Llama family"
    act = getattr(config, "hidden_act", "silu")
    if act not in LEAN_ACTIVATIONS:
        return f"hidden_act {act!r} is not one of {sorted(LEAN_ACTIVATIONS)}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        return f"RoPE type {rope_type!r} depends on the sequence length (lean step supports {STATIC_ROPE_TYPES})"
    return None


class LeanLlama(torch.nn.Module):
    """A Llama decoder over the weights of a Hugging Face ``LlamaForCausalLM``, shared, not copied.

    The per-layer weights sit in plain Python lists so the traced graph reads each one exactly
    where HF keeps it; RoPE cos/sin come from HF's own rotary module (RoPE scaling included)."""

    def __init__(self, hf):
        super().__init__()
        c = hf.config
        self.num_layers = c.num_hidden_layers
        self.num_heads = c.num_attention_heads
        self.kv_heads = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.act = LEAN_ACTIVATIONS[getattr(c, "hidden_act", "silu")]
        self.max_positions = c.max_position_embeddings
        self.scale = self.head_dim**-0.5
        self.fuse_attention = False  # set by a compiling engine (see _attend_bucket)
        base = hf.model
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.weight
        self.lm_head = hf.lm_head.weight
        self.lm_head_bias = hf.lm_head.bias
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(
                tuple(
                    t
                    for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
                    for t in (lin.weight, lin.bias)
                )
                + (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            )
        self.matvec = _matvec_op([w for layer in self.layers for w in layer[:14:2]] + [self.lm_head])
        with torch.no_grad():
            pos = torch.arange(self.max_positions, device=self.embed.device)[None]
            probe = torch.empty(0, dtype=self.embed.dtype, device=self.embed.device)
            cos, sin = base.rotary_emb(probe, pos)
        self.register_buffer("cos", cos[0].contiguous(), persistent=False)  # (positions, head_dim)
        self.register_buffer("sin", sin[0].contiguous(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, batch: int = 1, capacity: int = FIRST_BUCKET) -> StaticKVCache:
        return StaticKVCache(
            self.num_layers,
            batch,
            self.kv_heads,
            self.head_dim,
            max_capacity=self.max_positions,
            dtype=self.dtype,
            device=self.embed.device,
            capacity=capacity,
        )

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # As HF LlamaRMSNorm: statistics in fp32, scale after casting back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x.to(dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(
        self,
        x: torch.Tensor,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        pos: torch.Tensor,
        start: int | None = None,
    ) -> torch.Tensor:
        """x (B, T, d) embeddings at positions pos .. pos + T - 1 (``pos`` a 1-element long tensor);
        writes their K/V into the caches and returns fp32 logits of the last position (B, V).

        ``start`` is None in the decode step: attention then runs over the whole cache bucket
        with a mask, so the shapes, and therefore the compiled graph, depend only on
        (B, T, capacity), never on the position. Prefill passes ``start`` (= pos, as an int) and
        attends with SDPA to the filled part of the cache only."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.kv_heads, self.head_dim
        positions = pos + torch.arange(T, device=x.device)
        cos, sin = self.cos[positions], self.sin[positions]  # (T, D)
        if start is None:
            # key j is visible to query t when j <= pos + t
            visible = torch.arange(k_cache[0].shape[2], device=x.device)[None, :] <= positions[:, None]
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=x.device).masked_fill(~visible, float("-inf"))
        elif start:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        # Under autocast F.linear casts the weights; our kernel takes them as they are.
        matvec = self.matvec is not None and not torch.is_autocast_enabled(x.device.type)
        lin = self._linears if matvec and B * T <= MATVEC_MAX_ROWS else _torch_linears
        for i, (wq, bq, wk, bk, wv, bv, wo, bo, wg, bg, wu, bu, wd, bd, ln1, ln2) in enumerate(self.layers):
            h = self._rms(x, ln1)
            q, k, v = lin(h, (wq, wk, wv), (bq, bk, bv))
            q = q.view(B, T, H, D).transpose(1, 2)
            k = k.view(B, T, Hkv, D).transpose(1, 2)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            # Under autocast k/v come out in the autocast dtype; the cache keeps the weights'.
            k_cache[i][:, :, positions] = k.to(k_cache[i].dtype)
            v_cache[i][:, :, positions] = v.to(v_cache[i].dtype)
            if start is None:
                o = self._attend_bucket(q, k_cache[i], v_cache[i], bias)
            else:
                keys, values = k_cache[i][:, :, : start + T], v_cache[i][:, :, : start + T]
                if Hkv != H:
                    keys, values = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)
                o = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask if start else None, is_causal=not start, scale=self.scale
                )
            x = x + lin(o.transpose(1, 2).reshape(B, T, H * D), (wo,), (bo,))[0]
            gate, up = lin(self._rms(x, ln2), (wg, wu), (bg, bu))
            x = x + lin(self.act(gate) * up, (wd,), (bd,))[0]
        # Only the last position's logits: B rows, a matrix-vector product even after a prefill.
        lin = self._linears if matvec and B <= MATVEC_MAX_ROWS else _torch_linears
        return lin(self._rms(x[:, -1], self.norm), (self.lm_head,), (self.lm_head_bias,))[0].float()

    def _linears(self, x: torch.Tensor, weights: tuple, biases: tuple) -> list[torch.Tensor]:
        """F.linear(x, w, b) for each weight in one call of our kernel (one pass over the threads)."""
        y = self.matvec(x, list(weights), list(biases))
        return list(y.split([w.shape[0] for w in weights], -1)) if len(weights) > 1 else [y]

    def _attend_bucket(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """q (B, H, T, D) over a whole cache bucket (B, Hkv, cap, D); the G query heads of one KV
        head share it, so the cache is never expanded. Traced for the compiler, the products are
        written as broadcast multiply + sum, which inductor fuses into one pass over the cache
        (a batched GEMM with 1-row operands runs far below bandwidth on a CPU)."""
        B, H, T, D = q.shape
        Hkv, cap = keys.shape[1], keys.shape[2]
        G = H // Hkv
        if self.fuse_attention:
            qg = q.view(B, Hkv, G * T, 1, D)
            scores = (qg * keys[:, :, None]).sum(-1).float() * self.scale  # (B, Hkv, G*T, cap)
        else:
            scores = torch.matmul(q.reshape(B, Hkv, G * T, D), keys.transpose(-1, -2)).float() * self.scale
        probs = (scores.view(B, Hkv, G, T, cap) + bias).softmax(-1).to(q.dtype).view(B, Hkv, G * T, cap)
        if self.fuse_attention:
            o = (probs[..., None] * values[:, :, None]).sum(-2)
        else:
            o = torch.matmul(probs, values)
        return o.view(B, H, T, D)

    def step(
        self, tokens: torch.Tensor, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], pos: torch.Tensor
    ) -> torch.Tensor:
        """One decode step: tokens (B,) at position ``pos`` -> logits (B, V)."""
        return self.forward(F.embedding(tokens[:, None], self.embed), k_cache, v_cache, pos)


def _torch_linears(x: torch.Tensor, weights: tuple, biases: tuple) -> list[torch.Tensor]:
    return [F.linear(x, w, b) for w, b in zip(weights, biases)]


def _matvec_op(weights: list[torch.Tensor]):
    """``fusedvlm_cpu::linear`` when it can serve these weights (contiguous, on the CPU, one of
    fp32/bf16/fp16, and the C++ kernels built), else None: the step then uses F.linear throughout.
    ``FUSEDVLM_MATVEC=0`` keeps F.linear (to compare the two)."""
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
        return None
    if any(w.device.type != "cpu" or not w.is_contiguous() for w in weights):
        return None
    from fusedvlm.env import env_flag

    if not env_flag("FUSEDVLM_MATVEC", True):
        return None
    from fusedvlm import native

    return native.load().linear if native.available() else None


# ------------------------------------------------------------------------------------ engines


@dataclass
class CompileStats:
    seconds: float = 0.0  # first-call (trace + compile) time of every compiled shape
    graphs: int = 0


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


def _enable_compile_cache() -> None:
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


def _compile_step(fn, device: torch.device):
    """``fn`` compiled once per input shape: inductor C++ on a CPU, CUDA graphs on a GPU."""
    _enable_compile_cache()
    # One graph per (batch, bucket): more than dynamo's default 8 recompiles of one function.
    limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, dynamic=False, fullgraph=True)


class LeanEngine:
    """Prefill and decode through :class:`LeanLlama` over a :class:`StaticKVCache`."""

    def __init__(self, hf, *, compile: bool = True, reason: str = ""):
        self.hf = hf
        self.model = LeanLlama(hf)
        self.device = self.model.embed.device
        self.compile = compile
        self.path = "lean-compiled" if compile else "lean-eager"
        self.reason = reason
        self.compile_stats = CompileStats()
        self._seen: set[tuple[int, int]] = set()
        self._step = self.model.step
        self.model.fuse_attention = compile
        if compile:
            self._step = _compile_step(self.model.step, self.device)

    def new_cache(self, batch: int = 1) -> StaticKVCache:
        return self.model.new_cache(batch)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """embeds (B, L, d) appended to the cache -> fp32 next-token logits (B, V). Uncompiled:
        prompt lengths vary, and prefill is GEMM-bound, so the Python overhead is small."""
        start = cache.get_seq_length()
        cache.reserve(start + embeds.shape[1])
        pos = torch.tensor([start], device=self.device)
        logits = self.model(embeds.to(self.model.dtype), cache.k, cache.v, pos, start)
        cache.length = start + embeds.shape[1]
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """tokens (B,) fed at the cache's length -> fp32 logits (B, V)."""
        start = cache.get_seq_length()
        cache.reserve(start + 1)
        pos = torch.tensor([start], device=self.device)
        logits = self._step(tokens, cache.k, cache.v, pos)
        cache.length = start + 1
        # CUDA graph outputs live in a pool that the next replay overwrites.
        return logits.clone() if self.device.type == "cuda" else logits

    @torch.no_grad()
    def prepare(self, cache: StaticKVCache, upto: int) -> float:
        """Grow the cache to the bucket holding ``upto`` positions (capped at the context) and
        compile the step for it once; returns the seconds spent compiling (0 when cached).

        The warm-up calls write K/V at the first free position, which is masked until a real
        step overwrites it, so the cache's contents are untouched."""
        cache.reserve(min(upto, cache.max_capacity))
        key = (cache.batch_size, cache.capacity)
        if not self.compile or key in self._seen or cache.get_seq_length() >= cache.capacity:
            return 0.0
        tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=self.device)
        pos = torch.tensor([cache.get_seq_length()], device=self.device)

        def warm():
            # CUDA graphs warm up on the first call and record on the next ones.
            for _ in range(3 if self.device.type == "cuda" else 1):
                self._step(tokens, cache.k, cache.v, pos)

        return _first_calls(self, key, warm)

    def _uncompile(self) -> None:
        self.compile, self._step, self.path = False, self.model.step, "lean-eager"
        self.model.fuse_attention = False


def _first_calls(engine, key: tuple[int, int], warm) -> float:
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


class HFEngine:
    """Hugging Face forward with its own (dynamic) cache: today's path, for any causal LM."""

    def __init__(self, hf, *, reason: str = ""):
        self.hf = hf
        self.device = hf.get_input_embeddings().weight.device
        self.path = "hf"
        self.reason = reason
        self.compile_stats = CompileStats()
        self._cache_kw = cache_kwarg(hf)

    def new_cache(self, batch: int = 1):
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, cache) -> torch.Tensor:
        start = cache.get_seq_length()
        end = start + embeds.shape[1]
        out = self.hf(
            inputs_embeds=embeds,
            use_cache=True,
            **{self._cache_kw: cache},
            position_ids=torch.arange(start, end, device=self.device)[None].expand(embeds.shape[0], -1),
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        start = cache.get_seq_length()
        out = self.hf(
            input_ids=tokens[:, None],
            use_cache=True,
            **{self._cache_kw: cache},
            position_ids=torch.full((tokens.shape[0], 1), start, device=self.device),
        )
        return out.logits[:, -1].float()

    def prepare(self, cache, upto: int) -> float:
        return 0.0


# ------------------------------------------------------------------------------------ HF static


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


class HFStaticCache:
    """HF's ``StaticCache`` behind the session's cache API: ``get_seq_length()`` is a Python int
    (HF's is a tensor, so that the compiled step never specialises on it) and ``crop`` moves
    HF's length in place, leaving stale positions that the causal mask hides and the next
    writes overwrite. Capacity grows by doubling buckets up to ``max_capacity``, copying the
    cached positions once per bucket (a new bucket is a new shape: one more compiled graph)."""

    def __init__(self, config, *, batch: int, max_capacity: int, capacity: int = FIRST_BUCKET):
        from transformers import StaticCache

        self._make = lambda cap: StaticCache(config=config, max_cache_len=cap)
        self.batch_size = batch
        self.max_capacity = max_capacity
        self.length = 0
        self.hf = self._make(min(capacity, max_capacity))

    @property
    def capacity(self) -> int:
        return self.hf.layers[0].max_cache_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def _set_length(self, length: int) -> None:
        self.length = length
        for layer in self.hf.layers:
            layer.cumulative_length.fill_(length)  # in place: compiled graphs hold its address

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop that many), as DynamicCache.crop."""
        self._set_length(_cropped_length(self.length, max_length))

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions in all (the next bucket that holds them)."""
        if needed <= self.capacity:
            return
        new = self._make(_bucket_for(needed, self.capacity, self.max_capacity))
        n = self.length
        for old, layer in zip(self.hf.layers, new.layers):
            if old.is_initialized:  # allocated by the first forward, with its dtype and device
                layer.lazy_initialization(old.keys[:, :, :0], old.values[:, :, :0])
                layer.keys[:, :, :n] = old.keys[:, :, :n]
                layer.values[:, :, :n] = old.values[:, :, :n]
        self.hf = new
        self._set_length(n)


class HFStaticEngine:
    """HF's own forward over :class:`HFStaticCache`, the one-token step compiled once per
    (batch, bucket); prefill runs uncompiled (prompt lengths vary)."""

    def __init__(self, hf, *, compile: bool = True, reason: str = ""):
        self.hf = hf
        self.device = hf.get_input_embeddings().weight.device
        self.max_capacity = hf.config.max_position_embeddings
        self.compile = compile
        self.path = "hf-static-compiled" if compile else "hf-static-eager"
        self.reason = reason
        self.compile_stats = CompileStats()
        self._seen: set[tuple[int, int]] = set()
        self._cache_kw = cache_kwarg(hf)
        self._step = _compile_step(self._forward_step, self.device) if compile else self._forward_step

    def new_cache(self, batch: int = 1) -> HFStaticCache:
        return HFStaticCache(self.hf.config, batch=batch, max_capacity=self.max_capacity)

    def _forward_step(self, tokens: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """tokens (B,) at positions (B, 1) through HF's forward -> fp32 logits (B, V). The
        position is a tensor and HF's cache length too, so the graph depends on shapes only."""
        out = self.hf(input_ids=tokens[:, None], position_ids=position, use_cache=True, **{self._cache_kw: cache})
        return out.logits[:, -1].float()

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, cache: HFStaticCache) -> torch.Tensor:
        """embeds (B, L, d) appended to the cache -> fp32 next-token logits (B, V)."""
        start = cache.get_seq_length()
        end = start + embeds.shape[1]
        cache.reserve(end)
        out = self.hf(
            inputs_embeds=embeds,
            use_cache=True,
            **{self._cache_kw: cache.hf},
            position_ids=torch.arange(start, end, device=self.device)[None].expand(embeds.shape[0], -1),
            logits_to_keep=1,
        )
        cache.length = end
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: HFStaticCache) -> torch.Tensor:
        """tokens (B,) fed at the cache's length -> fp32 logits (B, V)."""
        start = cache.get_seq_length()
        cache.reserve(start + 1)
        logits = self._step(tokens, torch.full((tokens.shape[0], 1), start, device=self.device), cache.hf)
        cache.length = start + 1
        # CUDA graph outputs live in a pool that the next replay overwrites.
        return logits.clone() if self.device.type == "cuda" else logits

    @torch.no_grad()
    def prepare(self, cache: HFStaticCache, upto: int) -> float:
        """Grow the cache to the bucket holding ``upto`` positions (capped at the context) and
        compile the step for it once; returns the seconds spent compiling (0 when cached).

        The warm-up calls write K/V from the first free position on, which the causal mask hides
        until real steps overwrite it; HF's length is put back after them."""
        cache.reserve(min(upto, cache.max_capacity))
        key = (cache.batch_size, cache.capacity)
        start = cache.get_seq_length()
        if not self.compile or key in self._seen or start >= cache.capacity:
            return 0.0
        tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=self.device)
        position = torch.full((cache.batch_size, 1), start, device=self.device)

        def warm():
            try:
                # CUDA graphs warm up on the first call and record on the next ones; every
                # call advances HF's write position, so no more calls than free positions.
                for _ in range(min(3 if self.device.type == "cuda" else 1, cache.capacity - start)):
                    self._step(tokens, position, cache.hf)
            finally:
                cache.crop(start)

        return _first_calls(self, key, warm)

    def _uncompile(self) -> None:
        self.compile, self._step, self.path = False, self._forward_step, "hf-static-eager"


def compile_default() -> bool:
    """Whether the lean step compiles unless told otherwise: yes, but ``FUSEDVLM_COMPILE=0`` turns
    it off for a whole process (the test suite does, keeping compilation to its own tests; false,
    no and off too)."""
    from fusedvlm.env import env_flag

    return env_flag("FUSEDVLM_COMPILE", True)


def make_engine(hf, decode: str = "auto", compile: bool | None = None):
    """The decode engine for a HF causal LM: ``decode`` is ``auto`` (lean when the config allows,
    else HF's forward over a static cache when the model supports one and the step compiles,
    else HF), ``lean`` / ``hf-static`` (error when unsupported) or ``hf``; ``compile`` None means
    :func:`compile_default`. ``engine.reason`` says why."""
    if compile is None:
        compile = compile_default()
    if decode not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {decode!r}; choose from {DECODE_PATHS}")
    if decode == "hf":
        return HFEngine(hf, reason="requested (--decode hf)")
    if compile:
        _enable_compile_cache()
    compiler = (
        "" if not compile or _compile_available() else "torch.compile is unavailable here (no C++ compiler / inductor)"
    )
    off = "compilation off (--no-compile or FUSEDVLM_COMPILE=0)"
    why_not = lean_unsupported(hf.config) if decode != "hf-static" else "--decode hf-static"
    if why_not is None:
        return LeanEngine(
            hf,
            compile=compile and not compiler,
            reason=compiler or "Llama-family config" + ("" if compile else f"; {off}"),
        )
    if decode == "lean":
        raise ValueError(f"--decode lean: {why_not}")
    why_not_static = hf_static_unsupported(hf)
    if decode == "hf-static":
        if why_not_static is not None:
            raise ValueError(f"--decode hf-static: {why_not_static}")
        return HFStaticEngine(
            hf,
            compile=compile and not compiler,
            reason=f"requested (--decode hf-static){'; ' + (compiler or off) if compiler or not compile else ''}",
        )
    if why_not_static is not None:
        return HFEngine(hf, reason=f"lean step unsupported: {why_not}; HF static cache unsupported: {why_not_static}")
    if not compile or compiler:
        # The static path exists for its compiled step: uncompiled, auto keeps the dynamic cache
        # every causal LM had before (``--decode hf-static`` still runs it eagerly).
        return HFEngine(
            hf,
            reason=f"lean step unsupported: {why_not}; the HF static-cache step needs torch.compile: {compiler or off}",
        )
    return HFStaticEngine(
        hf, compile=True, reason=f"lean step unsupported: {why_not}; {type(hf).__name__} supports a static cache"
    )


def _compile_available() -> bool:
    import shutil

    try:
        import torch._inductor
    except ImportError:
        return False
    # Inductor's CPU backend generates C++; without a compiler it fails at the first call.
    return (
        shutil.which(os.environ.get("CXX", "g++")) is not None
        or shutil.which("c++") is not None
        or torch.cuda.is_available()
    )
