"""Prefill FLOPs per stage, attention included.

Matmuls and convolutions are counted by ``torch.utils.flop_counter.FlopCounterMode``. Its
attention formulas do not fit this model: the CPU SDPA op is not registered at all (so
attention counts as zero, the paper's counter had the same blind spot, design §9), and
the registered GPU ones count the full L x S score matrix even when causal. So every SDPA
op is re-registered here with a formula that counts only the query-key pairs the mask lets
through, from ``is_causal`` (top-left aligned, as SDPA does) or from the mask itself.

The model's own ops (``fusedvlm::packed_attention``, ``fusedvlm::local_merge``) are dispatcher
operators with FLOP formulas registered beside them (kernels/*.py), so a dispatch mode counts
them on every backend (Triton, C++, torch) and at every call site, with nothing patched.

One multiply-add is 2 FLOPs. Attention forward: QK^T and PV, 2 * D each per unmasked pair
and query head, so ``4 * D * heads * pairs``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

# ---------------------------------------------------------------------------- pair counts

# The fusedvlm:: ops register their own formulas (kernels/*.py); these count the same pairs.
from fusedvlm.kernels.packed_attention import causal_pairs  # noqa: E402


def _sdpa_pairs(q_shape, k_shape, is_causal: bool, mask) -> int:
    """Unmasked pairs summed over batch and query heads of one SDPA call."""
    *lead, lq, _ = q_shape
    lk = k_shape[-2]
    bh = 1
    for d in lead:
        bh *= int(d)
    if mask is not None:
        allowed = torch.isfinite(mask) if mask.dtype != torch.bool else mask
        if is_causal:
            allowed = allowed & torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
        return int(allowed.expand(*lead, lq, lk).sum())
    if is_causal:
        return bh * causal_pairs(lq, lk, bottom_right=False)
    return bh * lq * lk


def _sdpa_formula(packet):
    names = [a.name for a in packet.default._schema.arguments]

    def formula(*args, out_val=None, **kwargs) -> int:
        bound = dict(zip(names, args))
        bound.update(kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask = bound.get("attn_mask", bound.get("attn_bias"))
        pairs = _sdpa_pairs(q.shape, k.shape, bool(bound.get("is_causal", False)), mask)
        return 2 * pairs * (q.shape[-1] + v.shape[-1])

    formula._get_raw = True  # the mask's values matter, not just its shape
    return formula


def _native_mha_flops(
    query,
    key,
    value,
    embed_dim,
    num_head,
    qkv_weight,
    qkv_bias,
    proj_weight,
    proj_bias,
    mask=None,
    need_weights=True,
    average_attn_weights=True,
    mask_type=None,
    out_val=None,
) -> int:
    """nn.MultiheadAttention's inference fast path (open_clip's ViT takes it): one fused op
    with the q/k/v input projection, attention and the output projection inside."""
    batch = query.shape[0] if query.dim() == 3 else 1
    lq, lk = query.shape[-2], key.shape[-2]
    e = int(embed_dim)
    proj = 2 * batch * (lq * e * e + 2 * lk * e * e + lq * e * e)
    if mask is None:
        pairs = batch * num_head * lq * lk
    else:
        allowed = ~mask if mask.dtype == torch.bool else torch.isfinite(mask)
        pairs = (
            int(allowed.expand(batch, num_head, lq, lk).sum())
            if allowed.dim() != 2
            else int(allowed.sum()) * batch * num_head
        )
    return proj + 4 * pairs * (e // num_head)


_native_mha_flops._get_raw = True

SDPA_OPS = [
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
]
ATTENTION_FORMULAS = {op: _sdpa_formula(op) for op in SDPA_OPS}
ATTENTION_FORMULAS[aten._native_multi_head_attention] = _native_mha_flops


# ---------------------------------------------------------------------------- counting


@dataclass
class FlopCount:
    total: int = 0
    attention: int = 0  # the part of ``total`` in attention ops (nn.MultiheadAttention's fused op: projections too)
    by_op: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def count_flops():
    """``with count_flops() as c: ...`` -> ``c.total``, ``c.attention``, ``c.by_op``."""
    import fusedvlm.kernels  # noqa: F401 - registers the fusedvlm:: ops and their FLOP formulas

    result = FlopCount()
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS)
    with counter:
        yield result
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    result.by_op = by_op
    result.total = sum(by_op.values())
    result.attention = sum(v for k, v in by_op.items() if "attention" in k)
    return result


# ---------------------------------------------------------------------------- prefill per stage

STAGES = ("preprocess", "vision", "merge", "fusion", "projection", "llm_prefill")


@torch.no_grad()
def prefill_flops(model, image, question: str, n_l: int, n_s: int | None = None) -> dict[str, FlopCount]:
    """FLOPs of each stage of a first question's prefill, exactly as
    :meth:`fusedvlm.session.ChatSession.ask` runs it (prefix-cached fusion, then the group)."""
    from fusedvlm.generation import prefill

    n_l, n_s = model.fuser.resolve_counts(n_l, n_s)
    qids = model.question_ids(question)
    out: dict[str, FlopCount] = {}
    with count_flops() as out["preprocess"]:
        views, counts = model.preprocess([image])
    with count_flops() as out["vision"]:
        tokens = model.vision(views)
    with count_flops() as out["merge"]:
        vision = model.fuser.merge_views(tokens, counts)
    with count_flops() as out["fusion"]:
        cache = model.prefix_cache(vision)
        fused, _ = model.fuse_next(cache, [qids], [True], n_l=n_l, n_s=n_s, project=False)
    with count_flops() as out["projection"]:
        new = model.fuser.projection(fused.hidden)
    tokens_llm = model.layout.question(question, n_l, True)
    embeds = model.llm_embeds(tokens_llm, new)
    with count_flops() as out["llm_prefill"]:
        prefill(model.llm, embeds)
    return out


# ---------------------------------------------------------------------------- analytic model


def decoder_flops(
    positions: Sequence[tuple[int, int]],
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> int:
    """Forward FLOPs of a Llama-style decoder (SwiGLU MLP, no biases) on new tokens.

    ``positions`` lists (start, count) runs: ``count`` new tokens at positions start ..
    start + count - 1 of one sequence, each attending causally to every earlier position."""
    per_token = 2 * (hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate)
    total = 0
    for start, count in positions:
        # Token at position p attends to p + 1 keys.
        pairs = count * start + count * (count + 1) // 2
        total += layers * (count * per_token + 4 * heads * head_dim * pairs)
    return total


def analytic_fusion_llm_flops(
    model, vision_tokens: int, question_tokens: int, n_l: int, llm_prompt_tokens: int
) -> dict[str, int]:
    """The n_l-dependent stages from the configs alone: fusion (vision prefix, then question,
    n_l - 1 queries and EOS), projection of the n_l fused tokens, LLM prefill of the prompt
    plus the LM head on its last position."""
    f = model.fuser.cfg.fusion
    fusion = decoder_flops(
        [(0, vision_tokens), (vision_tokens, question_tokens + n_l)],
        layers=f.num_layers,
        hidden=f.hidden_size,
        intermediate=f.intermediate_size,
        heads=f.num_heads,
        kv_heads=f.num_kv_heads,
        head_dim=f.head_dim,
    )
    proj = model.fuser.projection.weight
    c = model.llm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    llm = (
        decoder_flops(
            [(0, llm_prompt_tokens)],
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=head_dim,
        )
        + 2 * c.hidden_size * c.vocab_size
    )
    return {"fusion": fusion, "projection": 2 * n_l * proj.shape[0] * proj.shape[1], "llm_prefill": llm}
