"""Every drop-in family beside LLaVA-1.5, each on a tiny random host built offline from its
config classes and fed by its own image processor (built with explicit arguments)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fusedvlm.adapters import adapter_for, attach
from fusedvlm.adapters.gemma3 import Gemma3FusionAdapter
from fusedvlm.adapters.idefics3 import Idefics3FusionAdapter
from fusedvlm.adapters.llava_onevision import LlavaOnevisionFusionAdapter
from fusedvlm.adapters.qwen2_vl import Qwen2VLFusionAdapter
from fusedvlm.chat import IGNORE_INDEX
from fusedvlm.config import FusionConfig
from fusedvlm.model.fusion_module import FusionModule

IMAGE_ID = 262  # "<image>" in the test tokenizer
N_L, N_S = 16, 8  # n_s: the design rule for n_l >= 8
FUSION = FusionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2, max_queries=15)
GREEDY = dict(max_new_tokens=4, do_sample=False)
CONVS = [[("What is it?", "A cup."), ("What colour?", None)], [("Where is it?", None)]]
TEXT = dict(
    vocab_size=270,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=256,
    eos_token_id=261,
    pad_token_id=259,
)
# The vision tower of every family's tiny host, at its own image size.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def qwen2_vl(seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(TEXT, rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4),
        image_token_id=IMAGE_ID,
        video_token_id=263,
        vision_start_token_id=264,
        vision_end_token_id=265,
    )
    return Qwen2VLForConditionalGeneration(cfg).eval()


def qwen2_5_vl(seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])),
        # window_size 16 with patch 4: 2x2 merged tokens per window, so windowed attention is exercised.
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=4,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_ID,
        video_token_id=263,
        vision_start_token_id=264,
        vision_end_token_id=265,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}
    )


def _idefics3_cfg(config_cls, seed):
    torch.manual_seed(seed)
    return config_cls(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(VISION, image_size=32),
        scale_factor=2,
        image_token_id=IMAGE_ID,
    )


def idefics3(seed=0):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration(_idefics3_cfg(Idefics3Config, seed)).eval()


def smolvlm(seed=0):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration(_idefics3_cfg(SmolVLMConfig, seed)).eval()


def idefics3_processor():
    from transformers import Idefics3ImageProcessor

    return Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})


def llava_onevision(seed=0):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(
        text_config=dict(TEXT, model_type="qwen2"),
        vision_config=dict(VISION, model_type="siglip_vision_model", image_size=32),
        image_token_id=IMAGE_ID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def onevision_processor():
    from transformers import LlavaOnevisionImageProcessor

    return LlavaOnevisionImageProcessor(
        size={"height": 32, "width": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS,
    )


def gemma3(seed=0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma3Config(
        text_config=dict(TEXT, head_dim=16, sliding_window=16),
        vision_config=dict(VISION, image_size=64),
        mm_tokens_per_image=16,
        image_token_id=IMAGE_ID,
        boi_token_id=268,  # <start_of_image> and <end_of_image> of the test tokenizer
        eoi_token_id=269,
    )
    return Gemma3ForConditionalGeneration(cfg).eval()


def gemma3_processor():
    from transformers import Gemma3ImageProcessor

    return Gemma3ImageProcessor(size={"height": 64, "width": 64})


def gemma3_pan_and_scan_processor():
    """Pan-and-scan down to 16-px crops: the 40x56 and 64x32 test images get 2 crops each."""
    from transformers import Gemma3ImageProcessor

    return Gemma3ImageProcessor(
        size={"height": 64, "width": 64},
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=16,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )


# family -> (host builder, image processor builder, adapter class, images nested per row)
FAMILIES = {
    "qwen2_vl": (qwen2_vl, qwen_processor, Qwen2VLFusionAdapter, False),
    "qwen2_5_vl": (qwen2_5_vl, qwen_processor, Qwen2VLFusionAdapter, False),
    "idefics3": (idefics3, idefics3_processor, Idefics3FusionAdapter, True),
    "smolvlm": (smolvlm, idefics3_processor, Idefics3FusionAdapter, True),
    "llava_onevision": (llava_onevision, onevision_processor, LlavaOnevisionFusionAdapter, False),
    "gemma3": (gemma3, gemma3_processor, Gemma3FusionAdapter, False),
    "gemma3_pan_and_scan": (gemma3, gemma3_pan_and_scan_processor, Gemma3FusionAdapter, False),
}


# The strings a host's processor writes around an image's tokens, where it writes any.
MARKERS = {name: ("<|vision_start|>", "<|vision_end|>") for name in ("qwen2_vl", "qwen2_5_vl")}
MARKERS.update({name: ("<start_of_image>", "<end_of_image>") for name in ("gemma3", "gemma3_pan_and_scan")})


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _tokenizer():
    from fusedvlm.model.llm import byte_tokenizer

    tok = byte_tokenizer()
    # Idefics3's image markers are tokens of its tokenizer (as in SmolVLM's), after Qwen's.
    markers = ["<fake_token_around_image>", "<global-img>"]
    specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<image>",
        "<|video_pad|>",
        "<|vision_start|>",
        "<|vision_end|>",
        *markers,
        "<start_of_image>",
        "<end_of_image>",
    ]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID and tok.eos_token_id == TEXT["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|vision_end|>") == 265  # the Qwen hosts' vision_end_token_id
    assert tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>"]) == [268, 269]  # Gemma 3's
    return tok


def _images(n, first=0):
    """Image i has its own size and pixels, whatever batch it is in."""
    from PIL import Image

    sizes = [(40, 56), (64, 32), (48, 48)]
    out = []
    for i in range(first, first + n):
        rng = np.random.default_rng(i)
        out.append(Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)))
    return out


class Family:
    def __init__(self, name):
        self.name = name
        self.build, make_processor, self.cls, self.nested = FAMILIES[name]
        self.host = self.build()
        self.processor = make_processor()

    def adapter(self, host=None, seed=1):
        torch.manual_seed(seed)
        return self.cls.attach(self.host if host is None else host, FUSION, n_l=N_L)

    def images(self, per_row, first=0):
        """Images for rows holding ``per_row`` images each, nested as the processor wants."""
        flat = _images(sum(per_row), first)
        if not self.nested:
            return flat, per_row
        rows, start = [], 0
        for n in per_row:
            rows.append(flat[start : start + n])
            start += n
        return rows, None  # several images of a row are more views of that row

    def inputs(self, adapter, tokenizer, convs, per_row=None, first=0):
        images, per_sample = self.images(per_row or [1] * len(convs), first)
        return adapter.prepare_inputs(
            tokenizer,
            convs,
            images=images,
            image_processor=self.processor,
            images_per_sample=per_sample if per_row else None,
        )


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return Family(request.param)


def _language_model(host):
    model = host.model
    return model.language_model if hasattr(model, "language_model") else model.text_model


def test_attach_and_the_llm_receives_the_fused_tokens_before_each_question(family, tokenizer):
    adapter = family.adapter()
    assert adapter_for(family.host) is family.cls
    assert all(not p.requires_grad for p in family.host.parameters())
    assert adapter.fusion.cfg.output_size == 64 and adapter.image_token_id == IMAGE_ID
    inputs = family.inputs(adapter, tokenizer, CONVS)
    ids = inputs["input_ids"]
    assert (ids == IMAGE_ID).sum(1).tolist() == [N_L + N_S, N_L]
    # The placeholder runs sit right after the user header, before each question, between the
    # host's image markers where it has them: ids (Qwen's, Gemma 3's) or text (Idefics3/SmolVLM's).
    start, end = MARKERS.get(family.name, ("", ""))
    before, after = family.cls.image_markers(tokenizer)
    assert before == ("<fake_token_around_image><global-img>" if family.cls is Idefics3FusionAdapter else "")
    row = tokenizer.decode(ids[0][inputs["attention_mask"][0].bool()].tolist())
    assert row.count("<|im_start|>user\n" + start + before + "<image>" * N_L + after + end + "What is it?") == 1
    assert row.count("<|im_start|>user\n" + start + before + "<image>" * N_S + after + end + "What colour?") == 1
    labelled = inputs["labels"][0][inputs["labels"][0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labelled) == "A cup.<|im_end|>"

    seen = {}
    lm = _language_model(family.host)
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            adapter(**inputs)
            fused = adapter.fused_tokens(
                **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
            )
    finally:
        handle.remove()
    assert fused.group_sizes == [[N_L, N_S], [N_L]]
    torch.testing.assert_close(seen["embeds"][ids == IMAGE_ID], fused.tokens, rtol=0, atol=0)
    text = family.host.get_input_embeddings()(ids[ids != IMAGE_ID])
    torch.testing.assert_close(seen["embeds"][ids != IMAGE_ID], text, rtol=0, atol=0)


def test_batch_equals_each_conversation_alone_and_generate_uses_the_host_cache(family, tokenizer):
    adapter = family.adapter()
    inputs = family.inputs(adapter, tokenizer, CONVS)
    alone = [family.inputs(adapter, tokenizer, [c], first=i) for i, c in enumerate(CONVS)]
    out = adapter.generate(**inputs, **GREEDY)
    assert out.shape == (2, inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"])
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    for i, single in enumerate(alone):
        assert "labels" not in single or i == 0
        with torch.no_grad():
            logits = adapter(**{k: v for k, v in single.items() if k != "labels"}).logits[0, -1]
        one = adapter.generate(**single, **GREEDY)
        # Left padding changes nothing (positions, mask, cache), and the first new token is the
        # argmax of the forward pass: generate's prefill is the same fused prompt.
        assert torch.equal(one[0, -GREEDY["max_new_tokens"] :], out[i, -GREEDY["max_new_tokens"] :])
        assert one[0, single["input_ids"].shape[1]].item() == logits.argmax().item()


def test_several_images_in_one_conversation(family, tokenizer):
    adapter = family.adapter()
    two = family.inputs(adapter, tokenizer, [[("Compare them.", None)]], per_row=[2])
    one = family.inputs(adapter, tokenizer, [[("Compare them.", None)]], per_row=[1])
    names = adapter.vision_inputs
    with torch.no_grad():
        v2 = adapter.vision_prefix(**{k: two[k] for k in names}, images_per_sample=two["fusion_images_per_sample"])
        v1 = adapter.vision_prefix(**{k: one[k] for k in names})
    assert v2.cu_seqlens.numel() == 2 and v2.tokens.shape[0] > v1.tokens.shape[0]
    # The first image's prefix leads the two-image prefix unchanged.
    torch.testing.assert_close(v2.tokens[: v1.tokens.shape[0]], v1.tokens, rtol=1e-5, atol=1e-5)
    assert (two["input_ids"] == IMAGE_ID).sum().item() == N_L
    assert adapter.generate(**two, **GREEDY).shape[0] == 1


def test_save_reload_identical(family, tokenizer, tmp_path):
    adapter = family.adapter()
    inputs = family.inputs(adapter, tokenizer, CONVS)
    adapter.save_pretrained(tmp_path / "ckpt")
    reloaded = family.cls.from_pretrained(family.build(), tmp_path / "ckpt")
    assert reloaded.prompt == adapter.prompt and reloaded.fusion.cfg == adapter.fusion.cfg
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, adapter(**inputs).logits)


def test_stage2_steps_lower_the_loss_and_leave_the_host_bit_identical(family, tokenizer):
    adapter = family.adapter().train()
    host_before = {k: v.clone() for k, v in family.host.state_dict().items()}
    inputs = family.inputs(adapter, tokenizer, [[("What is it?", "A cup."), ("Colour?", "Red.")]])
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = adapter(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert {n for n, _ in adapter.trainable_named_parameters()} == {f"fusion.{k}" for k in adapter.fusion.state_dict()}
    for k, v in family.host.state_dict().items():
        assert torch.equal(v, host_before[k]), k


def test_errors_name_the_family_and_what_is_missing(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(**dict(TEXT, num_hidden_layers=1)))
    with pytest.raises(ValueError, match="no fusedvlm adapter for model_type 'llama'; supported: .*qwen2_5_vl"):
        attach(llama, FUSION)
    host = gemma3()
    with pytest.raises(
        ValueError,
        match="Gemma3ForConditionalGeneration is not a qwen2_vl host: it lacks config.vision_start_token_id, "
        "config.vision_end_token_id, model.visual",
    ):
        Qwen2VLFusionAdapter.attach(host, FUSION)
    qwen = Family("qwen2_vl")
    adapter = qwen.adapter()
    inputs = qwen.inputs(adapter, tokenizer, CONVS)
    with pytest.raises(ValueError, match="the qwen2_vl adapter needs image_grid_thw"):
        adapter(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    video = inputs["image_grid_thw"].clone()
    video[:, 0] = 2
    with pytest.raises(ValueError, match="not videos"):
        adapter(**dict(inputs, image_grid_thw=video))
    with pytest.raises(ValueError, match="3 images for 2 conversations"):
        adapter.prepare_inputs(tokenizer, CONVS, images=_images(3), image_processor=qwen.processor)
    with pytest.raises(ValueError, match="takes no vision input pixel_attention_mask"):
        adapter.prepare_inputs(tokenizer, CONVS, inputs["pixel_values"], pixel_attention_mask=inputs["pixel_values"])
    with pytest.raises(ValueError, match="must not fix grid"):
        Qwen2VLFusionAdapter.attach(qwen.host, FusionModule(dataclasses.replace(adapter.fusion.cfg, grid=(4, 4))))


@pytest.mark.parametrize("name", ["qwen2_5_vl", "smolvlm", "llava_onevision"])
def test_trainer_batches_images_of_different_sizes(name, tokenizer, tmp_path):
    from fusedvlm.adapters.training import AdapterCollator, AdapterDataset, AdapterStage2Objective
    from fusedvlm.train.data import read_records
    from fusedvlm.train.loop import TrainConfig, Trainer

    records = []
    for i, image in enumerate(_images(3)):  # three sizes: different patch, view and tile counts
        image.save(tmp_path / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"Thing {i}."}]
        records.append({"image": f"{i}.png", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(records))
    family = Family(name)
    host_before = {k: v.clone() for k, v in family.host.state_dict().items()}
    adapter = family.adapter()
    fusion_before = {k: v.clone() for k, v in adapter.fusion.state_dict().items()}
    recs, _ = read_records(str(tmp_path / "data.json"), str(tmp_path))
    dataset = AdapterDataset(recs, adapter, family.processor)
    collator = AdapterCollator(adapter, tokenizer)
    batch = collator([dataset[0], dataset[1], dataset[2]])
    assert batch.inputs["fusion_images_per_sample"].tolist() == [1, 1, 1]
    config = TrainConfig(steps=2, batch_size=3, lr=1e-3, warmup_ratio=0.0, progress=False)
    rows = Trainer(AdapterStage2Objective(adapter), dataset, collator, config, str(tmp_path / "run")).fit()
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    for k, v in family.host.state_dict().items():
        assert torch.equal(v, host_before[k]), k
    assert any(not torch.equal(v, fusion_before[k]) for k, v in adapter.fusion.state_dict().items())


def test_session_reuses_earlier_turns_and_answers_as_recomputing_does(family, tokenizer):
    from fusedvlm.adapters.session import AdapterSession

    adapter = family.adapter()
    images, _ = family.images([1])
    chat = AdapterSession(adapter, tokenizer, images=images, image_processor=family.processor)
    first = chat.ask("What is it?", **GREEDY)
    cached = chat._llm_cache.get_seq_length()
    second = chat.ask("What colour?", **GREEDY, output_scores=True, return_dict_in_generate=True)
    assert cached > len(first) and chat.turns == 2
    # Recomputed from scratch: the whole conversation, turn 1 answered with the generated ids.
    inputs = adapter.prepare_inputs(
        tokenizer, [[("What is it?", first), ("What colour?", None)]], images=images, image_processor=family.processor
    )
    assert chat.ids[: inputs["input_ids"].shape[1]] == inputs["input_ids"][0].tolist()
    scratch = adapter.generate(**inputs, **GREEDY, output_scores=True, return_dict_in_generate=True)
    assert scratch.sequences[0, inputs["input_ids"].shape[1] :].tolist() == second
    for reused, recomputed in zip(chat.last_output.scores, scratch.scores):
        torch.testing.assert_close(reused, recomputed, rtol=1e-4, atol=1e-4)


# Qwen2-VL-Instruct's chat template, its image and text parts (the video part left out).
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_native(tokenizer, family):
    """The host processor's own prompt for one image and "What is it?" (the test tokenizer's
    ``<image>`` as its ``<|image_pad|>``), and the tokenizer with Qwen's chat template."""
    import copy

    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = copy.deepcopy(tokenizer)
    tok.chat_template, tok.image_token = QWEN2_VL_TEMPLATE, "<image>"
    template = QWEN2_VL_TEMPLATE.replace("<|image_pad|>", "<image>")
    processor = Qwen2VLProcessor(family.processor, tok, Qwen2VLVideoProcessor(), chat_template=template)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=_images(1), return_tensors="pt"), tok


