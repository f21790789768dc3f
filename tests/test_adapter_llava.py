"""The LLaVA drop-in adapter on a tiny random LlavaForConditionalGeneration (offline)."""

import pytest
import torch

from fusedvlm.adapters import adapter_for, attach
from fusedvlm.adapters.llava import LlavaFusionAdapter
from fusedvlm.chat import IGNORE_INDEX
from fusedvlm.config import FusionConfig
from fusedvlm.model.fusion_module import FusionModule, FusionModuleConfig

IMAGE_ID = 260
N_L, N_S = 16, 8
FUSION = FusionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2, max_queries=31)
GREEDY = dict(max_new_tokens=6, do_sample=False)


def tiny_llava(strategy="default", layer=-2, seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    # 48 px / patch 2: a 24x24 grid, LLaVA-1.5's 576 image tokens per image.
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=2
    )
    text = LlamaConfig(
        vocab_size=261,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=259,
    )
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
    )
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from fusedvlm.model.llm import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    return tok


@pytest.fixture(scope="module")
def host():
    return tiny_llava()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(3)
    return torch.randn(2, 3, 48, 48)


CONVS = [[("What is it?", "A cup."), ("What colour?", None)], [("Where is it?", None)]]


def make_adapter(host, seed=1):
    torch.manual_seed(seed)
    return LlavaFusionAdapter.attach(host, FUSION, n_l=N_L)


def test_attach_builds_a_fusion_module_for_the_host(host):
    adapter = make_adapter(host)
    cfg = adapter.fusion.cfg
    assert (cfg.input_size, cfg.output_size, cfg.grid, cfg.n_l, cfg.resolved_n_s) == (32, 64, (24, 24), N_L, N_S)
    assert adapter.image_token_id == IMAGE_ID
    assert adapter_for(host) is LlavaFusionAdapter
    assert all(not p.requires_grad for p in host.parameters())
    assert all(p.requires_grad for p in adapter.fusion.parameters())
    adapter.train()
    assert not host.training and adapter.fusion.training
    # A module built without a grid (square views inferred) fits the host too.
    square = FusionModule(FusionModuleConfig(fusion=FUSION, output_size=64, n_l=N_L, input_size=32))
    assert LlavaFusionAdapter.attach(host, square).grid == (24, 24)


