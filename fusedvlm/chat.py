"""Conversation layouts for the LLM (SPEC section 6), built piece by piece as token ids.

A conversation is a list of turns; every turn is one question with its fused tokens placed
immediately **before** the question text, and (once answered) its answer followed by the
template's closing token (the tokenizer's EOS). Each piece is tokenized on its own, so the
ids of a conversation are exactly the concatenation of its turns' ids: a chat session can
feed only the new turn to an LLM whose cache already holds the earlier ones.

Layouts (``{F}`` = the fused embeddings):

* ``llama2``: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n {F} {Q1} [/INST] {A1} </s><s>[INST] {F} {Q2} [/INST] ...``
* ``vicuna`` (v1.1): ``<s>{system} USER: {F} {Q1} ASSISTANT: {A1}</s>USER: {F} {Q2} ASSISTANT: ...``
* ``chatml``: ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{F}{Q1}<|im_end|>\\n<|im_start|>assistant\\n{A1}<|im_end|>\\n<|im_start|>user\\n...``
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("llama2", "vicuna", "chatml")


@dataclass
class Tokens:
    """LLM token ids with, per position, whether it takes a fused embedding and its label.

    ``ids`` holds ``placeholder_id`` where ``fused`` is True; ``labels`` is IGNORE_INDEX except
    on answer tokens and their closing token (the stage-2 targets)."""

    ids: list[int] = field(default_factory=list)
    fused: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, other: "Tokens") -> "Tokens":
        self.ids += other.ids
        self.fused += other.fused
        self.labels += other.labels
        return self

    @property
    def num_fused(self) -> int:
        return sum(self.fused)


class ChatLayout:
    """Builds the token ids of turns for one template and tokenizer."""

    def __init__(self, template: str, tokenizer, system: str | None = None):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; choose from {TEMPLATES}")
        self.template = template
        self.tokenizer = tokenizer
        self.system = VICUNA_SYSTEM if (system is None and template == "vicuna") else (system or "")
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the LLM tokenizer has no EOS token; the chat layout needs one to close answers")
        # Fused positions carry a real id so that the ids tensor is valid for any embedding
        # table; its embedding is replaced before the LLM sees it.
        self.placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def _text(self, text: str, labelled: bool = False) -> Tokens:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
        return Tokens(list(ids), [False] * len(ids), list(ids) if labelled else [IGNORE_INDEX] * len(ids))

    def _special(self, token_id: int | None, labelled: bool = False) -> Tokens:
        if token_id is None:
            return Tokens()
        return Tokens([token_id], [False], [token_id if labelled else IGNORE_INDEX])

    def _fused(self, n: int) -> Tokens:
        return Tokens([self.placeholder_id] * n, [True] * n, [IGNORE_INDEX] * n)

    def question(self, question: str, n_fused: int, first: bool) -> Tokens:
        """The ids of one question turn up to the point where the assistant speaks."""
        if not question.strip():
            raise ValueError("empty question")
        t = Tokens()
        if self.template == "llama2":
            t.extend(self._special(self.bos_id))
            head = f"[INST] <<SYS>>\n{self.system}\n<</SYS>>\n\n" if (first and self.system) else "[INST] "
            t.extend(self._text(head)).extend(self._fused(n_fused)).extend(self._text(f" {question} [/INST]"))
        elif self.template == "vicuna":
            if first:
                t.extend(self._special(self.bos_id)).extend(self._text(f"{self.system} USER: " if self.system else "USER: "))
            else:
                t.extend(self._text("USER: "))
            t.extend(self._fused(n_fused)).extend(self._text(f" {question} ASSISTANT:"))
        else:
            head = f"<|im_start|>system\n{self.system}<|im_end|>\n" if (first and self.system) else ("" if first else "\n")
            t.extend(self._text(head + "<|im_start|>user\n")).extend(self._fused(n_fused))
            t.extend(self._text(f"{question}<|im_end|>\n<|im_start|>assistant\n"))
        return t

    def answer(self, answer: str | list[int], labelled: bool = True) -> Tokens:
        """An answer (text, or the ids the LLM generated) plus the closing EOS."""
        if isinstance(answer, str):
            # Llama-2 and Vicuna put a space between the prompt and the answer.
            text = f" {answer}" if self.template in ("llama2", "vicuna") else answer
            t = self._text(text, labelled)
        else:
            ids = list(answer)
            if ids and ids[-1] == self.eos_id:
                ids = ids[:-1]
            t = Tokens(ids, [False] * len(ids), ids[:] if labelled else [IGNORE_INDEX] * len(ids))
        return t.extend(self._special(self.eos_id, labelled))

    def conversation(self, turns: list[tuple[str, str | list[int] | None]], fused_counts: list[int]) -> Tokens:
        """All turns; a final turn whose answer is None ends with the generation prompt."""
        if len(turns) != len(fused_counts):
            raise ValueError(f"{len(turns)} turns but {len(fused_counts)} fused counts")
        t = Tokens()
        for i, ((q, a), n) in enumerate(zip(turns, fused_counts)):
            t.extend(self.question(q, n, first=(i == 0)))
            if a is not None:
                t.extend(self.answer(a))
            elif i != len(turns) - 1:
                raise ValueError(f"turn {i} has no answer but is not the last turn")
        return t
