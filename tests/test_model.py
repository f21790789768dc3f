"""FusedVLM end to end on CPU: token counts, placement of fused tokens, reuse, errors."""

import dataclasses

import numpy as np
import pytest
import torch

from fusedvlm.chat import IGNORE_INDEX
from fusedvlm.config import LLMConfig, ModelConfig, VisionConfig, get_preset
from fusedvlm.generation import GenerationConfig
from fusedvlm.model import FusedVLM
from fusedvlm.session import ChatSession

QUESTIONS = ["what is on the table?", "what colour is the cup?", "is it hot?"]


def test_paper_geometry_gives_145_tokens_per_view_and_1450_for_640x480():
    # The paper's view geometry (336 px, patch 14 -> 24x24) with a narrow tower, so it runs here.
    base = get_preset("tiny")
    cfg = dataclasses.replace(
        base, vision=VisionConfig(image_size=336, patch_size=14, width=64, layers=1, heads=4), hd_num=9
    )
    torch.manual_seed(0)
    model = FusedVLM(cfg).eval()
    assert cfg.tokens_per_view == 145
    with torch.no_grad():
        prefix = model.encode_images([np.full((480, 640, 3), 128, np.uint8)])
    assert prefix.num_views == [10]
    assert prefix.tokens.shape == (1450, 64)
    assert prefix.cu_seqlens.tolist() == [0, 1450]


def test_fused_tokens_sit_before_each_question_token_by_token(tiny_model, photo):
    model = tiny_model
    n_l, n_s = model.cfg.n_l, model.cfg.resolved_n_s
    with torch.no_grad():
        vision = model.encode_images([photo])
        fused = model.fuse(vision, [[model.question_ids(q) for q in QUESTIONS]])
    assert fused.group_sizes == [[n_l, n_s, n_s]]
    assert fused.tokens.shape[0] == n_l + 2 * n_s == model.num_fused(3)
    tokens = model.layout.conversation(
        [(q, None if i == 2 else "an answer") for i, q in enumerate(QUESTIONS)], fused.group_sizes[0]
    )
    assert tokens.num_fused == n_l + 2 * n_s
    embeds = model.llm_embeds(tokens, fused.tokens)
    table = model.llm.get_input_embeddings().weight
    fused_rows = iter(fused.tokens)
    run_sizes, run, qi = [], 0, 0
    for pos, (tid, is_fused) in enumerate(zip(tokens.ids, tokens.fused)):
        if is_fused:
            assert torch.equal(embeds[pos], next(fused_rows))
            run += 1
            continue
        assert torch.equal(embeds[pos], table[tid])
        if run:
            # The tokens right after a block of fused embeddings are that turn's question.
            text = model.tokenizer.decode(tokens.ids[pos : pos + 64])
            assert text.startswith(f"{QUESTIONS[qi]}[/INST]"), text
            run_sizes.append(run)
            run, qi = 0, qi + 1
    assert run_sizes == [n_l, n_s, n_s]
    # Stage-2 targets: the answers and their closing EOS, nothing else.
    labelled = [t for t, lab in zip(tokens.ids, tokens.labels) if lab != IGNORE_INDEX]
    eos = model.tokenizer.eos_token_id
    assert model.tokenizer.decode(labelled) == "an answer </s>an answer </s>" and labelled.count(eos) == 2


def test_prefix_reuse_equals_recomputation(tiny_model, photo):
    gen = GenerationConfig(max_new_tokens=6)
    reuse, scratch = ChatSession(tiny_model, photo), ChatSession(tiny_model, photo, reuse_prefix=False)
    for q in QUESTIONS:
        a, b = reuse.ask(q, gen), scratch.ask(q, gen)
        assert a.ids == b.ids
        # Ids of a random tiny model are robust to small errors; logits and fused tokens are not
        # (one stale token reused from the LLM cache moves the logits, not always the argmax).
        torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reuse.fused_tokens()[-1], scratch.fused_tokens()[-1], atol=1e-5, rtol=1e-5)
        assert a.num_prompt_tokens < b.num_prompt_tokens or q == QUESTIONS[0]
    assert reuse.num_fused_total == tiny_model.num_fused(3)
    # The fused tokens of the first turn are those of a plain from-scratch fusion.
    with torch.no_grad():
        ref = tiny_model.fuse(tiny_model.encode_images([photo]), [[tiny_model.question_ids(QUESTIONS[0])]])
    torch.testing.assert_close(reuse.fused_tokens()[0], ref.tokens, atol=1e-5, rtol=1e-5)