def test_llm_receives_n_l_plus_k_minus_1_n_s_fused_tokens_before_each_question(host, tokenizer, pixels):
    adapter = make_adapter(host)
    inputs = adapter.prepare_inputs(tokenizer, CONVS, pixels)
    ids = inputs["input_ids"]
    assert (ids == IMAGE_ID).sum(1).tolist() == [N_L + N_S, N_L]
    # Each run of placeholders is followed by "\n" and its question.
    row = ids[0][inputs["attention_mask"][0].bool()].tolist()
    runs, i = [], 0
    while i < len(row):
        if row[i] == IMAGE_ID:
            j = i
            while row[j] == IMAGE_ID:
                j += 1
            runs.append((j - i, tokenizer.decode(row[j : j + 13])))
            i = j
        else:
            i += 1
    assert runs == [(N_L, "\nWhat is it? "), (N_S, "\nWhat colour?")]
    labelled = inputs["labels"][0][inputs["labels"][0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labelled) == " A cup.</s>"

    seen = {}
    lm = host.model.language_model if hasattr(host, "model") else host.language_model
    handle = lm.register_forward_pre_hook(
        lambda mod, args, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            adapter(**inputs)
            fused = adapter.fused_tokens(
                pixels,
                inputs["fusion_question_ids"],
                inputs["fusion_cu_seqlens"],
                inputs["fusion_questions_per_sample"],
            )
    finally:
        handle.remove()
    assert seen["embeds"].shape[:2] == ids.shape
    assert fused.group_sizes == [[N_L, N_S], [N_L]]
    torch.testing.assert_close(seen["embeds"][ids == IMAGE_ID], fused.tokens, rtol=0, atol=0)
    text_rows = seen["embeds"][ids != IMAGE_ID]
    torch.testing.assert_close(text_rows, host.get_input_embeddings()(ids[ids != IMAGE_ID]), rtol=0, atol=0)


def test_generate_save_reload_identical(host, tokenizer, pixels, tmp_path):
    adapter = make_adapter(host)
    inputs = adapter.prepare_inputs(tokenizer, CONVS, pixels)
    out = adapter.generate(**inputs, **GREEDY)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    # A left-padded batch decodes exactly as each conversation alone (positions, cache).
    prompt_only = adapter.prepare_inputs(tokenizer, CONVS[1:], pixels[1:])
    assert "labels" not in prompt_only and "labels" in inputs
    alone = adapter.generate(**prompt_only, **GREEDY)
    assert torch.equal(alone[0, -6:], out[1, -6:])

    adapter.save_pretrained(tmp_path / "ckpt")
    reloaded = LlavaFusionAdapter.from_pretrained(tiny_llava(), tmp_path / "ckpt")
    assert reloaded.prompt == adapter.prompt and reloaded.fusion.cfg == adapter.fusion.cfg
    assert torch.equal(reloaded.generate(**inputs, **GREEDY), out)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, adapter(**inputs).logits)


def test_one_optimizer_step_changes_only_the_fusion_module(host, tokenizer, pixels):
    adapter = make_adapter(host).train()
    host_before = {k: v.clone() for k, v in host.state_dict().items()}
    fusion_before = {k: v.clone() for k, v in adapter.fusion.state_dict().items()}
    inputs = adapter.prepare_inputs(tokenizer, [[("What is it?", "A cup."), ("Colour?", "Red.")]], pixels[:1])
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    loss = adapter(**inputs).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert {n for n, _ in adapter.trainable_named_parameters()} == {f"fusion.{k}" for k in fusion_before}
    for k, v in host.state_dict().items():
        assert torch.equal(v, host_before[k]), k
    for k, v in adapter.fusion.state_dict().items():
        assert not torch.equal(v, fusion_before[k]), k


def test_unmodified_host_path_still_takes_576_tokens(host, tokenizer, pixels):
    make_adapter(host)
    ids = torch.tensor(
        [
            [256]
            + tokenizer.encode("USER: ", add_special_tokens=False)
            + [IMAGE_ID] * 576
            + tokenizer.encode("\nWhat? ASSISTANT:", add_special_tokens=False)
        ]
    )
    with torch.no_grad():
        assert host(input_ids=ids, pixel_values=pixels[:1]).logits.shape[1] == ids.shape[1]


def test_full_strategy_needs_merge_false_and_feature_layer_lists_concatenate(tokenizer, pixels):
    full = tiny_llava(strategy="full")
    with pytest.raises(ValueError, match="merge=False"):
        LlavaFusionAdapter.attach(full, FUSION, n_l=N_L)
    adapter = attach(full, FUSION, n_l=N_L, merge=False)
    assert adapter.vision_features(pixels).cu_seqlens.tolist() == [0, 577, 1154]  # CLS kept
    out = adapter.generate(**adapter.prepare_inputs(tokenizer, CONVS, pixels), **GREEDY)
    assert out.shape[0] == 2

    multi = tiny_llava(layer=[-2, -1])
    adapter = LlavaFusionAdapter.attach(multi, FUSION, n_l=N_L)
    assert adapter.fusion.cfg.input_size == 64
    assert adapter.vision_features(pixels[:1]).tokens.shape == (576, 64)


def test_errors(host, tokenizer, pixels):
    from transformers import LlamaConfig, LlamaForCausalLM

    adapter = make_adapter(host)
    inputs = adapter.prepare_inputs(tokenizer, CONVS, pixels)
    bad = dict(inputs, input_ids=inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_ID, 65))
    with pytest.raises(ValueError, match="row 0 has 0 image placeholder tokens but the fusion module made 24"):
        adapter(**bad)
    with pytest.raises(ValueError, match="only the last turn may be unanswered"):
        adapter.prepare_inputs(tokenizer, [[("a?", None), ("b?", None)]], pixels[:1])
    with pytest.raises(ValueError, match="2 images for 1 conversations"):
        adapter.prepare_inputs(tokenizer, [CONVS[0]], pixels)
    # "<image>" typed in a question is text (as every control token users type), never a placeholder.
    typed = adapter.prepare_inputs(tokenizer, [[("look at <image>", None)]], pixels[:1])
    assert (typed["input_ids"] == IMAGE_ID).sum() == N_L
    assert "look at <image>" in tokenizer.decode(typed["input_ids"][0][typed["input_ids"][0] != IMAGE_ID])
    wrong = FusionModule(FusionModuleConfig(fusion=FUSION, output_size=48, n_l=N_L, input_size=32, grid=(24, 24)))
    with pytest.raises(ValueError, match="projects to 48, the host LLM is 64 wide"):
        LlavaFusionAdapter.attach(host, wrong)
    with pytest.raises(TypeError, match="n_l only apply when building from a FusionConfig"):
        LlavaFusionAdapter.attach(host, wrong, n_l=8)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=261, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="not a LLaVA model"):
        LlavaFusionAdapter.attach(llama, FUSION)
    with pytest.raises(ValueError, match="no fusedvlm adapter for model_type 'llama'"):
        attach(llama, FUSION)


