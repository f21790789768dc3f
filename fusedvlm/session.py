"""Multi-turn chat about one image, with every stage timed.

Each :meth:`ChatSession.ask` is one question: its fused tokens (n_l for the first question,
n_s afterwards) go immediately before its text, the LLM answers, and the answer stays in the
conversation.

With ``reuse_prefix=True`` (the default) nothing is computed twice: the vision prefix and
every earlier question group stay in the fusion decoder's KV cache, and the conversation so
far stays in the LLM's KV cache, so a turn costs only its own tokens. Both are exact because
attention is causal: earlier fused tokens never change when questions are appended (SPEC
section 5). ``reuse_prefix=False`` recomputes the whole fusion stream and the whole LLM
prompt every turn, as the authors' code does; it exists to measure the difference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fusedvlm.chat import Tokens
from fusedvlm.generation import GenerationConfig, decode, prefill
from fusedvlm.model.vlm import FusedVLM, VisionPrefix

STAGES = ("preprocess", "vision", "merge", "fusion", "projection", "llm_prefill")


@dataclass
class Answer:
    text: str
    ids: list[int]
    stopped_on_eos: bool
    num_fused: int  # fused tokens this question put before its text
    num_prompt_tokens: int  # LLM tokens fed in this turn's prefill
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "decode" and "compile"
    token_latencies_s: list[float] = field(default_factory=list)
    decode_path: str = "hf"  # the decode engine that ran (fusedvlm.decoding)

    @property
    def ttft_s(self) -> float:
        """Time to first token: every prefill stage of this turn."""
        return sum(self.timings.get(s, 0.0) for s in STAGES)

    @property
    def decode_tokens_per_s(self) -> float:
        d = self.timings.get("decode", 0.0)
        return len(self.ids) / d if d > 0 else float("nan")


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}

    def __call__(self, stage: str):
        return _Stage(self, stage)


class _Stage:
    def __init__(self, timer: _Timer, stage: str):
        self.timer, self.stage = timer, stage

    def __enter__(self):
        if self.timer.device.type == "cuda":
            torch.cuda.synchronize(self.timer.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.timer.device.type == "cuda":
            torch.cuda.synchronize(self.timer.device)
        t = self.timer.timings
        t[self.stage] = t.get(self.stage, 0.0) + time.perf_counter() - self.t0


class ChatSession:
    def __init__(
        self, model: FusedVLM, image, *, system: str | None = None, reuse_prefix: bool = True,
        n_l: int | None = None, n_s: int | None = None, decode: str = "auto", compile: bool | None = None,
    ):
        if model.llm is None or model.layout is None:
            raise ValueError("a chat session needs a model with its LLM and tokenizer loaded")
        self.model = model
        self.n_l, self.n_s = model.fuser.resolve_counts(n_l, n_s)
        self.image = image
        self.reuse_prefix = reuse_prefix
        # The decode engine picks the lean static-cache path when the LLM allows it (fusedvlm.decoding).
        self.engine = model.decode_engine(decode, compile)
        self.layout = model.layout if system is None else type(model.layout)(model.layout.template, model.tokenizer, system)
        self.turns: list[tuple[str, list[int]]] = []
        self._question_ids: list[list[int]] = []
        self._fused: list[torch.Tensor] = []
        self._vision: VisionPrefix | None = None
        self._fusion_cache = None
        self._llm_past = None
        self._llm_length = 0
        self._pending = Tokens()  # answer tokens not yet in the LLM cache

    @property
    def num_fused_total(self) -> int:
        return sum(f.shape[0] for f in self._fused)

    def _encode_image(self, timer: _Timer) -> VisionPrefix:
        model = self.model
        with timer("preprocess"):
            views, counts = model.preprocess([self.image])
        with timer("vision"):
            tokens = model.vision(views)
        with timer("merge"):
            return model.fuser.merge_views(tokens, counts)

    @torch.no_grad()
    def ask(self, question: str, generation: GenerationConfig | None = None) -> Answer:
        generation = generation or GenerationConfig()
        model = self.model
        timer = _Timer(model.device)
        qids = model.question_ids(question)
        first = not self.turns
        # Validate the LLM prompt before any compute: empty question, context length.
        turn_tokens = self.layout.question(question, self.n_l if first else self.n_s, first)

        if self.reuse_prefix:
            if self._vision is None:
                self._vision = self._encode_image(timer)
                with timer("fusion"):
                    self._fusion_cache = model.prefix_cache(self._vision)
            with timer("fusion"):
                fused, self._fusion_cache = model.fuse_next(self._fusion_cache, [qids], [first], n_l=self.n_l, n_s=self.n_s, project=False)
            with timer("projection"):
                new = model.fuser.projection(fused.hidden)
            self._fused.append(new)
            tokens = Tokens().extend(self._pending).extend(turn_tokens)
            past, past_len, fused_in = self._llm_past, self._llm_length, new
        else:
            vision = self._encode_image(timer)
            with timer("fusion"):
                fused = model.fuse(vision, [self._question_ids + [qids]], n_l=self.n_l, n_s=self.n_s, project=False)
            with timer("projection"):
                all_fused = model.fuser.projection(fused.hidden)
            self._fused = list(torch.split(all_fused, fused.group_sizes[0]))
            new = self._fused[-1]
            tokens = self.layout.conversation([(q, a) for q, a in self.turns] + [(question, None)], fused.group_sizes[0])
            past, past_len, fused_in = None, 0, all_fused
        self._question_ids.append(qids)

        embeds = model.llm_embeds(tokens, fused_in, past_length=past_len)
        with timer("llm_prefill"):
            state = prefill(self.engine, embeds, past, past_len)
        out = decode(self.engine, state, generation, {self.layout.eos_id})
        timer.timings["decode"] = out.seconds
        if out.compile_s:
            timer.timings["compile"] = out.compile_s

        self.turns.append((question, out.ids))
        if self.reuse_prefix:
            closing = self.layout.answer(out.ids, labelled=False)
            cached = len(out.ids) - 1  # the last generated id was never fed back
            self._pending = Tokens(closing.ids[cached:], closing.fused[cached:], closing.labels[cached:])
            self._llm_past, self._llm_length = out.past_key_values, out.length
        text = model.tokenizer.decode(out.ids, skip_special_tokens=True).strip()
        return Answer(text, out.ids, out.stopped_on_eos, new.shape[0], len(tokens), timer.timings, out.token_latencies_s, out.path)

    def fused_tokens(self) -> list[torch.Tensor]:
        """The fused embeddings of every question so far, in order."""
        return list(self._fused)
