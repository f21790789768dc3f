"""Multi-turn chat about one image, with every stage timed.

Each :meth:`ChatSession.ask` is one question: its fused tokens (n_l for the first question,
n_s afterwards) go immediately before its text, the LLM answers, and the answer stays in the
conversation.

Every turn's LLM prompt is the whole conversation as the authors' chat code builds it: the
earlier answers enter as their decoded **text**, tokenised like any answer piece of the
template (the ids the LLM generated can differ from that re-tokenisation, e.g. by a trailing
``▁`` before ``</s>``).

With ``reuse_prefix=True`` (the default) nothing is computed twice: the vision prefix and
every earlier question group stay in the fusion decoder's KV cache, and the LLM's KV cache
keeps the longest prefix of the new prompt it already holds (it is cropped there; only the
rest is prefilled). Both are exact because attention is causal: earlier fused tokens never
change when questions are appended (design §5). ``reuse_prefix=False`` recomputes the
whole fusion stream and the whole LLM prompt every turn, as the authors' code does; it
exists to measure the difference.

A turn is a transaction: what can be checked up front is checked before any state changes,
and a turn that fails later (an exception, Ctrl-C during decoding) leaves the session as it
was, so the next question is answered as if the failed one had never been asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fusedvlm.chat import Tokens
from fusedvlm.generation import GenerationConfig, decode, prefill
from fusedvlm.model.vlm import FusedVLM, VisionPrefix
from fusedvlm.text import check_text
from fusedvlm.timing import timed

STAGES = ("preprocess", "vision", "merge", "fusion", "projection", "llm_prefill")


@dataclass
class Answer:
    text: str
    ids: list[int]
    stopped_on_eos: bool
    num_fused: int  # fused tokens this question put before its text
    num_prompt_tokens: int  # LLM tokens fed in this turn's prefill
    prompt: Tokens | None = None  # the whole conversation up to this turn's generation prompt
    prefill_start: int = 0  # prompt tokens that were already in the LLM's cache
    first_logits: torch.Tensor | None = None  # (vocab,) logits of the first generated token
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "decode" and "compile"
    token_latencies_s: list[float] = field(default_factory=list)
    decode_path: str = "hf"  # the decode engine that ran (fusedvlm.decode)

    @property
    def ttft_s(self) -> float:
        """Time to first token: every prefill stage of this turn."""
        return sum(self.timings.get(s, 0.0) for s in STAGES)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second. The first token comes from the prefill's logits, not from a
        step: counting it would overstate a short answer's rate (4 tokens: by a third)."""
        lat = self.token_latencies_s
        return len(lat) / sum(lat) if lat and sum(lat) > 0 else float("nan")


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}

    def __call__(self, stage: str):
        return timed(self.timings, stage, self.device)