def test_stage2_training_with_the_trainer_updates_and_saves_only_the_fusion_module(tokenizer, tmp_path):
    import json

    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from fusedvlm.adapters.training import AdapterCollator, AdapterDataset, AdapterStage2Objective
    from fusedvlm.train.checkpoint import load_training_checkpoint
    from fusedvlm.train.data import read_records
    from fusedvlm.train.loop import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append(
            {
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": f"Thing {i}."},
                    {"from": "human", "value": "Colour?"},
                    {"from": "gpt", "value": "Grey."},
                ],
            }
        )
    (tmp_path / "bad.png").write_bytes(b"not an image")
    records.append(
        {"image": "bad.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
    )
    (tmp_path / "data.json").write_text(json.dumps(records))

    host = tiny_llava(seed=4)
    host_before = {k: v.clone() for k, v in host.state_dict().items()}
    adapter = make_adapter(host)
    fusion_before = {k: v.clone() for k, v in adapter.fusion.state_dict().items()}
    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    recs, _ = read_records(str(tmp_path / "data.json"), str(tmp_path))
    dataset = AdapterDataset(recs, adapter, processor)
    assert dataset[4].reason and dataset[0].vision["pixel_values"].shape == (1, 3, 48, 48)
    trainer = Trainer(
        AdapterStage2Objective(adapter),
        dataset,
        AdapterCollator(adapter, tokenizer),
        TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_ratio=0.0, progress=False),
        str(tmp_path / "run"),
    )
    rows = trainer.fit()
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    for k, v in host.state_dict().items():
        assert torch.equal(v, host_before[k]), k
    assert any(not torch.equal(v, fusion_before[k]) for k, v in adapter.fusion.state_dict().items())
    model_state = load_training_checkpoint(trainer.save())[0]
    assert set(model_state) == {f"adapter.fusion.{k}" for k in fusion_before}
    adapter.save_pretrained(tmp_path / "fusion")
    reloaded = LlavaFusionAdapter.from_pretrained(tiny_llava(seed=4), tmp_path / "fusion")
    for k, v in reloaded.fusion.state_dict().items():
        assert torch.equal(v, adapter.fusion.state_dict()[k]), k


def test_fp32_fusion_module_on_a_bf16_host(tokenizer, pixels):
    host = tiny_llava().to(torch.bfloat16)
    adapter = LlavaFusionAdapter.attach(host, FUSION, n_l=N_L, dtype=torch.float32)
    inputs = adapter.prepare_inputs(tokenizer, [[("What is it?", "A cup.")]], pixels[:1])
    loss = adapter(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and adapter.fusion.projection.weight.grad.dtype == torch.float32
    assert adapter.generate(**adapter.prepare_inputs(tokenizer, CONVS, pixels), **GREEDY).shape[0] == 2
