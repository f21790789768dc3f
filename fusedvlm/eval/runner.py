"""Scoring a model on benchmark items at many n_l, with each image's vision prefix shared.

For a batch of images the vision tower, the merge and the fusion decoder over the vision
prefix run once (:meth:`FusedVLM.prefix_cache`); every (question, n_l) pair of those images is
then one single-question group on that cached prefix, all in packed forwards
(:meth:`FusedVLM.fuse_single`). Attention is causal and the queries follow the prefix, so this
equals running each (question, n_l) from scratch, which ``shared_prefix=False`` does (the
authors' way, kept to test and measure the difference). The LLM then answers every pair:
greedy, single turn, a few tokens, ``llm_batch_size`` prompts per batch
(:func:`fusedvlm.eval.generate.greedy_batch`).

Predictions go to a JSONL file, one line per (index, n_l), flushed per batch of images; a run
that stops (a crash, Ctrl-C, a killed job) resumes from what is there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from fusedvlm.eval.data import Benchmark, BenchmarkError, Item
from fusedvlm.eval.generate import greedy_batch
from fusedvlm.generation import GenerationConfig, decode, prefill
from fusedvlm.timing import timed

PAD_SLACK = 0.1  # a batch of answers pads its prompts by at most this fraction (+ 8 tokens)


@dataclass(frozen=True)
class EvalConfig:
    """How ``fusedvlm eval`` scores; its flags are generated from these fields (:mod:`fusedvlm.options`)."""

    n_l: tuple[int, ...]
    shared_prefix: bool = True
    images_per_batch: int = field(default=4, metadata={"help": "images per vision / fusion forward"})
    # Counting each entry's copy of its image's cached prefix (the decoder takes one KV segment
    # per entry): bounds the memory of the copied keys/values.
    max_fusion_tokens: int = field(default=8192, metadata={"help": "tokens per packed fusion forward at most"})
    max_new_tokens_yes_no: int = 8
    max_new_tokens_mcq: int = 8
    llm_batch_size: int = field(
        default=16, metadata={"help": "answers decoded together; 1: one prompt at a time (prefill + decode)"}
    )

    def __post_init__(self):
        if not self.n_l:
            raise ValueError("n_l: give at least one value")
        if any(not isinstance(n, int) or n < 1 for n in self.n_l):
            raise ValueError(f"n_l values must be integers >= 1, got {list(self.n_l)}")
        if len(set(self.n_l)) != len(self.n_l):
            raise ValueError(f"n_l has repeated values: {list(self.n_l)}")
        for name in (
            "images_per_batch",
            "max_fusion_tokens",
            "max_new_tokens_yes_no",
            "max_new_tokens_mcq",
            "llm_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Prediction:
    index: str
    n_l: int
    text: str
    digest: str  # Item.digest: what the model was shown (image and prompt)

    def to_json(self) -> str:
        return json.dumps(
            {"index": self.index, "n_l": self.n_l, "digest": self.digest, "prediction": self.text}, ensure_ascii=False
        )


class PredictionStore:
    """Append-only JSONL of predictions. Reopening keeps every complete line; a last line cut
    short by a crash is dropped (and cut from the file) so that its item runs again.

    Each line records the digest of the row it answered (:attr:`Item.digest`): a row whose
    image or question was edited since no longer counts as done and is predicted again (the
    later line wins). The model, dtype and decode settings are bound to the whole directory
    by ``run.json`` (``fusedvlm eval``)."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[tuple[str, int], str] = {}
        self.digests: dict[tuple[str, int], str | None] = {}
        if os.path.exists(path):
            self._load()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")  # the last piece is b"" when the file ends with a newline
        offset = 0
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1
            if raw.strip():
                try:
                    rec = json.loads(raw)
                    key = (str(rec["index"]), int(rec["n_l"]))
                    text = rec["prediction"]
                    if not isinstance(text, str):
                        raise TypeError("prediction is not a string")
                    digest = rec.get("digest")  # absent in files of earlier versions: predicted again
                except (ValueError, KeyError, TypeError) as e:
                    if not last:
                        raise BenchmarkError(
                            f"{self.path}:{i + 1}: corrupt prediction line ({e}); fix or delete the file"
                        ) from None
                    with open(self.path, "r+b") as f:  # a write torn by a crash: that item runs again
                        f.truncate(offset)
                    break
                if last:  # complete, but its newline never reached the disk
                    with open(self.path, "ab") as f:
                        f.write(b"\n")
                self.records[key] = text
                self.digests[key] = digest
            offset += len(raw) + 1

    def done(self, item: Item, n_l: int) -> bool:
        """Whether ``item`` as it is now has a prediction at ``n_l``."""
        return self.digests.get((item.index, n_l), False) == item.digest

    def predictions(self, items: Iterable[Item], n_ls: Iterable[int]) -> dict[tuple[str, int], str]:
        """(index, n_l) -> prediction of the items as they are now (stale rows left out)."""
        return {(it.index, n): self.records[(it.index, n)] for it in items for n in n_ls if self.done(it, n)}

    def append(self, predictions: Iterable[Prediction]) -> None:
        lines = []
        for p in predictions:
            key = (p.index, p.n_l)
            if key in self.records and self.digests[key] == p.digest:
                continue
            self.records[key] = p.text
            self.digests[key] = p.digest
            lines.append(p.to_json() + "\n")
        if lines:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())