class ChatSession:
    def __init__(
        self,
        model: FusedVLM,
        image,
        *,
        system: str | None = None,
        reuse_prefix: bool = True,
        n_l: int | None = None,
        n_s: int | None = None,
        decode: str = "auto",
        compile: bool | None = None,
    ):
        if model.llm is None or model.layout is None:
            raise ValueError("a chat session needs a model with its LLM and tokenizer loaded")
        self.model = model
        self.n_l, self.n_s = model.fuser.resolve_counts(n_l, n_s)
        self.image = image
        self.reuse_prefix = reuse_prefix
        # The decode engine picks the lean static-cache path when the LLM allows it (fusedvlm.decode).
        self.engine = model.decode_engine(decode, compile)
        self.layout = (
            model.layout if system is None else type(model.layout)(model.layout.template, model.tokenizer, system)
        )
        self.turns: list[tuple[str, str]] = []  # (question, answer text)
        self._question_ids: list[list[int]] = []
        self._fused: list[torch.Tensor] = []
        self._vision: VisionPrefix | None = None
        self._fusion_cache = None
        self._llm_past = None
        self._llm_tokens = Tokens()  # what the LLM's KV cache holds (ids and fused slots)

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
        """Answer one question (a transaction: see the module docstring)."""
        if generation is None:
            generation = GenerationConfig()
        elif not isinstance(generation, GenerationConfig):
            raise ValueError(f"generation must be a GenerationConfig, got {type(generation).__name__}")
        check_text(question, "question")
        model = self.model
        first = not self.turns
        qids = model.question_ids(self.layout.fusion_text(question, first))
        counts = [self.n_l] + [self.n_s] * len(self.turns)
        prompt = self.layout.conversation(list(self.turns) + [(question, None)], counts)
        model.check_llm_context(len(prompt), prompt.num_fused)
        keep = _common_prefix(self._llm_tokens, prompt) if self._llm_past is not None else 0
        try:
            self._crop_llm_cache(keep)
            return self._run_turn(question, qids, first, prompt, keep, generation)
        except BaseException:
            self._rollback_llm_cache()
            raise

    def _crop_llm_cache(self, keep: int) -> None:
        """Cut the LLM cache back to the first ``keep`` tokens of what it holds (where the new
        prompt diverges from it). The shorter cache is a consistent state of its own, so a turn
        that fails after this still leaves a session whose next answer is exact."""
        past = self._llm_past
        if past is None:
            return
        if past.get_seq_length() > keep:
            # Hugging Face's Cache API: a negative count removes that many tokens.
            past.crop(keep - past.get_seq_length())
        held = self._llm_tokens
        self._llm_tokens = Tokens(held.ids[:keep], held.fused[:keep], [])

    def _rollback_llm_cache(self) -> None:
        """Drop whatever a failed turn appended to the LLM's KV cache (prefill and decode grow
        it in place); everything else a turn changes is only assigned once it has succeeded."""
        past = self._llm_past
        if past is None:
            return
        extra = past.get_seq_length() - len(self._llm_tokens)
        if extra > 0:
            past.crop(-extra)
        if past.get_seq_length() != len(self._llm_tokens):
            # A cache that cannot be cut back would silently leak the failed turn into the next.
            self._llm_past, self._llm_tokens = None, Tokens()
            raise RuntimeError("the LLM cache could not be rolled back after a failed turn")

    def _run_turn(
        self, question: str, qids: list[int], first: bool, prompt: Tokens, keep: int, generation: GenerationConfig
    ) -> Answer:
        model = self.model
        timer = _Timer(model.device)
        vision, fusion_cache = self._vision, self._fusion_cache
        if self.reuse_prefix:
            if vision is None:
                vision = self._encode_image(timer)
                with timer("fusion"):
                    fusion_cache = model.prefix_cache(vision)
            with timer("fusion"):
                fused, fusion_cache = model.fuse_next(
                    fusion_cache, [qids], [first], n_l=self.n_l, n_s=self.n_s, project=False
                )
            with timer("projection"):
                new = model.fuser.projection(fused.hidden)
            all_fused = self._fused + [new]
            past = self._llm_past
        else:
            prefix = self._encode_image(timer)
            with timer("fusion"):
                fused = model.fuse(prefix, [self._question_ids + [qids]], n_l=self.n_l, n_s=self.n_s, project=False)
            with timer("projection"):
                projected = model.fuser.projection(fused.hidden)
            all_fused = list(torch.split(projected, fused.group_sizes[0]))
            new = all_fused[-1]
            past = None

        tail = Tokens(prompt.ids[keep:], prompt.fused[keep:], prompt.labels[keep:])
        stacked = torch.cat(all_fused)
        fused_in = stacked[stacked.shape[0] - tail.num_fused :]
        embeds = model.llm_embeds(tail, fused_in, past_length=keep)
        with timer("llm_prefill"):
            state = prefill(self.engine, embeds, past, keep)
        first_logits = state.logits
        out = decode(self.engine, state, generation, {self.layout.eos_id})
        timer.timings["decode"] = out.seconds
        if out.compile_s:
            timer.timings["compile"] = out.compile_s
        text = model.tokenizer.decode(out.ids, skip_special_tokens=True).strip()
        if self.reuse_prefix:
            # The cache now holds the prompt and every generated id but the last.
            gen = out.ids[:-1]
            llm_tokens, llm_past = Tokens(prompt.ids + gen, prompt.fused + [False] * len(gen), []), out.past_key_values
        else:
            llm_tokens, llm_past = Tokens(), None

        # Commit: nothing above changed the session (bar the LLM cache, rolled back by ask).
        self._vision, self._fusion_cache, self._fused = vision, fusion_cache, all_fused
        self._question_ids.append(qids)
        self.turns.append((question, text))
        self._llm_tokens, self._llm_past = llm_tokens, llm_past
        return Answer(
            text,
            out.ids,
            out.stopped_on_eos,
            new.shape[0],
            len(tail),
            prompt,
            keep,
            first_logits,
            timer.timings,
            out.token_latencies_s,
            out.path,
        )

    def fused_tokens(self) -> list[torch.Tensor]:
        """The fused embeddings of every question so far, in order."""
        return list(self._fused)


def _common_prefix(cached: Tokens, prompt: Tokens) -> int:
    """Length of the longest common prefix of two token sequences (ids and fused flags).
    Fused slots at the same position hold the same fused token: earlier groups never change."""
    n = 0
    for a, fa, b, fb in zip(cached.ids, cached.fused, prompt.ids, prompt.fused):
        if a != b or fa != fb:
            break
        n += 1
    # At least one token must be prefilled to get the next-token logits.
    return min(n, len(prompt) - 1)
