"""Chat sessions under faults: every turn is a transaction. Whatever fails (a question the
LLM's context cannot hold, an error after the fusion, after the LLM prefill, in the middle of
decoding, Ctrl-C), the session afterwards answers exactly like a fresh one that never saw the
failed turn. Plus the up-front checks on questions and sampling settings."""

import math

import pytest
import torch

import fusedvlm.generation as generation
import fusedvlm.session as session_mod
from fusedvlm.generation import GenerationConfig
from fusedvlm.session import ChatSession

Q1, Q2, Q3 = "What is on the table?", "What colour is the cup?", "Is it hot?"
GEN = GenerationConfig(max_new_tokens=6, ignore_eos=True)


class Boom(Exception):
    """A failure injected into one stage of a turn."""


def _fail_before_fusion(monkeypatch, model, session):
    # The LLM's context cannot take the turn: must be refused before anything is computed.
    limit = len(session._llm_tokens) + 3
    monkeypatch.setattr(model.llm.config, "max_position_embeddings", limit)
    return ValueError


def _fail_after_fusion(monkeypatch, model, session):
    def boom(*a, **k):
        raise Boom("after fusion")

    monkeypatch.setattr(model, "llm_embeds", boom)
    return Boom


def _fail_after_prefill(monkeypatch, model, session):
    def boom(*a, **k):
        raise Boom("after prefill")

    monkeypatch.setattr(session_mod, "decode", boom)
    return Boom


def _interrupt(exc):
    def install(monkeypatch, model, session):
        real = generation.next_token
        calls = []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) == 4:  # three tokens already fed back into the LLM cache
                raise exc("mid-decode")
            return real(*a, **k)

        monkeypatch.setattr(generation, "next_token", flaky)
        return exc

    return install


FAILURES = {
    "before_fusion": _fail_before_fusion,
    "after_fusion": _fail_after_fusion,
    "after_prefill": _fail_after_prefill,
    "mid_decode": _interrupt(Boom),
    "keyboard_interrupt": _interrupt(KeyboardInterrupt),
}


def _turns(session, questions):
    """(ids, first-token logits) per question: logits show a stale cached token that ids may not."""
    return [(a.ids, a.first_logits) for a in (session.ask(q, GEN) for q in questions)]


def _assert_same_turns(got, expected):
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "recompute"])
@pytest.mark.parametrize("point", list(FAILURES))
def test_failed_turn_leaves_the_session_as_before(tiny_model, photo, monkeypatch, point, reuse):
    # The reference recomputes every turn from scratch, whatever the session under test reuses.
    fresh = ChatSession(tiny_model, photo, reuse_prefix=False)
    expected = _turns(fresh, [Q1, Q3])
    session = ChatSession(tiny_model, photo, reuse_prefix=reuse)
    _assert_same_turns(_turns(session, [Q1]), expected[:1])
    with monkeypatch.context() as m:
        exc = FAILURES[point](m, tiny_model, session)
        with pytest.raises(exc):
            session.ask(Q2, GEN)
    assert len(session.turns) == 1 and len(session.fused_tokens()) == 1
    assert session.num_fused_total == tiny_model.num_fused(1)
    if reuse:
        assert session._llm_past.get_seq_length() == len(session._llm_tokens)
    _assert_same_turns(_turns(session, [Q3]), expected[1:])
    torch.testing.assert_close(session.fused_tokens()[-1], fresh.fused_tokens()[-1], atol=1e-5, rtol=1e-5)
    assert session.num_fused_total == fresh.num_fused_total


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "recompute"])
def test_failed_first_turn(tiny_model, photo, monkeypatch, reuse):
    expected = _turns(ChatSession(tiny_model, photo, reuse_prefix=False), [Q1])
    session = ChatSession(tiny_model, photo, reuse_prefix=reuse)
    with monkeypatch.context() as m:
        _interrupt(KeyboardInterrupt)(m, tiny_model, session)
        with pytest.raises(KeyboardInterrupt):
            session.ask(Q2, GEN)
    assert session.turns == [] and session.num_fused_total == 0
    # The failed question was the first: the next one must get n_l fused tokens, not n_s.
    _assert_same_turns(_turns(session, [Q1]), expected)
    assert session.num_fused_total == tiny_model.num_fused(1)


@pytest.mark.parametrize(
    "question, match",
    [
        (None, "question must be a string, got NoneType"),
        (42, "question must be a string, got int"),
        ("   ", "empty question"),
        ("caf\udce9?", r"not valid UTF-8 text: undecodable byte\(s\) b'\\xe9'"),
        ("half \ud83d of an emoji", "not valid UTF-8 text: lone surrogate"),
    ],
)
def test_bad_questions_are_refused_up_front(tiny_model, photo, question, match):
    session = ChatSession(tiny_model, photo)
    with pytest.raises(ValueError, match=match):
        session.ask(question, GEN)
    assert session._vision is None and session.turns == []


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0, 0.0])
def test_bad_temperature_is_refused_before_prefill(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        GenerationConfig(do_sample=True, temperature=temperature)


def test_nan_temperature_is_refused_even_when_greedy():
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=math.nan)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_max_new_tokens(value):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        GenerationConfig(max_new_tokens=value)


@pytest.mark.slow
def test_interrupted_turn_on_smol_leaves_no_trace(photo, monkeypatch):
    """The issue's case on the real SmolLM2: a turn interrupted during decoding used to stay
    in the LLM cache, and the next answer repeated an old one."""
    from fusedvlm.model import FusedVLM

    torch.manual_seed(0)
    model = FusedVLM.from_preset("smol").eval()
    gen = GenerationConfig(max_new_tokens=8)
    fresh = ChatSession(model, photo)
    expected = [fresh.ask(q, gen).ids for q in (Q1, Q3)]
    session = ChatSession(model, photo)
    assert session.ask(Q1, gen).ids == expected[0]
    with monkeypatch.context() as m:
        _interrupt(KeyboardInterrupt)(m, model, session)
        with pytest.raises(KeyboardInterrupt):
            session.ask(Q2, gen)
    assert session.ask(Q3, gen).ids == expected[1]


@pytest.mark.parametrize("temperature", [1e-45, 1e-30])
def test_tiny_temperature_samples_the_best_token(temperature):
    # On 29b7c74 logits / 1e-45 overflowed to inf and the softmax to NaN: a RuntimeError after
    # prefill. The limit of a vanishing temperature is greedy decoding.
    from fusedvlm.generation import next_token

    logits = torch.tensor([1.0, 3.5, -2.0, 3.4, float("-inf")])
    cfg = GenerationConfig(do_sample=True, temperature=temperature)
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, cfg, g) for _ in range(20)} == {1}
    assert {
        next_token(logits, GenerationConfig(do_sample=True, temperature=temperature, top_p=0.5), g) for _ in range(5)
    } == {1}
