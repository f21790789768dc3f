"""The lean decode path: a Llama decoder over the Hugging Face weights in place (no copy), its
K/V in preallocated buffers, its one-token step traced by ``torch.compile`` into one graph.

Why: one decode step of a small LLM is a chain of GEMVs that only have to stream the weights
once. Hugging Face's forward spends most of a step in Python (module calls, cache bookkeeping,
mask building) and its dynamic cache reallocates every step, so it reaches a third of the
memory-bandwidth limit on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedvlm.decode.engine import FIRST_BUCKET, BucketedCache, StaticCacheEngine
from fusedvlm.model.llama import apply_rope, rms_norm

# RoPE variants whose frequencies do not depend on the sequence length: one table serves all.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
# Activations of the Llama MLP that the lean step implements (design §5 uses SiLU).
LEAN_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# Rows of activations (batch x new tokens) up to which the lean step's projections run our
# matrix-vector kernel (fusedvlm::linear) on a CPU, by weight dtype. It streams each weight once
# and reuses it from cache for every row: fp32 up to a few rows, beyond which MKL's GEMM wins.
# Half-precision weights take it for a prefill too: torch's bf16 GEMM runs at ~20 GFLOP/s on a CPU
# without bf16 arithmetic. Measured on the 2-core EPYC (AVX2), a 4096x4096 bf16 weight, 2 threads:
# ours 50-69 GFLOP/s from 4 to 256 rows, torch's bf16 18-21, an fp32 copy + sgemm ahead from
# ~200 rows (which _float_linear then takes). int8: :func:`fusedvlm.quant.int8_matmul` above.
MATVEC_MAX_ROWS = {torch.float32: 4, torch.bfloat16: 128, torch.float16: 128, torch.int8: 4}


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


class StaticKVCache(BucketedCache):
    """Keys and values of every layer in preallocated tensors, one (B, kv_heads, capacity,
    head_dim) pair per layer: the compiled step writes each in place (one tensor spanning all
    layers would make inductor copy it whole at every write)."""

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
        super().__init__(max_capacity)
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

    def _grow(self, capacity: int) -> None:
        for tensors in (self.k, self.v):
            for i, old in enumerate(tensors):
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                tensors[i] = new
        self._mark_static()


# ------------------------------------------------------------------------------------ projections


def _torch_linears(x: torch.Tensor, weights: tuple, biases: tuple, scales: tuple) -> list[torch.Tensor]:
    from fusedvlm.quant import int8_matmul

    return [
        _float_linear(x, w, b) if s is None else int8_matmul(x, w, s, b) for w, b, s in zip(weights, biases, scales)
    ]


def _float_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if x.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype:
        # fp32 copies and sgemm beat torch's half-precision CPU GEMM (see MATVEC_MAX_ROWS).
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)


def _matvec_op(weights: list[torch.Tensor]):
    """``fusedvlm::linear`` when it can serve these weights (contiguous, on the CPU, one of
    fp32/bf16/fp16, or int8 with scales, and the C++ kernels built), else None: the step then
    uses F.linear (or, for int8, :func:`fusedvlm.quant.int8_matmul`) throughout.
    ``FUSEDVLM_MATVEC=0`` keeps those (to compare)."""
    floats = {w.dtype for w in weights if w.dtype != torch.int8}
    if len(floats) > 1 or not floats <= {torch.float32, torch.bfloat16, torch.float16}:
        return None
    if any(w.device.type != "cpu" or not w.is_contiguous() for w in weights):
        return None
    from fusedvlm.env import env_flag

    if not env_flag("FUSEDVLM_MATVEC", True):
        return None
    from fusedvlm import native

    return native.load().linear if native.available() else None


def fused_step_unsupported(model: LeanLlama) -> str | None:
    """Why :meth:`LeanLlama.fused_step` (``fusedvlm::llama_decode_step``, csrc/decode_step.inc)
    cannot run this model's decode step, or None when it can: the CPU, one float dtype for the
    activations, norms, biases and cache (fp32, bf16 or fp16), projections in it or int8, and the
    C++ kernels built."""
    if model.embed.device.type != "cpu":
        return f"the LLM is on {model.embed.device.type}, the fused step runs on the CPU"
    dtype = model.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the LLM computes in {dtype}"
    if model.head_dim % 2:
        return f"head_dim {model.head_dim} is odd"
    if any(t is not None and t.dtype != dtype for t in (*model.step_biases, *model.step_norms)):
        return f"a bias or norm weight is not {dtype} like the embeddings"
    if any(w.dtype not in (dtype, torch.int8) or not w.is_contiguous() for w in model.step_weights):
        return f"a projection is neither a contiguous {dtype} nor an int8 weight"
    from fusedvlm import native

    if not native.available():
        return "the C++ kernels are not built"
    if model.matvec is None:
        # FUSEDVLM_MATVEC=0 asks for the op-by-op step with F.linear, to compare.
        return "FUSEDVLM_MATVEC=0 keeps F.linear"
    return None


def _cache_attention_op(device: torch.device):
    """``fusedvlm::decode_attention`` for a step on the CPU, eager or compiled (the C++ kernels
    built), else None: the step then attends over the whole cache bucket (_attend_bucket)."""
    if device.type != "cpu":
        return None
    from fusedvlm import native

    return native.load().decode_attention if native.available() else None


# ------------------------------------------------------------------------------------ model


class LeanLlama(torch.nn.Module):
    """A Llama decoder over the weights of a Hugging Face ``LlamaForCausalLM``, shared, not copied.

    The per-layer weights sit in plain Python lists so the traced graph reads each one exactly
    where HF keeps it; RoPE cos/sin come from HF's own rotary module (RoPE scaling included);
    RMSNorm and the rotation are model/llama.py's, which follow HF's numerics. An int8 LLM
    (:func:`fusedvlm.quant.quantize_llm`) keeps its int8 weights and fp32 scales
    (``self.scales``, None for a float projection), which the matrix-vector kernel reads as
    they are."""

    def __init__(self, hf):
        super().__init__()
        c = hf.config
        self.num_layers = c.num_hidden_layers
        self.num_heads = c.num_attention_heads
        self.kv_heads = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.act_name = getattr(c, "hidden_act", "silu")
        self.act = LEAN_ACTIVATIONS[self.act_name]
        self.max_positions = c.max_position_embeddings
        self.scale = self.head_dim**-0.5
        self.fuse_attention = False  # set by a compiling engine (see _attend_bucket)
        from fusedvlm.quant import int8_parts

        base = hf.model
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.weight
        self.lm_head, self.lm_head_scale = int8_parts(hf.lm_head)
        self.lm_head_bias = hf.lm_head.bias
        self.layers, self.scales = [], []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            parts = [
                int8_parts(lin) for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            ]
            biases = [lin.bias for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)]
            self.layers.append(
                tuple(t for (w, _), b in zip(parts, biases) for t in (w, b))
                + (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            )
            self.scales.append(tuple(s for _, s in parts))
        # Every projection with its bias and scale, and every norm weight, in the order the fused
        # step takes them (q, k, v, o, gate, up, down per layer, then the LM head).
        self.step_weights = [w for layer in self.layers for w in layer[:14:2]] + [self.lm_head]
        self.step_biases = [b for layer in self.layers for b in layer[1:14:2]] + [self.lm_head_bias]
        self.step_scales = [s for layer in self.scales for s in layer] + [self.lm_head_scale]
        self.step_norms = [t for layer in self.layers for t in layer[14:]] + [self.norm]
        self.matvec = _matvec_op(self.step_weights)
        self.cache_attention = _cache_attention_op(self.embed.device)
        self.matvec_rows = MATVEC_MAX_ROWS[self.layers[0][0].dtype] if self.layers else 0
        self.head_rows = MATVEC_MAX_ROWS[self.lm_head.dtype]
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

        ``start`` is None in the decode step: attention then reads the visible keys through
        fusedvlm::decode_attention (CPU), else runs over the whole cache bucket with a mask;
        either way ``pos`` stays a tensor, so the shapes, and therefore the compiled graph,
        depend only on (B, T, capacity), never on the position. Prefill passes ``start`` (= pos,
        as an int) and attends to the filled part of the cache only."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.kv_heads, self.head_dim
        positions = pos + torch.arange(T, device=x.device)
        cos, sin = self.cos[positions], self.sin[positions]  # (T, D)
        # On the CPU the step reads only the visible keys, as stored (csrc/decode_attention.inc).
        cache_op = self.cache_attention if start is None else None
        if start is None and cache_op is None:
            # key j is visible to query t when j <= pos + t
            visible = torch.arange(k_cache[0].shape[2], device=x.device)[None, :] <= positions[:, None]
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=x.device).masked_fill(~visible, float("-inf"))
        elif start and x.device.type != "cpu":
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        # Under autocast F.linear casts the weights; our kernel takes them as they are.
        matvec = self.matvec is not None and not torch.is_autocast_enabled(x.device.type)
        lin = self._linears if matvec and B * T <= self.matvec_rows else _torch_linears
        for i, (wq, bq, wk, bk, wv, bv, wo, bo, wg, bg, wu, bu, wd, bd, ln1, ln2) in enumerate(self.layers):
            sq, sk, sv, so, sg, su, sd = self.scales[i]
            h = rms_norm(x, ln1, self.eps)
            q, k, v = lin(h, (wq, wk, wv), (bq, bk, bv), (sq, sk, sv))
            q = apply_rope(q.view(B, T, H, D), cos, sin).transpose(1, 2)
            k = apply_rope(k.view(B, T, Hkv, D), cos, sin).transpose(1, 2)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            # Under autocast k/v come out in the autocast dtype; the cache keeps the weights'.
            k_cache[i][:, :, positions] = k.to(k_cache[i].dtype)
            v_cache[i][:, :, positions] = v.to(v_cache[i].dtype)
            if cache_op is not None:
                o = cache_op(q, k_cache[i], v_cache[i], pos, self.scale)
            elif start is None:
                o = self._attend_bucket(q, k_cache[i], v_cache[i], bias)
            elif x.device.type == "cpu":
                o = self._attend_prefill(q, k_cache[i], v_cache[i], start)
            else:
                keys, values = k_cache[i][:, :, : start + T], v_cache[i][:, :, : start + T]
                if Hkv != H:
                    keys, values = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)
                o = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask if start else None, is_causal=not start, scale=self.scale
                )
            x = x + lin(o.transpose(1, 2).reshape(B, T, H * D), (wo,), (bo,), (so,))[0]
            gate, up = lin(rms_norm(x, ln2, self.eps), (wg, wu), (bg, bu), (sg, su))
            x = x + lin(self.act(gate) * up, (wd,), (bd,), (sd,))[0]
        # Only the last position's logits: B rows, a matrix-vector product even after a prefill.
        lin = self._linears if matvec and B <= self.head_rows else _torch_linears
        head = (self.lm_head,), (self.lm_head_bias,), (self.lm_head_scale,)
        return lin(rms_norm(x[:, -1], self.norm, self.eps), *head)[0].float()

    def fused_step(
        self, tokens: torch.Tensor, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], pos: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`step` as one C++ op (``fusedvlm::llama_decode_step``; needs
        :func:`fused_step_unsupported` to be None): tokens (B,) at position ``pos`` -> fp32 logits
        (B, V), the K/V written into the caches. The formulas of :meth:`forward`, rounded to the
        model's dtype where it stores a tensor, with every projection and the attention in one
        parallel region (csrc/decode_step.inc)."""
        from fusedvlm import native

        return native.load().llama_decode_step(
            F.embedding(tokens, self.embed),
            self.step_weights,
            self.step_biases,
            self.step_scales,
            self.step_norms,
            k_cache,
            v_cache,
            pos,
            self.cos,
            self.sin,
            self.num_heads,
            self.eps,
            self.scale,
            self.act_name,
        )

    def _linears(self, x: torch.Tensor, weights: tuple, biases: tuple, scales: tuple) -> list[torch.Tensor]:
        """F.linear(x, w, b) for each weight in one call of our kernel (one pass over the threads);
        int8 weights come with their scales."""
        y = self.matvec(x, list(weights), list(biases), None if scales[0] is None else list(scales))
        return list(y.split([w.shape[0] for w in weights], -1)) if len(weights) > 1 else [y]

    def _attend_prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """q (B, H, T, D) at positions start .. start + T - 1 over the cache's first start + T keys
        (B, Hkv, capacity, D), bottom-right causal; -> (B, H, T, D). On the CPU our packed
        kernel (one segment per batch row) reads the G query heads of a key/value head from one
        copy of the keys, where SDPA needs them repeated G times, and it skips the masked
        half (design §9)."""
        from fusedvlm.kernels import packed_attention

        B, H, T, D = q.shape
        Hkv, S = keys.shape[1], start + T
        cu_q = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=q.device)
        o = packed_attention(
            q.transpose(1, 2).reshape(B * T, H, D),
            keys[:, :, :S].transpose(1, 2).reshape(B * S, Hkv, D),
            values[:, :, :S].transpose(1, 2).reshape(B * S, Hkv, D),
            cu_q,
            cu_k,
            causal=True,
            scale=self.scale,
            max_seqlen_q=T,
            max_seqlen_k=S,
        )
        return o.view(B, T, H, D).transpose(1, 2)

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


