"""The three conversation layouts, checked as text (byte tokenizer: ids decode exactly)."""

import pytest

from fusedvlm.chat import IGNORE_INDEX, ChatLayout
from fusedvlm.model.llm import byte_tokenizer

TOK = byte_tokenizer()


def _render(tokens) -> str:
    # Fused slots shown as F so the layout can be compared as one string.
    out = []
    for tid, fused in zip(tokens.ids, tokens.fused):
        out.append("F" if fused else TOK.decode([tid]))
    return "".join(out)


def test_llama2_layout():
    layout = ChatLayout("llama2", TOK, "Be brief.")
    t = layout.conversation([("Q1?", "A1."), ("Q2?", None)], [3, 2])
    assert _render(t) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nFFF Q1? [/INST] A1.</s><s>[INST] FF Q2? [/INST]"


def test_vicuna_layout_with_default_system():
    layout = ChatLayout("vicuna", TOK)
    t = layout.conversation([("Q1?", "A1."), ("Q2?", None)], [2, 1])
    assert _render(t).startswith("<s>A chat between a curious user")
    assert _render(t).endswith("USER: FF Q1? ASSISTANT: A1.</s>USER: F Q2? ASSISTANT:")


def test_chatml_layout():
    layout = ChatLayout("chatml", TOK, "sys")
    t = layout.conversation([("Q1?", "A1."), ("Q2?", None)], [2, 1])
    assert _render(t) == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nFFQ1?<|im_end|>\n<|im_start|>assistant\nA1.</s>"
        "\n<|im_start|>user\nFQ2?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("template", ["llama2", "vicuna", "chatml"])
def test_turns_concatenate_to_the_conversation(template):
    # A session feeds turn by turn; that must equal building the whole conversation.
    layout = ChatLayout(template, TOK, "s")
    whole = layout.conversation([("a?", "x"), ("b?", "y"), ("c?", None)], [4, 2, 2])
    parts = layout.question("a?", 4, True).extend(layout.answer("x")).extend(layout.question("b?", 2, False))
    parts.extend(layout.answer("y")).extend(layout.question("c?", 2, False))
    assert (parts.ids, parts.fused, parts.labels) == (whole.ids, whole.fused, whole.labels)


def test_generated_ids_answer_closes_with_one_eos():
    layout = ChatLayout("llama2", TOK)
    ids = TOK("ok", add_special_tokens=False).input_ids
    assert layout.answer(ids + [TOK.eos_token_id]).ids == ids + [TOK.eos_token_id]
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
