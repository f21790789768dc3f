"""Training data: LLaVA-style records, per-sample encoding, a packing collator and a
resumable, rank-aware batch sampler.

Records (JSON list or JSONL, one object a line)::

    {"image": "rel/path.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ1"},
                                                {"from": "gpt", "value": "A1"}, ...]}

``messages: [{"role": "user"|"assistant", "content"}]`` is accepted too. ``<image>`` tags are
stripped; turns must alternate question/answer starting with a question (system turns are
ignored); a multi-turn conversation becomes one sample with several questions.

Problems are never dropped silently: malformed records and missing images are found when the
file is read, corrupt images and untokenizable questions when a sample is encoded; each is
reported with its record index (0-based position in the file) and, per ``on_error``, skipped
(``"skip"``, with a warning, and counted in the metrics) or raised (``"raise"``).
"""

from __future__ import annotations

import abc
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fusedvlm.chat import IGNORE_INDEX, ChatLayout, Tokens
from fusedvlm.config import CLIP_EOT_ID, CLIP_SOT_ID
from fusedvlm.text import check_text

log = logging.getLogger("fusedvlm.train")

ON_ERROR = ("skip", "raise")
_IMAGE_TAG = re.compile(r"\s*<image>\s*")
_QUESTION_ROLES = ("human", "user")
_ANSWER_ROLES = ("gpt", "assistant")
_IGNORED_ROLES = ("system",)


class DataError(ValueError):
    """A record that cannot be used; the message starts with its index."""

    def __init__(self, index: int, reason: str, source: str = ""):
        self.index, self.reason = index, reason
        where = f"{source}: " if source else ""
        super().__init__(f"{where}record {index}: {reason}")


@dataclass(frozen=True)
class Record:
    index: int
    image: str  # absolute path
    turns: tuple[tuple[str, str], ...]  # (question, answer) pairs


