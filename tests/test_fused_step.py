"""The lean decode step as one C++ op (``fusedvlm::llama_decode_step``, csrc/decode_step.inc)
against the same step run op by op (LeanLlama.forward, eager): logits, the K/V it writes and
greedy ids, over the Llama variants the lean path takes (grouped heads, biases, activations, int8
projections), batches, cache growth and every ISA variant; where the engine uses it; its errors."""

import pytest
import torch
import torch.nn.functional as F

from fusedvlm import native
from fusedvlm.decode import make_engine
from fusedvlm.generation import GenerationConfig, decode, prefill

pytestmark = pytest.mark.skipif(not native.available(), reason="the C++ kernels are not built")

# Same fp32 formulas, different summation orders (RMSNorm's mean, the matrix-vector tiles).
TOL = dict(rtol=1e-4, atol=1e-4)


def _llama(**over):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cfg.update(over)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)  # HF starts them at zero, which would test nothing
    return model


def _engines(llm):
    fused, eager = make_engine(llm, "lean", False, None), make_engine(llm, "lean", False, False)
    assert fused.path == "lean-fused" and eager.path == "lean-eager"
    return fused, eager


VARIANTS = {
    "grouped heads, silu": {},
    "biases": dict(attention_bias=True, mlp_bias=True),
    "gelu": dict(hidden_act="gelu"),
    "relu": dict(hidden_act="relu"),
    "one kv head per query head, tied head": dict(num_key_value_heads=6, tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_matches_the_step_op_by_op(variant, batch):
    llm = _llama(**VARIANTS[variant])
    fused, eager = _engines(llm)
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(batch, 9, 48, generator=gen)
    caches = fused.new_cache(batch), eager.new_cache(batch)
    la, lb = fused.prefill(embeds, caches[0]), eager.prefill(embeds, caches[1])
    tokens = torch.arange(batch) * 7
    for _ in range(6):
        la, lb = fused.step(tokens, caches[0]), eager.step(tokens, caches[1])
        torch.testing.assert_close(la, lb, **TOL)
        tokens = lb.argmax(-1)
    n = caches[1].length
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a[:, :, :n], b[:, :, :n], **TOL)


def test_fused_step_greedy_ids_equal_through_a_cache_growth():
    from fusedvlm.decode.engine import FIRST_BUCKET

    llm = _llama(num_hidden_layers=2)
    fused, eager = _engines(llm)
    embeds = torch.randn(1, FIRST_BUCKET - 4, 48, generator=torch.Generator().manual_seed(2))[0]
    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True)  # crosses into the next bucket
    a = decode(fused, prefill(fused, embeds), gen, eos_ids=set())
    b = decode(eager, prefill(eager, embeds), gen, eos_ids=set())
    assert a.past_key_values.capacity > FIRST_BUCKET
    assert a.ids == b.ids and a.path == "lean-fused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_runs_int8_projections_as_the_int8_step_does(dtype):
    from fusedvlm.quant import quantize_llm

    llm = quantize_llm(_llama(attention_bias=True).to(dtype), "int8")
    fused, eager = _engines(llm)
    embeds = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3)).to(dtype)
    caches = fused.new_cache(2), eager.new_cache(2)
    fused.prefill(embeds, caches[0]), eager.prefill(embeds, caches[1])
    tokens = torch.tensor([3, 4])
    for _ in range(4):
        la, lb = fused.step(tokens, caches[0]), eager.step(tokens, caches[1])
        torch.testing.assert_close(la, lb, **(TOL if dtype == torch.float32 else HALF_TOL[dtype]))
        tokens = lb.argmax(-1)


# Half precision: both sides round to the dtype at the same places; a difference in the last fp32
# bit before a rounding can flip it by one unit of the dtype, which later layers carry on.
HALF_TOL = {torch.bfloat16: dict(rtol=0.02, atol=0.02), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", list(HALF_TOL))
@pytest.mark.parametrize("variant", ["grouped heads, silu", "biases"])
def test_fused_step_rounds_half_precision_as_the_step_op_by_op(dtype, variant):
    llm = _llama(**VARIANTS[variant]).to(dtype)
    fused, eager = _engines(llm)
    embeds = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(6)).to(dtype)
    caches = fused.new_cache(2), eager.new_cache(2)
    fused.prefill(embeds, caches[0]), eager.prefill(embeds, caches[1])
    tokens, same = torch.tensor([3, 9]), 0
    for _ in range(8):
        la, lb = fused.step(tokens, caches[0]), eager.step(tokens, caches[1])
        torch.testing.assert_close(la, lb, **HALF_TOL[dtype])
        same += int(torch.equal(la, lb))
        tokens = lb.argmax(-1)
    assert same >= 6, f"only {same} of 8 steps gave identical logits"
    n = caches[1].length
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a[:, :, :n], b[:, :, :n], **HALF_TOL[dtype])


def test_fused_step_agrees_across_isa_variants():
    llm = _llama()
    fused, _ = _engines(llm)
    embeds = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(4))
    before, out = native.isa(), {}
    try:
        for isa in native.supported_isas():
            native.set_isa(isa)
            cache = fused.new_cache(2)
            fused.prefill(embeds, cache)
            out[isa] = torch.stack([fused.step(torch.tensor([1, 2]), cache) for _ in range(3)])
    finally:
        native.set_isa(before)
    ref = out.pop("baseline")
    for isa, logits in out.items():
        torch.testing.assert_close(logits, ref, **TOL, msg=f"{isa} against baseline")


