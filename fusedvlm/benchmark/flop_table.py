"""Per-module FLOPs of one first-question prefill, as fvcore's ``flop_count_table``
(``fusedvlm bench --flops-table``).

fvcore traces the model with ``torch.jit.trace`` and counts each traced op with a handle.
The handles here count what :mod:`fusedvlm.benchmark.flops` counts, in its units (one
multiply-add is 2 FLOPs; fvcore's own handles count it as 1): matmuls and convolutions, and
attention by the query-key pairs its mask lets through. Our ops as the trace sees them: packed
attention's torch path is one causal ``scaled_dot_product_attention`` per segment, the local
merge the ``fusedvlm::local_merge`` op (its C++ kernel, counted by the op's FLOP formula) or,
on the torch path, a convolution or, on wide models, the ``_WinogradConv`` autograd function
(an opaque ``prim::PythonOp`` in the trace, counted as the GEMMs it runs). Norms, activations
and other elementwise ops count as zero, as in the bench's counter. Triton launches are
invisible to a trace; fvcore is for CPU inspection (the GPU image does not ship it).

fvcore is imported only here, lazily.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedvlm.backend import forcing
from fusedvlm.benchmark.flops import _native_mha_flops, causal_pairs

# Each of our stages (the keys of flops.prefill_flops) and the module that runs it in the trace.
STAGE_MODULES = {
    "vision": "vision",
    "merge": "fuser.merge",
    "fusion": "fuser.decoder",
    "projection": "fuser.projection",
    "llm_prefill": "llm",
}


def _shape(value) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


_COMPUTED = object()


def _constant(value):
    """The value of a traced constant input: None for a NoneType input, ``_COMPUTED`` for one
    that ops in the trace compute (its value is not known to the trace)."""
    if value.type().kind() == "NoneType":
        return None
    ivalue = value.toIValue()
    return _COMPUTED if ivalue is None else ivalue


def _twice(handle):
    """fvcore counts a multiply-add as 1 FLOP; the bench counts 2."""

    def counted(inputs, outputs):
        n = handle(inputs, outputs)
        # Some of fvcore's handles return a Counter keyed by op name.
        return type(n)({k: 2 * v for k, v in n.items()}) if isinstance(n, dict) else 2 * n

    return counted


def _sdpa(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, ...)."""
    q, k, v = (_shape(x) for x in inputs[:3])
    mask, is_causal = _constant(inputs[3]), bool(_constant(inputs[5]))
    *lead, lq, d = q
    lk, dv = k[-2], v[-1]
    batch_heads = 1
    for n in lead:
        batch_heads *= n
    if mask is _COMPUTED:
        # Hugging Face builds its causal mask with ops while tracing, so the trace cannot tell
        # its values: the one mask any model here passes is causal, bottom-right aligned.
        pairs = batch_heads * causal_pairs(lq, lk)
    elif mask is not None:
        allowed = mask if mask.dtype == torch.bool else torch.isfinite(mask)
        if is_causal:
            allowed = allowed & torch.ones(lq, lk, dtype=torch.bool).tril()
        pairs = int(allowed.expand(*lead, lq, lk).sum())
    else:
        pairs = batch_heads * (causal_pairs(lq, lk, bottom_right=False) if is_causal else lq * lk)
    return 2 * pairs * (d + dv)


def _native_mha(inputs, outputs) -> int:
    """aten::_native_multi_head_attention (nn.MultiheadAttention's inference path, open_clip's ViT)."""
    query, key = _shape(inputs[0]), _shape(inputs[1])
    mask = _constant(inputs[9]) if len(inputs) > 9 else None
    if mask is _COMPUTED:
        raise ValueError("cannot count a multi-head attention whose mask is computed in the trace")
    return _native_mha_flops(
        torch.empty(query, device="meta"),
        torch.empty(key, device="meta"),
        None,
        _constant(inputs[3]),
        _constant(inputs[4]),
        None,
        None,
        None,
        None,
        mask=mask,
    )


