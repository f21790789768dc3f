"""The conversation layouts (the authors' and the tokenizer's own), checked as text (byte tokenizer: ids decode exactly)."""

import pytest

from fusedvlm.chat import AUTHORS_SYSTEM, IGNORE_INDEX, ChatLayout
from fusedvlm.model.llm import byte_tokenizer

TOK = byte_tokenizer()


def _render(tokens) -> str:
    # Fused slots shown as F so the layout can be compared as one string.
    out = []
    for tid, fused in zip(tokens.ids, tokens.fused):
        out.append("F" if fused else TOK.decode([tid]))
    return "".join(out)


def test_llama2_layout():
    # The authors' pieces: no space between a fused slot and the question, none before an answer.
    layout = ChatLayout("llama2", TOK, "Be brief.")
    t = layout.conversation([("Q1?", "A1."), ("Q2?", None)], [3, 2])
    assert _render(t) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nFFFQ1?[/INST]A1. </s><s>[INST]FFQ2?[/INST]"


def test_llama2_default_system_is_the_authors():
    layout = ChatLayout("llama2", TOK)
    assert layout.system == AUTHORS_SYSTEM
    assert _render(layout.question("Q?", 1, True)).startswith(f"<s>[INST] <<SYS>>\n{AUTHORS_SYSTEM}\n<</SYS>>\n\nF")
    assert ChatLayout("llama-2-vision", TOK).template == "llama2"


def test_llama2_without_system_puts_inst_in_the_question_piece():
    layout = ChatLayout("llama2", TOK, "")
    assert _render(layout.question("Q?", 2, True)) == "<s>FF[INST] Q?[/INST]"
    assert layout.fusion_text("Q?", True) == "[INST] Q?" and layout.fusion_text("Q?", False) == "Q?"


def test_vicuna_layout_with_default_system():
    layout = ChatLayout("vicuna", TOK)
    t = layout.conversation([("Q1?", "A1."), ("Q2?", None)], [2, 1])
    assert _render(t).startswith("<s>A chat between a curious user")
    assert _render(t).endswith("questions. USER: FFQ1? ASSISTANT: A1.</s>USER: FQ2? ASSISTANT:")


def test_llava_layout():
    t = ChatLayout("llava", TOK).conversation([("Q1?", "A1."), ("Q2?", None)], [2, 1])
    assert _render(t) == "<s>USER: FF\nQ1? ASSISTANT: A1.</s>USER: F\nQ2? ASSISTANT:"
    assert TOK.decode([i for i in t.labels if i != IGNORE_INDEX]) == " A1.</s>"


# SmolLM2's ChatML template, which writes its own system prompt when none is given.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nDefault sys<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chatml_tokenizer():
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "[INST]"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


def _show(tok, tokens) -> str:
    return "".join("F" if f else tok.decode([i]) for i, f in zip(tokens.ids, tokens.fused))


def test_tokenizer_template_layout():
    # The tokenizer's own template, cut into pieces: the ids are those of its rendered text
    # with fused slots before each question, and only the answer and its EOS are targets.
    tok = _chatml_tokenizer()
    layout = ChatLayout(None, tok, "sys")
    t = layout.conversation([("Q1?", "A1."), ("Q2?", None)], [2, 1])
    assert _show(tok, t) == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nFFQ1?<|im_end|>\n<|im_start|>assistant\nA1.<|im_end|>"
        "\n<|im_start|>user\nFQ2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode([i for i in t.labels if i != IGNORE_INDEX]) == "A1.<|im_end|>"
    assert layout.eos_id == tok.convert_tokens_to_ids("<|im_end|>")
    # No system prompt given: the template's own.
    default = ChatLayout(None, tok).question("Q?", 1, True)
    assert (
        _show(tok, default)
        == "<|im_start|>system\nDefault sys<|im_end|>\n<|im_start|>user\nFQ?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_without_template_asks_for_a_layout():
    with pytest.raises(ValueError, match="no chat template of its own; choose a layout"):
        ChatLayout(None, TOK)


@pytest.mark.parametrize("template", ["llama2", "vicuna", "llava", None, "llama3", "phi3"])
def test_turns_concatenate_to_the_conversation(template):
    tok = (
        _llama3_phi3_tokenizer() if template in ("llama3", "phi3") else _chatml_tokenizer() if template is None else TOK
    )
    layout = ChatLayout(template, tok, "s")
    whole = layout.conversation([("a?", "x"), ("b?", "y"), ("c?", None)], [4, 2, 2])
    parts = (
        layout.turn("a?", 4, True, "x").extend(layout.turn("b?", 2, False, "y")).extend(layout.question("c?", 2, False))
    )
    assert (parts.ids, parts.fused, parts.labels) == (whole.ids, whole.fused, whole.labels)
    if template != "vicuna":  # vicuna's generation prompt differs from an answered turn's
        parts = layout.question("a?", 4, True).extend(layout.answer("x")).extend(layout.question("b?", 2, False))
        head = layout.conversation([("a?", "x"), ("b?", None)], [4, 2])
        assert (parts.ids, parts.labels) == (head.ids, head.labels)


def _llama3_phi3_tokenizer():
    from fusedvlm.model.llm import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|user|>",
                "<|assistant|>",
                "<|end|>",
            ]
        }
    )
    return tok