def test_engine_uses_the_fused_step_only_where_it_runs(monkeypatch):
    llm = _llama()
    engine = make_engine(llm, "auto", False)
    assert engine.path == "lean-fused" and "csrc/decode_step.inc" in engine.reason
    rows = engine.model.matvec_rows
    assert engine.step_path(rows) == "lean-fused" and engine.step_path(rows + 1) == "lean-eager"
    # A batch past the matrix-vector rows steps op by op (its projections are GEMMs).
    fused, eager = _engines(llm)
    embeds = torch.randn(rows + 2, 4, 48, generator=torch.Generator().manual_seed(5))
    caches = fused.new_cache(rows + 2), eager.new_cache(rows + 2)
    fused.prefill(embeds, caches[0]), eager.prefill(embeds, caches[1])
    tokens = torch.arange(rows + 2)
    assert torch.equal(fused.step(tokens, caches[0]), eager.step(tokens, caches[1]))

    monkeypatch.setenv("FUSEDVLM_FUSED_STEP", "0")
    assert make_engine(llm, "auto", False).path == "lean-eager"
    monkeypatch.delenv("FUSEDVLM_FUSED_STEP")
    monkeypatch.setenv("FUSEDVLM_MATVEC", "0")
    engine = make_engine(llm, "auto", False)
    assert engine.path == "lean-eager" and "no fused step: FUSEDVLM_MATVEC=0 keeps F.linear" in engine.reason
    monkeypatch.delenv("FUSEDVLM_MATVEC")
    mixed = _llama()
    mixed.model.layers[1].mlp.up_proj.to(torch.bfloat16)
    engine = make_engine(mixed, "auto", False)
    assert engine.path == "lean-eager"
    assert "no fused step: a projection is neither a contiguous torch.float32 nor an int8 weight" in engine.reason


def _op_args(llm):
    engine = make_engine(llm, "lean", False, None)
    m = engine.model
    cache = engine.new_cache(1)
    op = native.load().llama_decode_step
    x = F.embedding(torch.tensor([1]), m.embed)
    args = [
        x,
        m.step_weights,
        m.step_biases,
        m.step_scales,
        m.step_norms,
        cache.k,
        cache.v,
        torch.tensor([0]),
        m.cos,
        m.sin,
        m.num_heads,
        m.eps,
        m.scale,
        "silu",
    ]
    return op, args


BAD = {
    "weights": (lambda a: a.__setitem__(1, a[1][:-1]), "3 layers need 22 weights"),
    "norms": (lambda a: a.__setitem__(4, a[4][:-1]), "3 layers need 7 norm weights"),
    "weight shape": (lambda a: a[1].__setitem__(0, a[1][0][:-1]), "weight 0 must be (48, 48)"),
    "int8 without scale": (
        lambda a: a[1].__setitem__(0, a[1][0].to(torch.int8)),
        "torch.float32 like x (it has no scale)",
    ),
    "position": (lambda a: a.__setitem__(7, torch.tensor([10**6])), "position 1000000 does not fit a cache"),
    "float position": (lambda a: a.__setitem__(7, torch.tensor([0.0])), "pos must be a one-element integer tensor"),
    "activation": (lambda a: a.__setitem__(13, "tanh"), "activation must be silu, gelu or relu, got tanh"),
    "cache dtype": (
        lambda a: a[5].__setitem__(0, a[5][0].half()),
        "key cache 0 must be a contiguous torch.float32 CPU tensor",
    ),
    "heads": (lambda a: a.__setitem__(10, 5), "5 query heads are not a positive multiple of 2"),
    "x": (lambda a: a.__setitem__(0, a[0][0]), "x must be (B, hidden)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_fused_step_refuses_bad_input_naming_it(case):
    op, args = _op_args(_llama())
    change, message = BAD[case]
    args = [list(a) if isinstance(a, list) else a for a in args]
    change(args)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        op(*args)


def test_fused_step_gives_the_same_bits_on_any_number_of_threads():
    """Each output row is one thread's work and every phase waits for the one before it, so the
    team's size changes nothing; a missing barrier would show here as a difference."""
    llm = _llama(num_hidden_layers=4)
    fused, _ = _engines(llm)
    embeds = torch.randn(3, 6, 48, generator=torch.Generator().manual_seed(7))
    before, out = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(2)  # the prefill's GEMMs may split by the thread count
            cache = fused.new_cache(3)
            fused.prefill(embeds, cache)
            torch.set_num_threads(threads)
            tokens, steps = torch.tensor([1, 2, 3]), []
            for _ in range(5):
                steps.append(fused.step(tokens, cache))
                tokens = steps[-1].argmax(-1)
            out.append((torch.stack(steps), torch.stack([k[:, :, : cache.length] for k in cache.k])))
    finally:
        torch.set_num_threads(before)
    for logits, keys in out[1:]:
        assert torch.equal(logits, out[0][0]) and torch.equal(keys, out[0][1])