def test_packed_batch_equals_samples_alone(tiny_model, photo):
    from fusedvlm.samples import sample_image

    images = [photo, sample_image("astronaut")]
    qs = [[tiny_model.question_ids(QUESTIONS[0])], [tiny_model.question_ids(q) for q in QUESTIONS]]
    with torch.no_grad():
        batch = tiny_model.fuse(tiny_model.encode_images(images), qs)
        for i, (img, q) in enumerate(zip(images, qs)):
            alone = tiny_model.fuse(tiny_model.encode_images([img]), [q])
            torch.testing.assert_close(batch.per_sample()[i], alone.tokens, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_hugging_face_generate(tiny_model):
    llm = tiny_model.llm
    from fusedvlm.generation import decode, prefill

    torch.manual_seed(3)
    embeds = torch.randn(11, llm.config.hidden_size) * 0.5
    out = decode(llm, prefill(llm, embeds), GenerationConfig(max_new_tokens=7), eos_ids={-1})
    ref = llm.generate(inputs_embeds=embeds[None], max_new_tokens=7, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.ids == ref[0, -7:].tolist()
    assert len(out.token_latencies_s) == 6 and out.length == 11 + 6


def test_sampling_is_seeded(tiny_model):
    from fusedvlm.generation import decode, prefill

    embeds = torch.randn(5, tiny_model.llm.config.hidden_size)
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=7)
    runs = [decode(tiny_model.llm, prefill(tiny_model.llm, embeds), gen, eos_ids=set()).ids for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_l=0), "n_l must be >= 1"),
        (dict(n_l=4, n_s=8), "must not exceed n_l"),
        (dict(n_l=200), "needs 199 query tokens"),
        (dict(n_l=8, n_s=0), "n_s must be >= 1"),
    ],
)
def test_bad_query_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny", **kwargs)


def test_bad_questions_and_images(tiny_model, photo):
    with pytest.raises(ValueError, match="empty question"):
        ChatSession(tiny_model, photo).ask("   ")
    # Long questions are read whole, as the authors do (no 512-token refusal, no truncation).
    assert len(tiny_model.question_ids("word " * 600)) == 600
    with pytest.raises(ValueError):
        tiny_model.encode_images([np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(ValueError):
        tiny_model.encode_images([np.zeros((10, 10, 5), np.uint8)])
    with pytest.raises(ValueError, match="must not exceed"):
        ChatSession(tiny_model, photo, n_l=4, n_s=6)


def test_too_many_fused_tokens_for_the_llm_context(photo):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, max_position_embeddings=48), n_l=40)
    torch.manual_seed(0)
    session = ChatSession(FusedVLM(cfg).eval(), photo)
    with pytest.raises(ValueError, match="more than the LLM's context of 48"):
        session.ask("what is this?", GenerationConfig(max_new_tokens=2))


def test_vision_width_must_match_fusion_width():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="must equal fusion hidden size"):
        dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, width=32))


def test_frozen_llm_and_trainable_split(tiny_model):
    assert all(not p.requires_grad for p in tiny_model.llm.parameters())
    names = [n for n, _ in tiny_model.trainable_named_parameters()]
    assert names and not any(n.startswith("llm.") for n in names)
    assert any(n.startswith("fuser.merge.") for n in names) and any(n.startswith("vision.clip.") for n in names)
    tiny_model.train()
    assert not tiny_model.llm.training
    tiny_model.eval()


def test_llm_config_errors():
    from fusedvlm.model.llm import load_llm

    with pytest.raises(ValueError, match="needs llm.path"):
        load_llm(LLMConfig(source="pretrained"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_llm(LLMConfig(source="pretrained", path="/nonexistent/model"))
    with pytest.raises(ValueError, match="vocab_size >= 260"):
        load_llm(LLMConfig(source="random", vocab_size=100))


def test_config_dict_roundtrip():
    cfg = get_preset("smol", n_l=128)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