@dataclass
class Skipped:
    benchmark: str
    index: str
    error: str


@dataclass
class RunStats:
    items_done: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"vision": 0.0, "fusion": 0.0, "llm": 0.0})


class Evaluator:
    def __init__(self, model, cfg: EvalConfig):
        if model.llm is None or model.layout is None:
            raise ValueError("evaluation needs a model with its LLM and tokenizer loaded")
        for n in cfg.n_l:
            model.fuser.resolve_counts(n, None)  # every n_l must fit the query table: fail before any work
        self.model = model
        self.cfg = cfg
        self.stats = RunStats()

    def _stage(self, name: str):
        return timed(self.stats.seconds, name, self.model.device)

    # ------------------------------------------------------------------ fused tokens
    @torch.no_grad()
    def fused_tokens(
        self, images: list, prompts: list[list[str]], n_ls: list[list[list[int]]]
    ) -> list[list[dict[int, torch.Tensor]]]:
        """Fused tokens (n_l, d_llm) of every question of every image at the asked n_l:
        ``result[i][j][n]`` for image i, its question j and n in ``n_ls[i][j]``."""
        model = self.model
        # The fusion decoder reads the question as the chat layout hands it over (the authors'
        # pieces, e.g. Llama-2's "[INST] " when there is no system prompt).
        qids = [[model.question_ids(model.layout.fusion_text(p, True)) for p in ps] for ps in prompts]
        out: list[list[dict[int, torch.Tensor]]] = [[{} for _ in ps] for ps in prompts]
        if not self.cfg.shared_prefix:
            for i, image in enumerate(images):
                for j, q in enumerate(qids[i]):
                    for n in n_ls[i][j]:
                        with self._stage("vision"):
                            vision = model.encode_images([image])
                        with self._stage("fusion"):
                            out[i][j][n] = model.fuse(vision, [[q]], n_l=n).tokens
            return out
        with self._stage("vision"):
            vision = model.encode_images(images)
        with self._stage("fusion"):
            cache = model.prefix_cache(vision)
            entries = [(i, j, n) for i in range(len(images)) for j in range(len(qids[i])) for n in n_ls[i][j]]
            prefix = cache.lengths.tolist()
            sizes = [prefix[i] + len(qids[i][j]) + n for i, j, n in entries]
            start = 0
            while start < len(entries):
                stop, budget = start + 1, sizes[start]
                while stop < len(entries) and budget + sizes[stop] <= self.cfg.max_fusion_tokens:
                    budget += sizes[stop]
                    stop += 1
                chunk = entries[start:stop]
                fused = model.fuse_single(
                    cache, [i for i, _, _ in chunk], [qids[i][j] for i, j, _ in chunk], [n for _, _, n in chunk]
                )
                for (i, j, n), tokens in zip(chunk, fused.per_sample()):
                    out[i][j][n] = tokens
                start = stop
        return out

    # ------------------------------------------------------------------ answers
    @torch.no_grad()
    def answers(self, prompts: list[str], fused: list[torch.Tensor], max_new_tokens: int) -> list[str]:
        """Greedy single-turn answers, prompt i with fused tokens fused[i] before its text."""
        model = self.model
        with self._stage("llm"):
            embeds = [
                model.llm_embeds(model.layout.question(p, f.shape[0], first=True), f) for p, f in zip(prompts, fused)
            ]
            ids: list[list[int]] = [[] for _ in prompts]
            if self.cfg.llm_batch_size == 1:
                gen = GenerationConfig(max_new_tokens=max_new_tokens)
                for i, e in enumerate(embeds):
                    ids[i] = decode(model.llm, prefill(model.llm, e), gen, {model.layout.eos_id}).ids
            else:
                for chunk in self._length_buckets([e.shape[0] for e in embeds]):
                    for i, out in zip(
                        chunk, greedy_batch(model.llm, [embeds[i] for i in chunk], max_new_tokens, model.layout.eos_id)
                    ):
                        ids[i] = out
        return [model.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]

    def _length_buckets(self, lengths: list[int]) -> list[list[int]]:
        """Batches of prompt indices, sorted by length, each at most llm_batch_size long and
        padded by at most PAD_SLACK of its shortest prompt: padding is computed like real
        tokens, and a sweep mixes prompts of 800 tokens (n_l = 768) with prompts of 30."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        buckets: list[list[int]] = []
        for i in order:
            if (
                buckets
                and len(buckets[-1]) < self.cfg.llm_batch_size
                and lengths[i] <= lengths[buckets[-1][0]] * (1 + PAD_SLACK) + 8
            ):
                buckets[-1].append(i)
            else:
                buckets.append([i])
        return buckets

    def _too_long(self, item: Item, n_l: int, max_new: int) -> str | None:
        """Why ``item``'s prompt with ``n_l`` fused tokens and its answer do not fit the LLM's
        context, or None: checked per row up front so that one over-long question is reported
        by its index (and skipped on request) instead of stopping its whole batch."""
        tokens = self.model.layout.question(item.prompt, n_l, first=True)
        try:
            self.model.check_llm_context(len(tokens) + max_new, n_l)
        except ValueError as e:
            return f"question too long: {e}"
        return None

    # ------------------------------------------------------------------ a benchmark
    def run(
        self,
        bench: Benchmark,
        store: PredictionStore,
        on_error: str = "fail",
        skipped: Callable[[Skipped], None] | None = None,
        progress=None,
    ) -> None:
        """Predict every (item, n_l) not yet in ``store``. A row whose image fails to decode
        raises (``on_error='fail'``) or is passed to ``skipped`` with its reason."""
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        max_new = self.cfg.max_new_tokens_yes_no if bench.yes_no else self.cfg.max_new_tokens_mcq
        pending: dict[str, list[tuple[Item, list[int]]]] = {}
        for item in bench.items:
            todo = [n for n in self.cfg.n_l if not store.done(item, n)]
            if not todo:
                continue
            problem = self._too_long(item, max(todo), max_new)
            if problem is not None:
                if on_error == "fail":
                    raise BenchmarkError(f"{bench.path}: index {item.index}: {problem} (--on-error skip leaves it out)")
                skipped(Skipped(bench.name, item.index, problem))
                continue
            pending.setdefault(item.image_key, []).append((item, todo))
        keys = list(pending)
        for b in range(0, len(keys), self.cfg.images_per_batch):
            batch_keys, images = [], []
            for key in keys[b : b + self.cfg.images_per_batch]:
                try:
                    images.append(bench.open_image(key))
                    batch_keys.append(key)
                except (OSError, ValueError, SyntaxError) as e:
                    indices = [it.index for it, _ in pending[key]]
                    message = f"cannot decode the image: {e}"
                    if on_error == "fail":
                        raise BenchmarkError(f"{bench.path}: index {indices[0]}: {message}") from None
                    for idx in indices:
                        skipped(Skipped(bench.name, idx, message))
            if not images:
                continue
            groups = [pending[k] for k in batch_keys]
            fused = self.fused_tokens(
                images, [[it.prompt for it, _ in g] for g in groups], [[todo for _, todo in g] for g in groups]
            )
            work = [
                (item, n, per_n[n])
                for g, per_image in zip(groups, fused)
                for (item, todo), per_n in zip(g, per_image)
                for n in todo
            ]
            texts = self.answers([it.prompt for it, _, _ in work], [f for _, _, f in work], max_new)
            predictions = [Prediction(it.index, n, t, it.digest) for (it, n, _), t in zip(work, texts)]
            store.append(predictions)
            self.stats.items_done += len(predictions)
            if progress is not None:
                progress.update(len(predictions))
