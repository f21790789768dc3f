"""Conversation layouts for the LLM (design §6), built piece by piece as token ids.

This is the one prompt builder of fusedvlm: chat sessions, training targets, benchmarks,
the drop-in adapters and the psi analysis all take their LLM ids from :class:`ChatLayout`.

A conversation is a list of turns; every turn is one question with its fused tokens placed
immediately **before** the question text and, once answered, its answer and the template's
closing token. The pieces of a turn are those of the authors' chat parser
(``tensorfusionvlm``), and each piece is tokenised **on its own**, exactly as they do: with a
SentencePiece tokenizer every piece then starts a new word, so there is no stray ``▁`` token
between a fused slot and the question, nor at the start of an answer.

Layouts (``{F}`` = the fused embeddings; ``|`` separates pieces that are tokenised apart):

* ``llama2`` (their ``llama-2-vision``; default system prompt :data:`AUTHORS_SYSTEM`)::

    <s>|[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n|{F}|{Q1}|[/INST]|{A1} </s>|<s>[INST]|{F}|{Q2}|[/INST]

  with an empty system prompt the first turn is ``<s>|{F}|[INST] {Q1}|[/INST]`` (and the fusion
  decoder reads ``[INST] {Q1}`` as the question, see :meth:`ChatLayout.fusion_text`).
* ``vicuna`` (their ``vicuna_v1.1``)::

    <s>|{system} |USER: |{F}|{Q1}| |ASSISTANT: |{A1}|</s>|USER: |{F}|{Q2}| |ASSISTANT:

  (the generation prompt ends ``ASSISTANT:``, an answered turn ``ASSISTANT: |{A}|</s>``).
* ``llama3`` (their ``llama-3-vision``): ``<|begin_of_text|>|<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>|<|start_header_id|>user<|end_header_id|>\\n\\n|{F}|{Q}|<|eot_id|>|<|start_header_id|>assistant<|end_header_id|>\\n\\n|{A}|<|eot_id|>``
* ``phi3`` (their ``phi-3``): ``{system}|<|user|>\\n|{F}|{Q}|<|end|>\\n|<|assistant|>\\n|{A}|<|end|>\\n``
* ``llava`` (LLaVA-1.5's prompt, which its tokenizer does not ship; the drop-in adapters'
  default for LLaVA hosts)::

    <s>|{system} |USER: |{F}|\n{Q1} ASSISTANT:| {A1}|</s>|USER: |{F}|\n{Q2} ASSISTANT:

* ``None``: the LLM tokenizer's own chat template (``tokenizer.chat_template``, e.g. SmolLM2's
  ChatML). It is rendered once with sentinel strings in place of the system prompt, questions
  and answers and cut at the sentinels into the same kind of pieces::

    {head with system}|{F}|{Q1}{generation prompt}|{A1}|{EOS}|{rest of the close}{next user header}|{F}|{Q2}{generation prompt}

  so fused slots and per-piece tokenisation work as for the hand-written layouts, which stay
  only where the authors' pipeline needs their exact pieces.

Text that users type (questions, answers, the system prompt) is tokenised as plain text:
a control-token string in it (``</s>``, ``<|im_end|>``, or ``[INST]`` where the tokenizer
has it as a special token) becomes ordinary text tokens, never the control token. Where the
text holds no such string the ids are exactly the authors' (they would turn it into the
control token; that one difference is deliberate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100
# The authors' default system prompt of both llama-2-vision and vicuna_v1.1.
AUTHORS_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The hand-written layouts (the authors' pieces); None selects the tokenizer's own template.
TEMPLATES = ("llama2", "vicuna", "llama3", "phi3", "llava")
# Default system prompt per template when none is given (None: no system part, or for the
# tokenizer's template whatever it writes without a system message).
DEFAULT_SYSTEM = {
    None: None,
    "llama2": AUTHORS_SYSTEM,
    "vicuna": AUTHORS_SYSTEM,
    "llama3": "You are a helpful assistant.",
    "phi3": "You are a helpful assistant.",
    "llava": None,
}
# The authors' template names (their checkpoints' eval configs) -> ours.
UPSTREAM_TEMPLATES = {
    "llama-2-vision": "llama2",
    "vicuna_v1.1": "vicuna",
    "llama-3-vision": "llama3",
    "phi-3": "phi3",
}


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

    def extend(self, other: Tokens) -> Tokens:
        self.ids += other.ids
        self.fused += other.fused
        self.labels += other.labels
        return self

    @property
    def num_fused(self) -> int:
        return sum(self.fused)

    def prompt_ids(self) -> list[int]:
        """The ids with every fused slot written as -1 (how ``chat --json`` reports prompts)."""
        return [-1 if f else i for i, f in zip(self.ids, self.fused)]


class ChatLayout:
    """Builds the token ids of turns for one template and tokenizer."""

    def __init__(
        self, template: str | None, tokenizer, system: str | None = None, image_markers: tuple[str, str] = ("", "")
    ):
        """``image_markers``: text a host writes before and after every run of fused slots
        (e.g. Idefics3's ``<fake_token_around_image><global-img>`` ... ``<fake_token_around_image>``),
        each tokenised as a piece of its own."""
        template = UPSTREAM_TEMPLATES.get(template, template)
        if template is not None and template not in TEMPLATES:
            raise ValueError(
                f"unknown chat template {template!r}; choose from {TEMPLATES} or {tuple(UPSTREAM_TEMPLATES)}, "
                "or None for the LLM tokenizer's own template"
            )
        self.template = template
        self.tokenizer = tokenizer
        self.system = DEFAULT_SYSTEM[template] if system is None else system
        if len(image_markers) != 2 or not all(isinstance(m, str) for m in image_markers):
            raise ValueError(f"image_markers must be two strings (before, after), got {image_markers!r}")
        self.image_markers = tuple(image_markers)
        self.bos_id = tokenizer.bos_token_id
        self.bos = tokenizer.bos_token or ""
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the LLM tokenizer has no EOS token; the chat layout needs one to close answers")
        self.eos = tokenizer.eos_token
        if template == "llama3":
            self.eos = "<|eot_id|>"
            self.eos_id = self._control_id(self.eos)
        elif template == "phi3":
            self.eos = "<|end|>"
            self.eos_id = self._control_id(self.eos)
        # The labelled piece that closes an answer (llama2 writes " </s>" into the answer piece).
        self._close = {"phi3": "<|end|>\n"}.get(template, self.eos)
        if template is None:
            self._split_tokenizer_template()
        # Fused positions carry a real id so that the ids tensor is valid for any embedding
        # table; its embedding is replaced before the LLM sees it (the authors use the pad id).
        self.placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Strings the tokenizer turns into added (control) tokens: typed by a user, they must
        # stay text.
        self._controls = tuple(
            t.content if hasattr(t, "content") else str(t)
            for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
        )

    def _control_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(tid, int) or tid == self.tokenizer.unk_token_id:
            raise ValueError(
                f"the {self.template} layout needs the control token {token!r}, which the LLM tokenizer lacks"
            )
        return tid

    def _split_tokenizer_template(self) -> None:
        """Cut the tokenizer's chat template into the pieces of a turn (see the module doc)."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(
                "the LLM tokenizer has no chat template of its own; choose a layout (llm.chat_template, "
                f"psi --chat-template) from {TEMPLATES}"
            )
        marks = {k: f"\ue000{k}\ue001" for k in ("SYS", "Q1", "A1", "Q2")}
        messages = [
            {"role": "user", "content": marks["Q1"]},
            {"role": "assistant", "content": marks["A1"]},
            {"role": "user", "content": marks["Q2"]},
        ]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": marks["SYS"] if self.system else ""})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts, rest = [], text
        for k in ("SYS", "Q1", "A1", "Q2"):
            if k == "SYS" and not self.system:
                continue
            if rest.count(marks[k]) != 1:
                raise ValueError(
                    f"the LLM tokenizer's chat template does not write each message once ({k}); "
                    f"set llm.chat_template to one of {TEMPLATES}"
                )
            before, rest = rest.split(marks[k])
            parts.append(before)
        parts.append(rest)
        if self.system:
            self._sys_before, head = parts.pop(0), parts.pop(0)
        else:
            self._sys_before, head = "", parts.pop(0)
        ask, between, ask2 = parts
        close = between.find(self.eos)
        if ask != ask2 or close < 0:
            raise ValueError(
                "the LLM tokenizer's chat template does not repeat the same turn pieces or does not close "
                f"answers with its EOS {self.eos!r}; set llm.chat_template to one of {TEMPLATES}"
            )
        # Only the closing token is a target (generation stops there); the rest of the close
        # belongs to the next turn's header.
        self._head, self._ask, self._close = head, ask, between[: close + len(self.eos)]
        self._next = between[close + len(self.eos) :]

    # ------------------------------------------------------------------ tokenising pieces
    def _encode(self, text: str, plain: bool = False) -> list[int]:
        if not text:
            return []
        if plain:
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def piece_ids(self, user: str = "", before: str = "", after: str = "") -> list[int]:
        """Ids of one piece ``before + user + after``: template text around user text.

        Tokenised in one call, as the authors do, unless ``user`` holds a control-token
        string: then the user part alone is tokenised as plain text."""
        if user and any(c and c in user for c in self._controls):
            return self._encode(before) + self._encode(user, plain=True) + self._encode(after)
        return self._encode(before + user + after)

    def _piece(self, user: str = "", before: str = "", after: str = "", labelled: bool = False) -> Tokens:
        ids = self.piece_ids(user, before, after)
        return Tokens(ids, [False] * len(ids), list(ids) if labelled else [IGNORE_INDEX] * len(ids))

    def _control(self, text: str, labelled: bool = False) -> Tokens:
        return self._piece(before=text, labelled=labelled)

    def _fused(self, n: int) -> Tokens:
        slots = Tokens([self.placeholder_id] * n, [True] * n, [IGNORE_INDEX] * n)
        if not n:
            return slots
        before, after = self.image_markers
        return self._control(before).extend(slots).extend(self._control(after))

    # ------------------------------------------------------------------ turns
    def fusion_text(self, question: str, first: bool) -> str:
        """The question text the fusion decoder reads for this turn. The authors' llama-2
        parser without a system prompt puts ``[INST] `` into the first question piece, which
        both the LLM and the fusion decoder then read."""
        if self.template == "llama2" and first and not self.system:
            return f"[INST] {question}"
        return question

    def question(self, question: str, n_fused: int, first: bool) -> Tokens:
        """The ids of one question turn up to the point where the assistant speaks."""
        return self.turn(question, n_fused, first, None)

    def turn(self, question: str, n_fused: int, first: bool, answer: str | list[int] | None) -> Tokens:
        """One whole turn: the question with its fused slots, then either the generation
        prompt (``answer`` None) or the answer with its closing token (labelled)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question")
        t = Tokens()
        sys = self.system
        if self.template == "llama2":
            if first:
                t.extend(self._control(self.bos))
                if sys:
                    t.extend(self._piece(sys, before="[INST] <<SYS>>\n", after="\n<</SYS>>\n\n"))
                    t.extend(self._fused(n_fused)).extend(self._piece(question))
                else:
                    t.extend(self._fused(n_fused)).extend(self._piece(question, before="[INST] "))
            else:
                t.extend(self._control(f"{self.bos}[INST]")).extend(self._fused(n_fused)).extend(self._piece(question))
            t.extend(self._control("[/INST]"))
            if answer is not None:
                t.extend(self._answer(answer, after=f" {self.eos}"))
        elif self.template == "vicuna":
            if first:
                t.extend(self._control(self.bos)).extend(self._piece(sys or "", after=" "))
            t.extend(self._control("USER: ")).extend(self._fused(n_fused)).extend(self._piece(question))
            t.extend(self._control(" "))
            if answer is None:
                t.extend(self._control("ASSISTANT:"))
            else:
                t.extend(self._control("ASSISTANT: ")).extend(self._answer(answer)).extend(
                    self._control(self._close, labelled=True)
                )
        elif self.template == "llava":
            if first:
                t.extend(self._control(self.bos))
                if sys:
                    t.extend(self._piece(sys, after=" "))
            t.extend(self._control("USER: ")).extend(self._fused(n_fused)).extend(
                self._piece(question, before="\n", after=" ASSISTANT:")
            )
            if answer is not None:
                t.extend(self._answer(answer, before=" ")).extend(self._control(self._close, labelled=True))
        elif self.template == "llama3":
            if first:
                t.extend(self._control(self.bos))
                if sys:
                    t.extend(
                        self._piece(sys, before="<|start_header_id|>system<|end_header_id|>\n\n", after="<|eot_id|>")
                    )
            t.extend(self._control("<|start_header_id|>user<|end_header_id|>\n\n")).extend(self._fused(n_fused))
            t.extend(self._piece(question)).extend(self._control("<|eot_id|>"))
            t.extend(self._control("<|start_header_id|>assistant<|end_header_id|>\n\n"))
            if answer is not None:
                t.extend(self._answer(answer)).extend(self._control(self._close, labelled=True))
        elif self.template == "phi3":
            if first and sys:
                t.extend(self._piece(sys))
            t.extend(self._control("<|user|>\n")).extend(self._fused(n_fused)).extend(self._piece(question))
            t.extend(self._control("<|end|>\n")).extend(self._control("<|assistant|>\n"))
            if answer is not None:
                t.extend(self._answer(answer)).extend(self._control(self._close, labelled=True))
        else:  # the tokenizer's own template
            if first:
                t.extend(
                    self._piece(sys, before=self._sys_before, after=self._head) if sys else self._control(self._head)
                )
            else:
                t.extend(self._control(self._next))
            t.extend(self._fused(n_fused)).extend(self._piece(question, after=self._ask))
            if answer is not None:
                t.extend(self._answer(answer)).extend(self._control(self._close, labelled=True))
        return t

    def _answer(self, answer: str | list[int], after: str = "", before: str = "") -> Tokens:
        """An answer as text (one piece with ``after``), or as the ids the LLM generated
        (``after`` then follows as its own piece); labelled, as training targets."""
        if isinstance(answer, str):
            return self._piece(answer, before=before, after=after, labelled=True)
        ids = list(answer)
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return Tokens(ids, [False] * len(ids), ids[:]).extend(self._control(after, labelled=True))

    def answer(self, answer: str | list[int], labelled: bool = True) -> Tokens:
        """The ids that follow a question turn's generation prompt in a conversation: the
        answer (text, or generated ids) plus the closing token. For ``vicuna`` the generation
        prompt of an answered turn differs (``ASSISTANT: ``), so use :meth:`turn` there."""
        if self.template == "llama2":
            t = self._answer(answer, after=f" {self.eos}")
        else:
            t = self._answer(answer, before=" " if self.template == "llava" else "").extend(
                self._control(self._close, labelled=True)
            )
        if not labelled:
            t.labels = [IGNORE_INDEX] * len(t.ids)
        return t

    def conversation(self, turns: list[tuple[str, str | list[int] | None]], fused_counts: list[int]) -> Tokens:
        """All turns; a final turn whose answer is None ends with the generation prompt."""
        if len(turns) != len(fused_counts):
            raise ValueError(f"{len(turns)} turns but {len(fused_counts)} fused counts")
        t = Tokens()
        for i, ((q, a), n) in enumerate(zip(turns, fused_counts)):
            if a is None and i != len(turns) - 1:
                raise ValueError(f"turn {i} has no answer but is not the last turn")
            t.extend(self.turn(q, n, i == 0, a))
        return t