class LeanEngine(StaticCacheEngine):
    """Prefill and decode through :class:`LeanLlama` over a :class:`StaticKVCache`.

    ``fused`` asks for :meth:`LeanLlama.fused_step` where :func:`fused_step_unsupported` allows it
    (``self.fused``; ``self.why_not_fused`` says why not): a step of up to ``model.matvec_rows`` rows
    is then one C++ op, nothing to compile, on the path ``lean-fused``; larger batches step as
    ``compile`` says (their projections are GEMMs, where the op's matrix-vector tiles lose)."""

    name = "lean"
    tensor_only_inputs = True

    def __init__(self, hf, *, compile: bool = True, fused: bool = False, reason: str = ""):
        self.hf = hf
        self.model = LeanLlama(hf)
        self.why_not_fused = fused_step_unsupported(self.model) if fused else None
        self.fused = fused and self.why_not_fused is None
        # Traced without fusedvlm::decode_attention (GPU, no C++ kernels), attention over the
        # bucket is written for inductor to fuse (see _attend_bucket).
        self.model.fuse_attention = compile
        super().__init__(self.model.step, self.model.embed.device, compile=compile, reason=reason)

    @property
    def path(self) -> str:
        return "lean-fused" if self.fused else super().path

    def new_cache(self, batch: int = 1) -> StaticKVCache:
        return self.model.new_cache(batch)

    def step_path(self, batch: int) -> str:
        return self.path if self._fuses(batch) else super().path

    def _fuses(self, batch: int) -> bool:
        # Under autocast the eager step computes in the autocast dtype; the op in the model's.
        return self.fused and batch <= self.model.matvec_rows and not torch.is_autocast_enabled("cpu")

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        if not self._fuses(cache.batch_size):
            return super().step(tokens, cache)
        start = cache.get_seq_length()
        cache.reserve(start + 1)
        logits = self.model.fused_step(tokens, cache.k, cache.v, torch.tensor([start]))
        cache.length = start + 1
        return logits

    @torch.no_grad()
    def prepare(self, cache: StaticKVCache, upto: int) -> float:
        if not self._fuses(cache.batch_size):
            return super().prepare(cache, upto)
        cache.reserve(min(upto, cache.max_capacity))
        return 0.0

    def _prefill(self, embeds: torch.Tensor, cache: StaticKVCache, start: int) -> torch.Tensor:
        pos = torch.tensor([start], device=self.device)
        return self.model(embeds.to(self.model.dtype), cache.k, cache.v, pos, start)

    def _step_inputs(self, cache: StaticKVCache, start: int) -> tuple:
        return cache.k, cache.v, torch.tensor([start], device=self.device)

    def _uncompile(self) -> None:
        super()._uncompile()
        self.model.fuse_attention = False