def _one_placeholder_per_run(ids):
    return [t for i, t in enumerate(ids) if not (t == IMAGE_ID and i and ids[i - 1] == IMAGE_ID)]


def test_qwen_fused_block_sits_where_the_host_processor_puts_the_image_with_its_markers(tokenizer):
    qwen = Family("qwen2_vl")
    native, tok = _qwen_native(tokenizer, qwen)
    adapter = qwen.adapter()
    inputs = adapter.prepare_inputs(tok, [("What is it?", None)], images=_images(1), image_processor=qwen.processor)
    ids, native_ids = inputs["input_ids"][0].tolist(), native["input_ids"][0].tolist()
    # The same prompt, <|vision_start|> <image> x n <|vision_end|> included, with n_l fused tokens
    # in place of the image's; the host marks only the image tokens as vision (type 1).
    assert ids.count(IMAGE_ID) == N_L and native_ids.count(IMAGE_ID) == native["image_grid_thw"].prod() // 4
    assert _one_placeholder_per_run(ids) == _one_placeholder_per_run(native_ids)
    assert native["mm_token_type_ids"][0].tolist() == [int(t == IMAGE_ID) for t in native_ids]
    start = ids.index(IMAGE_ID)
    assert ids[start - 1] == 264 and ids[start + N_L] == 265

    # M-RoPE: the host's rule for an image block, the fused block as a 1 x n_l image.
    mask = inputs["attention_mask"]
    pos = adapter.host_positions(inputs["input_ids"], mask)[:, 0]
    host_pos, _ = qwen.host.model.get_rope_index(
        native["input_ids"],
        native["mm_token_type_ids"],
        native["image_grid_thw"],
        attention_mask=native["attention_mask"],
    )
    assert torch.equal(pos[:, :start], host_pos[:, 0, :start])  # the text before the image alike
    assert torch.equal(pos[:2, start : start + N_L], torch.full((2, N_L), start))
    assert torch.equal(pos[2, start : start + N_L], torch.arange(start, start + N_L))
    assert torch.equal(pos[:, start + N_L :], torch.arange(start + N_L, len(ids)).expand(3, -1))
    # The native image block: (t, h, w) = (p, p + row, p + col), text after it from p + max(h, w).
    h, w = (native["image_grid_thw"][0, 1:] // 2).tolist()
    block = host_pos[:, 0, start : start + h * w]
    assert block[1].max() == start + h - 1 and block[2].max() == start + w - 1
    assert host_pos[0, 0, start + h * w] == start + max(h, w)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_generate_continues_the_fused_prompt_positions_through_the_kv_cache(name, tokenizer):
    qwen = Family(name)
    native, _ = _qwen_native(tokenizer, qwen)
    with torch.no_grad():
        qwen.host(**native)  # a native call leaves the host's rope_deltas for its image behind
    assert qwen.host.model.rope_deltas is not None and qwen.host.model.rope_deltas.abs().sum() > 0
    adapter = qwen.adapter()
    inputs = qwen.inputs(adapter, tokenizer, CONVS)
    out = adapter.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    # Greedy decoding by whole forward passes (no cache), each over the prompt plus the tokens
    # so far with the adapter's positions: generate's cached steps must give the same logits.
    seq, mask = inputs["input_ids"], inputs["attention_mask"]
    for step in range(GREEDY["max_new_tokens"]):
        with torch.no_grad():
            logits = adapter(**dict(inputs, input_ids=seq, attention_mask=mask, labels=None)).logits[:, -1]
        torch.testing.assert_close(out.logits[step], logits, rtol=1e-4, atol=1e-4)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(out.sequences, seq)


def test_gemma3_pan_and_scan_crops_are_more_views_of_their_image(tokenizer):
    pas = Family("gemma3_pan_and_scan")
    adapter = pas.adapter()
    convs = [[("What is it?", None)]] * 3
    images = _images(3)  # 40x56 and 64x32 are elongated enough for 2 crops each, 48x48 is not
    inputs = adapter.prepare_inputs(tokenizer, convs, images=images, image_processor=pas.processor)
    plain = adapter.prepare_inputs(tokenizer, convs, images=images, image_processor=gemma3_processor())
    assert inputs["num_crops"].tolist() == [2, 2, 0] and inputs["pixel_values"].shape[0] == 7
    assert torch.equal(inputs["input_ids"], plain["input_ids"])  # one fused block, crops or not
    with torch.no_grad():
        feats = adapter.vision_features(inputs["pixel_values"], inputs["num_crops"])
        alone = adapter.vision_features(plain["pixel_values"], plain["num_crops"])
        fusion = {k: v for k, v in inputs.items() if k.startswith("fusion_")}
        fused = adapter.fused_tokens(inputs["pixel_values"], num_crops=inputs["num_crops"], **fusion).tokens
        fused_plain = adapter.fused_tokens(plain["pixel_values"], num_crops=plain["num_crops"], **fusion).tokens
    assert feats.cu_seqlens.tolist() == [0, 48, 96, 112]  # 1 + num_crops views of 16 tokens per image
    for i, start in enumerate(feats.cu_seqlens[:-1].tolist()):  # each image's whole view leads its segment
        torch.testing.assert_close(feats.tokens[start : start + 16], alone.tokens[16 * i : 16 * (i + 1)])
    # The crops reach the fused tokens of their own image only.
    assert not torch.allclose(fused[:N_L], fused_plain[:N_L], atol=1e-3)
    torch.testing.assert_close(fused[2 * N_L :], fused_plain[2 * N_L :], rtol=1e-5, atol=1e-5)
    assert adapter.generate(**inputs, **GREEDY).shape == (3, inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"])
    with pytest.raises(ValueError, match=r"pixel_values has 6 views but num_crops \[2, 2, 0\] makes 7"):
        adapter.vision_features(inputs["pixel_values"][:6], inputs["num_crops"])
    with pytest.raises(ValueError, match="the gemma3 adapter needs num_crops"):
        adapter(**{k: v for k, v in inputs.items() if k != "num_crops"})


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_idefics3_fused_tokens_sit_in_the_markers_the_hosts_processor_writes(name):
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    tok = _tokenizer()
    # An unsplit 32 px image is one view of 16 tokens (8x8 patches, pixel shuffle x2): with n_l = 16
    # the host's own processor writes the very prompt the adapter writes.
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=_tokenizer(), image_seq_len=N_L)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<image>What is it?"}], tokenize=False, add_generation_prompt=True
    )
    image = _images(1)[0]
    host_ids = processor(text=[text], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    adapter = Family(name).adapter()
    inputs = adapter.prepare_inputs(tok, [("What is it?", None)], images=[[image]], image_processor=image_processor)
    assert inputs["input_ids"][0].tolist() == host_ids
    assert tok.decode(host_ids).count("<fake_token_around_image><global-img>" + "<image>" * N_L) == 1

    # Later questions' n_s tokens are wrapped alike; a split image still gets the one global form.
    split = adapter.prepare_inputs(tok, CONVS[0], images=[[image]], image_processor=idefics3_processor())
    row = tok.decode(split["input_ids"][0].tolist())
    for n, question in ((N_L, "What is it?"), (N_S, "What colour?")):
        run = "<fake_token_around_image><global-img>" + "<image>" * n + "<fake_token_around_image>" + question
        assert row.count(run) == 1, row
    assert row.count("<fake_token_around_image>") == 4
