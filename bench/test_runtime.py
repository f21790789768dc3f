"""pytest-benchmark tests of the runtime on the tiny preset: a first question's whole prefill
(time to first token), the LLM prefill alone, and decoding a fixed number of tokens."""

from __future__ import annotations

import pytest
import torch

from fusedvlm.generation import GenerationConfig, decode, prefill

QUESTION = "Describe the image in detail."
N_L = 64  # the largest the tiny fusion decoder holds
DECODE_TOKENS = 16


@pytest.fixture(scope="module")
def model():
    from fusedvlm.model.vlm import FusedVLM

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return FusedVLM.from_preset("tiny").eval().to(device)


@pytest.fixture(scope="module")
def image():
    from fusedvlm.samples import sample_image

    return sample_image("chelsea")


@pytest.fixture(scope="module")
def prompt(model, image):
    """The LLM input embeddings of a first question with n_l fused tokens."""
    with torch.no_grad():
        vision = model.encode_images([image])
        fused = model.fuse(vision, [[model.question_ids(QUESTION)]], n_l=N_L)
        return model.llm_embeds(model.layout.question(QUESTION, N_L, True), fused.tokens)


def test_time_to_first_token(benchmark, model, image):
    from fusedvlm.session import ChatSession

    def run():
        return ChatSession(model, image, n_l=N_L).ask(QUESTION, GenerationConfig(max_new_tokens=1))

    answer = benchmark(run)
    assert answer.num_fused == N_L and len(answer.ids) == 1
    assert all(answer.timings[s] >= 0 for s in ("vision", "merge", "fusion", "projection", "llm_prefill"))


def test_llm_prefill(benchmark, model, prompt):
    state = benchmark(prefill, model.llm, prompt)
    assert state.length == prompt.shape[0] and torch.isfinite(state.logits).all()


def test_decode(benchmark, model, prompt):
    cfg = GenerationConfig(max_new_tokens=DECODE_TOKENS, ignore_eos=True)

    def fresh_state():
        # Decoding grows the KV cache in place, so every round starts from a new prefill.
        return (model.llm, prefill(model.llm, prompt), cfg, {model.layout.eos_id}), {}

    out = benchmark.pedantic(decode, setup=fresh_state, rounds=5, warmup_rounds=1)
    assert len(out.ids) == DECODE_TOKENS and len(out.token_latencies_s) == DECODE_TOKENS - 1