def test_llama3_and_phi3_layouts():
    tok = _llama3_phi3_tokenizer()
    t = ChatLayout("llama3", tok).conversation([("Q?", "A."), ("R?", None)], [2, 1])
    out = "".join("F" if f else tok.decode([i]) for i, f in zip(t.ids, t.fused))
    assert out == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nFFQ?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nFR?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    layout = ChatLayout("phi3", tok, "S")
    t = layout.conversation([("Q?", "A.")], [1])
    assert (
        "".join("F" if f else tok.decode([i]) for i, f in zip(t.ids, t.fused))
        == "S<|user|>\nFQ?<|end|>\n<|assistant|>\nA.<|end|>\n"
    )
    assert layout.eos_id == tok.convert_tokens_to_ids("<|end|>")


def test_each_piece_is_tokenised_on_its_own():
    # Count the tokenizer calls: one per piece, with the piece's exact text.
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(TOK, name)

        def __call__(self, text, **kw):
            calls.append(text)
            return TOK(text, **kw)

    ChatLayout("llama2", Spy(), "S").conversation([("Q1?", "A1."), ("Q2?", None)], [1, 1])
    assert calls == [
        "<s>",
        "[INST] <<SYS>>\nS\n<</SYS>>\n\n",
        "Q1?",
        "[/INST]",
        "A1. </s>",
        "<s>[INST]",
        "Q2?",
        "[/INST]",
    ]


@pytest.mark.parametrize("template", ["llama2", "vicuna", None])
@pytest.mark.parametrize("typed", ["</s>", "<s>", "<|im_end|>", "[INST]", "<|im_start|>assistant\n"])
def test_control_tokens_typed_by_users_are_plain_text(template, typed):
    tok = _chatml_tokenizer()
    if template is not None:
        tok.eos_token, tok.chat_template = "</s>", None
    layout = ChatLayout(template, tok, f"sys {typed}")
    specials = set(tok.all_special_ids)
    q, a = f"say {typed} now", f"ok {typed} done"
    t = layout.conversation([(q, a), (q, None)], [1, 1])
    plain = tok(typed, add_special_tokens=False, split_special_tokens=True).input_ids
    assert not set(plain) & specials
    # Every typed occurrence (system, two questions, one answer) shows up as its plain bytes.
    hay = ",".join(map(str, t.ids)) + ","
    assert hay.count(",".join(map(str, plain)) + ",") == 4
    # The control tokens in the ids are exactly the template's own.
    clean = ChatLayout(template, tok, "sys").conversation([("say now", "ok done"), ("say now", None)], [1, 1])
    assert sorted(i for i in t.ids if i in specials) == sorted(i for i in clean.ids if i in specials)
    # A normal call afterwards still honours control tokens.
    assert tok("</s>", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids("</s>")]


def test_generated_ids_answer_closes_with_one_eos():
    layout = ChatLayout("vicuna", TOK)
    ids = TOK("ok", add_special_tokens=False).input_ids
    assert layout.answer(ids + [TOK.eos_token_id]).ids == ids + [TOK.eos_token_id]
    # llama2 closes with the authors' " </s>" piece.
    assert ChatLayout("llama2", TOK).answer(ids).ids == ids + TOK(" </s>", add_special_tokens=False).input_ids
    assert layout.answer(ids).ids == ids + [TOK.eos_token_id]
    assert layout.answer(ids, labelled=False).labels == [IGNORE_INDEX] * (len(ids) + 1)


def test_layout_errors():
    with pytest.raises(ValueError, match="unknown chat template"):
        ChatLayout("alpaca", TOK)
    layout = ChatLayout("llama2", TOK)
    with pytest.raises(ValueError, match="empty question"):
        layout.question(" ", 2, True)
    with pytest.raises(ValueError, match="2 turns but 1 fused counts"):
        layout.conversation([("a", "b"), ("c", None)], [1])
    with pytest.raises(ValueError, match="no answer but is not the last"):
        layout.conversation([("a", None), ("c", None)], [1, 1])


def test_presets_and_saved_configs_choose_layouts():
    from fusedvlm.config import LLMConfig, ModelConfig, get_preset

    # No pretrained LLM defaults to the Llama-2 layout: the tokenizer's own template unless named.
    assert LLMConfig().chat_template is None and get_preset("smol").llm.chat_template is None
    saved = get_preset("smol").to_dict()
    saved["llm"]["chat_template"] = "chatml"  # written before the hand ChatML layout was dropped
    assert ModelConfig.from_dict(saved).llm.chat_template is None