def _winograd_conv(inputs, outputs) -> int:
    """The local merge's Winograd path (``kernels/local_merge.py``: ``_WinogradConv``, an
    autograd function, opaque in a trace, whose tensor inputs are grid (V, H, W, C_in) and
    weight (C_out, C_in, 3, 3)). Its GEMMs, as the bench's counter sees them: along each axis
    the centre tap reads 2p rows and the outer taps three F(2, 2) components of p rows
    (p = ceil(ceil(H / 2) / 2) outputs pairs), each component pair one (rows x C_in) @ (C_in x
    C_out) product: 2 * (5 p_r)(5 p_c) V C_in C_out."""
    v, h, w, c_in = _shape(inputs[0])
    c_out = _shape(inputs[1])[0]
    pr, pc = ((h + 1) // 2 + 1) // 2, ((w + 1) // 2 + 1) // 2
    return 2 * (5 * pr) * (5 * pc) * v * c_in * c_out


def _local_merge_op(inputs, outputs) -> int:
    """fusedvlm::local_merge(x, weight, lf_token, bias, residual, h, w), as FlopCounterMode counts it."""
    from fusedvlm.kernels.local_merge import _merge_flops

    return _merge_flops(
        _shape(inputs[0]), _shape(inputs[1]), None, None, None, _constant(inputs[5]), _constant(inputs[6]), None
    )


def handles() -> dict:
    """fvcore op handles, by the traced op's name."""
    from fvcore.nn import jit_handles as j

    matmuls = {
        "aten::addmm": j.addmm_flop_jit,
        "aten::bmm": j.bmm_flop_jit,
        "aten::mm": j.matmul_flop_jit,
        "aten::matmul": j.matmul_flop_jit,
        "aten::linear": j.linear_flop_jit,
        "aten::einsum": j.einsum_flop_jit,
        "aten::_convolution": j.conv_flop_jit,
    }
    return {
        **{name: _twice(h) for name, h in matmuls.items()},
        "aten::scaled_dot_product_attention": _sdpa,
        "aten::_native_multi_head_attention": _native_mha,
        "prim::PythonOp._WinogradConv": _winograd_conv,
        "fusedvlm::local_merge": _local_merge_op,
    }


class _Prefill(nn.Module):
    """The first-question prefill of :meth:`fusedvlm.session.ChatSession.ask` as one forward over
    the model's own modules (so the table shows them by name): vision tower, local merge,
    fusion decoder over [V][question][queries][EOS] (the same FLOPs as the prefix cache plus
    the group), projection, LLM prefill with the LM head on the last position."""

    def __init__(self, model, num_views: list[int], question_ids: list[int], llm_tokens, n_l: int, n_s: int):
        super().__init__()
        self.vision, self.fuser, self.llm = model.vision, model.fuser, model.llm
        self._embeds = model.llm_embeds  # a bound method: not registered as a child module
        self.num_views, self.question_ids, self.llm_tokens, self.n_l, self.n_s = (
            num_views,
            question_ids,
            llm_tokens,
            n_l,
            n_s,
        )

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        vision = self.fuser.merge_views(self.vision(views), self.num_views)
        fused = self.fuser.fuse(vision, [[self.question_ids]], n_l=self.n_l, n_s=self.n_s)
        embeds = self._embeds(self.llm_tokens, fused.tokens)
        return self.llm(inputs_embeds=embeds[None], use_cache=False, logits_to_keep=1).logits


@torch.no_grad()
def prefill_flop_analysis(model, image, question: str, n_l: int, n_s: int | None = None):
    """An fvcore analysis of one first-question prefill (the one
    :func:`fusedvlm.benchmark.flops.prefill_flops` counts stage by stage) with only our
    handles: fvcore's ``FlopCountAnalysis`` would add its own for norms and pooling, which
    the bench does not count, and in its units."""
    import warnings

    n_l, n_s = model.fuser.resolve_counts(n_l, n_s)
    views, num_views = model.preprocess([image])
    module = _Prefill(
        model, num_views, model.question_ids(question), model.layout.question(question, n_l, True), n_l, n_s
    )
    with warnings.catch_warnings():
        # fvcore's import and the tracer warn about torch.jit's deprecation and about tracing.
        warnings.simplefilter("ignore")
        try:
            from fvcore.nn.jit_analysis import JitModelAnalysis
        except ImportError:
            raise ValueError("the per-module FLOP table needs fvcore: pip install 'fusedvlm[bench]'") from None

        analysis = JitModelAnalysis(module, (views.to(model.device),)).set_op_handle(**handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        # fvcore sees only shapes in its trace: one fusedvlm::packed_attention node hides its
        # segments (the values of cu_seqlens), so trace the torch path, whose per-segment SDPA
        # calls carry them in their shapes.
        with forcing("torch"):
            analysis.total()
    return analysis


def flops_by_stage(analysis) -> dict[str, int]:
    """The analysis's counts per stage of :data:`STAGE_MODULES`."""
    by_module = analysis.by_module()
    return {stage: int(by_module[name]) for stage, name in STAGE_MODULES.items()}


def flop_table(analysis, max_depth: int = 3) -> str:
    from fvcore.nn import flop_count_table

    return flop_count_table(analysis, max_depth=max_depth)


def flop_report(model, image, question: str, n_l: int, n_s: int | None = None, max_depth: int = 3) -> str:
    """fvcore's per-module table of one prefill, then each stage's count beside the bench's
    own (:func:`fusedvlm.benchmark.flops.prefill_flops`, the counts ``fusedvlm bench`` reports)."""
    from fusedvlm.benchmark.flops import prefill_flops

    analysis = prefill_flop_analysis(model, image, question, n_l, n_s)
    ours = {stage: c.total for stage, c in prefill_flops(model, image, question, n_l, n_s).items()}
    lines = [flop_table(analysis, max_depth), "", f"{'stage':<12s} {'module':<18s} {'fvcore':>14s} {'bench':>14s}"]
    for stage, count in flops_by_stage(analysis).items():
        lines.append(f"{stage:<12s} {STAGE_MODULES[stage]:<18s} {count:>14,d} {ours[stage]:>14,d}")
    skipped = sorted(analysis.unsupported_ops())
    if skipped:
        lines.append(f"not counted (elementwise, as in the bench): {', '.join(skipped)}")
    return "\n".join(lines)