def _parse_turns(conversation, index: int) -> tuple[tuple[str, str], ...]:
    if not isinstance(conversation, list) or not conversation:
        raise DataError(index, "'conversations' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    question: str | None = None
    for j, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise DataError(index, f"turn {j} is not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role in _IGNORED_ROLES:
            continue
        if not isinstance(text, str):
            raise DataError(index, f"turn {j} has no text ('value' or 'content')")
        if text.strip():
            try:  # a "\ud800" escape in the JSON decodes to a lone surrogate
                check_text(text, f"turn {j}")
            except ValueError as e:
                raise DataError(index, str(e)) from None
        if role in _QUESTION_ROLES:
            if question is not None:
                raise DataError(index, f"turn {j}: two questions in a row")
            question = _IMAGE_TAG.sub(" ", text).strip()
            if not question:
                raise DataError(index, f"turn {j}: empty question once <image> is removed")
        elif role in _ANSWER_ROLES:
            if question is None:
                raise DataError(index, f"turn {j}: an answer without a question before it")
            answer = text.strip()
            if not answer:
                raise DataError(index, f"turn {j}: empty answer")
            turns.append((question, answer))
            question = None
        else:
            raise DataError(index, f"turn {j} has unknown role {role!r}")
    if question is not None:
        raise DataError(index, "the last question has no answer")
    if not turns:
        raise DataError(index, "no question/answer pair")
    return tuple(turns)


def parse_record(obj, index: int, image_root: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(index, f"expected an object, got {type(obj).__name__}")
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise DataError(index, "no 'image' path (text-only records are not supported)")
    conversation = obj.get("conversations", obj.get("messages"))
    if conversation is None:
        raise DataError(index, "no 'conversations' or 'messages'")
    turns = _parse_turns(conversation, index)
    path = image if os.path.isabs(image) else os.path.join(image_root, image)
    if not os.path.isfile(path):
        raise DataError(index, f"image not found: {path}")
    return Record(index, path, turns)


def _raw_objects(path: str) -> Iterator[tuple[int, object]]:
    """(record index, parsed object or DataError) for a JSON list or a JSONL file."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.lstrip().startswith(b"["):
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(-1, f"not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})", path) from None
        except json.JSONDecodeError as e:
            raise DataError(-1, f"not valid JSON: {e}", path) from None
        yield from enumerate(data)
        return
    index = 0
    # Line by line from bytes: one badly encoded line costs that record, not the file.
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield (
                index,
                DataError(index, f"line {line_no} is not UTF-8 text (byte {e.start}: {line[e.start : e.start + 1]!r})"),
            )
        except json.JSONDecodeError as e:
            yield index, DataError(index, f"line {line_no} is not valid JSON: {e.msg}")
        index += 1


def read_records(path: str, image_root: str, on_error: str = "skip") -> tuple[list[Record], list[DataError]]:
    """All usable records of a JSON/JSONL file, and the problems found (each already logged).
    With ``on_error="raise"`` the first problem is raised instead."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image root not found: {image_root}")
    records, problems = [], []
    for index, obj in _raw_objects(path):
        try:
            if isinstance(obj, DataError):
                raise obj
            records.append(parse_record(obj, index, image_root))
        except DataError as e:
            e.args = (f"{path}: {e}",)
            if on_error == "raise":
                raise
            log.warning("skipping %s", e)
            problems.append(e)
    if not records:
        raise ValueError(f"{path}: no usable records ({len(problems)} skipped)")
    return records, problems


# ---------------------------------------------------------------------------- encoding
@dataclass
class Item:
    """One encoded sample."""

    index: int
    views: torch.Tensor  # (V, 3, S, S)
    question_ids: list[list[int]]  # CLIP BPE per question
    turns: tuple[tuple[str, str], ...]
    llm: Tokens | None = None  # stage 2: the whole conversation with labels
    answer_ids: list[list[int]] | None = None  # stage 1: CLIP ids of each answer, SOT .. EOT


@dataclass
class Skipped:
    index: int
    reason: str


@dataclass(frozen=True)
class SampleEncoder:
    """Turns a record into model inputs; everything it holds pickles (DataLoader workers)."""

    stage: int
    hd_num: int
    view_size: int
    n_l: int
    n_s: int
    drop_question: bool
    max_question_tokens: int | None
    layout: ChatLayout | None = None  # stage 2
    text_context: int = 512  # stage 1: CLIP text positions (SOT + answer + EOT)

    def fused_counts(self, num_questions: int) -> list[int]:
        return [self.n_l] + [self.n_s] * (num_questions - 1)

    def group_length(self, question_ids: list[int], first: bool) -> int:
        m = self.n_l if first else self.n_s
        return (0 if self.drop_question else len(question_ids)) + m

    def encode(self, record: Record) -> Item:
        from fusedvlm.clip_text import clip_tokenizer
        from fusedvlm.preprocess import hd_views, load_image

        try:
            views = hd_views(load_image(record.image), self.hd_num, self.view_size).views
        except (ValueError, OSError) as e:
            raise DataError(record.index, f"bad image: {e}") from None
        tok = clip_tokenizer()
        qids = []
        for j, (q, _) in enumerate(record.turns):
            try:
                qids.append(
                    tok.question_ids(
                        self.layout.fusion_text(q, j == 0) if self.layout is not None else q, self.max_question_tokens
                    )
                )
            except ValueError as e:
                raise DataError(record.index, f"question {j}: {e}") from None
        item = Item(record.index, views, qids, record.turns)
        if self.stage == 1:
            item.answer_ids = []
            for _, a in record.turns:
                ids = tok.encode(a)[: self.text_context - 2]  # CLIP truncates long captions the same way
                item.answer_ids.append([CLIP_SOT_ID] + ids + [CLIP_EOT_ID])
        else:
            item.llm = self.layout.conversation(list(record.turns), self.fused_counts(len(record.turns)))
        return item


class ConversationDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Record], encoder: SampleEncoder, on_error: str = "skip"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.records, self.encoder, self.on_error = records, encoder, on_error

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item | Skipped:
        record = self.records[i]
        try:
            return self.encoder.encode(record)
        except DataError as e:
            if self.on_error == "raise":
                raise
            return Skipped(e.index, e.reason)


# ---------------------------------------------------------------------------- batches
class BatchCounts(abc.ABC):
    """What the trainer counts of any micro-batch (:class:`Batch`, the adapters'
    ``AdapterBatch``): its records and the tokens processed, the fusion stream's
    (``fusion_tokens``) plus the LLM's unpadded ones (``llm_attention_mask``, None without LLM)."""

    indices: list[int]
    llm_attention_mask: torch.Tensor | None

    @property
    @abc.abstractmethod
    def fusion_tokens(self) -> int:
        """Tokens in the micro-batch's fusion-decoder stream."""

    @property
    def size(self) -> int:
        return len(self.indices)

    @property
    def num_tokens(self) -> int:
        if not self.indices:
            return 0
        mask = self.llm_attention_mask
        return self.fusion_tokens + (int(mask.sum()) if mask is not None else 0)


@dataclass
class Batch(BatchCounts):
    """A micro-batch. The fusion side is one packed stream (``fusion_cu_seqlens``, no padding);
    the LLM side (stage 2) is right-padded with an attention mask."""

    indices: list[int]
    views: torch.Tensor
    num_views: list[int]
    question_ids: list[list[list[int]]]
    turns: list[tuple[tuple[str, str], ...]]
    fusion_cu_seqlens: torch.Tensor
    num_targets: int  # the micro-batch's weight in the step's mean: stage 2 labelled tokens, stage 1 pairs
    llm_ids: torch.Tensor | None = None  # (B, L)
    llm_fused: torch.Tensor | None = None  # (B, L) bool
    llm_labels: torch.Tensor | None = None  # (B, L)
    llm_attention_mask: torch.Tensor | None = None  # (B, L)
    answer_ids: torch.Tensor | None = None  # (G, Lt) CLIP ids, 0-padded, one row per question
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def fusion_tokens(self) -> int:
        return int(self.fusion_cu_seqlens[-1])


class Collator:
    """Packs encoded samples into a :class:`Batch`. Skipped samples are passed on in
    ``batch.skipped`` for the trainer to report."""

    def __init__(self, encoder: SampleEncoder, tokens_per_view: int, pad_id: int | None = None):
        self.encoder, self.tokens_per_view = encoder, tokens_per_view
        self.pad_id = pad_id if pad_id is not None else (encoder.layout.placeholder_id if encoder.layout else 0)

    def __call__(self, items: list[Item | Skipped]) -> Batch:
        from fusedvlm.packing import cu_seqlens_from_lengths, pad_rows, pad_tokens

        skipped = [it for it in items if isinstance(it, Skipped)]
        items = [it for it in items if isinstance(it, Item)]
        enc = self.encoder
        lengths = []
        for it in items:
            vis = it.views.shape[0] * self.tokens_per_view
            lengths.append(vis + sum(enc.group_length(q, j == 0) for j, q in enumerate(it.question_ids)))
        s = enc.view_size
        batch = Batch(
            indices=[it.index for it in items],
            views=torch.cat([it.views for it in items]) if items else torch.zeros(0, 3, s, s),
            num_views=[it.views.shape[0] for it in items],
            question_ids=[it.question_ids for it in items],
            turns=[it.turns for it in items],
            fusion_cu_seqlens=cu_seqlens_from_lengths(lengths),
            num_targets=0,
            skipped=skipped,
        )
        if enc.stage == 1:
            # Stage 1's loss spans the whole step (Stage1Objective.whole_step); its targets are the pairs.
            batch.answer_ids, _ = pad_rows([a for it in items for a in it.answer_ids], 0)
            batch.num_targets = batch.answer_ids.shape[0]
        else:
            padded = pad_tokens([it.llm for it in items], self.pad_id)
            batch.llm_ids, batch.llm_fused, batch.llm_labels, batch.llm_attention_mask = padded
            batch.num_targets = int((batch.llm_labels[:, 1:] != IGNORE_INDEX).sum())
        return batch


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless micro-batches of record indices, reproducible from (seed, position).

    Epoch e visits ``randperm(n, seed + e)``; global micro-batch s of the run takes the next
    ``global_micro_batch`` indices of its epoch (an incomplete tail is dropped), and rank r
    of ``world`` takes its r-th contiguous share. Hence a single process and W ranks see the
    same global micro-batches, and restarting at ``start`` continues the same order."""

    def __init__(
        self,
        num_records: int,
        global_micro_batch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ):
        if global_micro_batch < 1 or global_micro_batch % world:
            raise ValueError(
                f"the global micro-batch ({global_micro_batch}) must be a positive multiple of the world size ({world})"
            )
        if num_records < global_micro_batch:
            raise ValueError(f"{num_records} records are fewer than one global micro-batch of {global_micro_batch}")
        self.n, self.global_micro_batch, self.seed = num_records, global_micro_batch, seed
        self.rank, self.world, self.start, self.shuffle = rank, world, start, shuffle
        self.per_epoch = num_records // global_micro_batch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        order_epoch, order = -1, None
        local = self.global_micro_batch // self.world
        while True:
            epoch, j = divmod(position, self.per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self.order(epoch)
            lo = j * self.global_micro_batch + self.rank * local
            yield order[lo : lo + local].tolist()
            position += 1
