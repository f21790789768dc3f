"""The fusion module: everything between vision tokens and the LLM (SPEC sections 4-6).

It owns the local merge (+ LF token), the learnable queries, the fusion decoder and the
projection into the LLM width, and nothing model-specific: :class:`fusedvlm.model.FusedVLM`
puts a CLIP tower in front of it and a frozen causal LM behind it, and the drop-in adapters
put it inside other VLMs.

Token stream of one sample (SPEC section 5)::

    [V][Q1 text][P0 .. P(n_l-2)][EOS][Q2 text][P0 .. P(n_s-2)][EOS] ... [Qk text][P0 .. P(n_s-2)][EOS]

The outputs at the query and EOS positions of a group are its fused tokens: n_l for the
first question, n_s for every later one. Many samples run as one packed stream.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fusedvlm.config import FusionConfig, check_query_counts, n_s_for
from fusedvlm.kernels import local_merge
from fusedvlm.model.fusion import FusionCache, FusionDecoder
from fusedvlm.packing import cu_seqlens_from_lengths


@dataclass(frozen=True)
class FusionModuleConfig:
    fusion: FusionConfig = field(default_factory=FusionConfig)
    output_size: int = 4096  # the LLM's hidden size
    n_l: int = 256
    n_s: int | None = None  # None: the SPEC rule n_s_for(n_l)
    drop_question: bool = False
    max_question_tokens: int = 512
    merge: bool = True  # local merge + LF on each view's patch-token grid

    def __post_init__(self):
        check_query_counts(self.n_l, self.resolved_n_s, self.fusion.max_queries)

    @property
    def resolved_n_s(self) -> int:
        return n_s_for(self.n_l) if self.n_s is None else self.n_s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FusionModuleConfig":
        return cls(fusion=FusionConfig(**d["fusion"]), **{k: v for k, v in d.items() if k != "fusion"})


@dataclass
class VisionPrefix:
    """Packed vision prefixes of a batch of images: tokens (T_v, C), cu_seqlens (n + 1,),
    and the number of views per image."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    num_views: list[int]


@dataclass
class FusedTokens:
    """Fused outputs of a batch, packed per sample.

    hidden (T_f, C): fusion outputs at the query and EOS positions (after the final RMSNorm);
    tokens (T_f, d_llm): their projection into the LLM (None when not asked for); cu_seqlens (n + 1,): per sample;
    group_sizes[i]: the fused tokens of each question of sample i (n_l, n_s, n_s, ...);
    is_eos (T_f,): which outputs are the groups' EOS tokens."""

    hidden: torch.Tensor
    tokens: torch.Tensor | None
    cu_seqlens: torch.Tensor
    group_sizes: list[list[int]]
    is_eos: torch.Tensor

    def per_sample(self) -> list[torch.Tensor]:
        cu = self.cu_seqlens.tolist()
        return [self.tokens[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]


@functools.cache
def clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class LocalMerge(nn.Module):
    """3x3 stride-2 conv (no bias) + nearest residual + one learned LF (newline) token."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, width, 3, 3))
        self.lf_token = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small conv so that at initialisation the merge is close to the nearest-neighbour
        # residual: the fused tokens start as a faithful subsample of CLIP's.
        nn.init.normal_(self.weight, std=0.02 / 3)
        nn.init.normal_(self.lf_token, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(V, g*g, C) -> (V, ceil(g/2)^2 + 1, C)."""
        return local_merge(tokens, self.weight, self.lf_token, residual=True)


class FusionModule(nn.Module):
    def __init__(self, cfg: FusionModuleConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.fusion.hidden_size
        self.merge = LocalMerge(c) if cfg.merge else None
        self.decoder = FusionDecoder(cfg.fusion)
        self.projection = nn.Linear(c, cfg.output_size, bias=False)
        nn.init.normal_(self.projection.weight, std=c**-0.5)

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    # ------------------------------------------------------------------ questions
    def question_ids(self, question: str) -> list[int]:
        """CLIP BPE ids of a question (no start/end token)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question")
        ids = clip_tokenizer().encode(question)
        if not ids:
            raise ValueError(f"question {question!r} has no CLIP tokens")
        if len(ids) > self.cfg.max_question_tokens:
            raise ValueError(f"question has {len(ids)} CLIP tokens, more than max_question_tokens={self.cfg.max_question_tokens}")
        return ids

    def group_ids(self, question_ids: Sequence[int], first: bool, n_l: int | None = None, n_s: int | None = None) -> list[int]:
        """[question ids][P0 .. P(m-2)][EOS], m = n_l for the first question else n_s."""
        n_l, n_s = self.resolve_counts(n_l, n_s)
        m = n_l if first else n_s
        text = [] if self.cfg.drop_question else list(question_ids)
        return text + [self.cfg.fusion.query_token_id(i) for i in range(m - 1)] + [self.cfg.fusion.eos_token_id]

    def resolve_counts(self, n_l: int | None, n_s: int | None) -> tuple[int, int]:
        """(n_l, n_s) with the config's defaults filled in and the SPEC rule for n_s."""
        if n_l is None and n_s is None:
            return self.cfg.n_l, self.cfg.resolved_n_s
        n_l = self.cfg.n_l if n_l is None else n_l
        n_s = n_s_for(n_l) if n_s is None else n_s
        check_query_counts(n_l, n_s, self.cfg.fusion.max_queries)
        return n_l, n_s

    def num_fused(self, num_questions: int, n_l: int | None = None, n_s: int | None = None) -> int:
        n_l, n_s = self.resolve_counts(n_l, n_s)
        return n_l + (num_questions - 1) * n_s

    # ------------------------------------------------------------------ vision
    def merge_views(self, patch_tokens: torch.Tensor, num_views: list[int]) -> VisionPrefix:
        """(sum V_i, g*g, C) patch tokens of every view -> packed vision prefixes."""
        merged = self.merge(patch_tokens) if self.merge is not None else patch_tokens
        tpv = merged.shape[1]
        cu = cu_seqlens_from_lengths([v * tpv for v in num_views], device=merged.device)
        return VisionPrefix(merged.reshape(-1, merged.shape[-1]), cu, list(num_views))

    # ------------------------------------------------------------------ fusion
    def _embed_stream(self, vision: VisionPrefix | None, groups: list[list[list[int]]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pack per-sample streams [V_i][group 1][group 2]...: returns embeds (T, C), cu, is_vision."""
        n = len(groups)
        v_lens = vision.cu_seqlens.diff().tolist() if vision is not None else [0] * n
        if len(v_lens) != n:
            raise ValueError(f"{len(v_lens)} images but questions for {n} samples")
        ids: list[int] = []
        is_vision: list[bool] = []
        lengths = []
        for vl, sample_groups in zip(v_lens, groups):
            flat = [t for g in sample_groups for t in g]
            ids += [0] * vl + flat
            is_vision += [True] * vl + [False] * len(flat)
            lengths.append(vl + len(flat))
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        mask = torch.tensor(is_vision, dtype=torch.bool, device=device)
        emb = self.decoder.embed_tokens(ids_t)
        if vision is not None and vision.tokens.shape[0]:
            emb = emb.masked_scatter(mask[:, None], vision.tokens.to(emb.dtype))
        return emb, cu_seqlens_from_lengths(lengths, device=device), mask

    def _output_mask(self, groups: list[list[list[int]]], sizes: list[list[int]], v_lens: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        out, eos = [], []
        for vl, sample_groups, sample_sizes in zip(v_lens, groups, sizes):
            out += [False] * vl
            for g, m in zip(sample_groups, sample_sizes):
                out += [False] * (len(g) - m) + [True] * m
                eos += [False] * (m - 1) + [True]
        return torch.tensor(out, dtype=torch.bool, device=device), torch.tensor(eos, dtype=torch.bool, device=device)

    def fuse(
        self,
        vision: VisionPrefix,
        question_ids: list[list[list[int]]],
        n_l: int | None = None,
        n_s: int | None = None,
        project: bool = True,
    ) -> FusedTokens:
        """From scratch: sample i = [V_i] + its questions' groups, all samples in one pack.

        ``question_ids[i]`` lists the CLIP ids of every question of sample i (>= 1)."""
        n_l, n_s = self.resolve_counts(n_l, n_s)
        groups, sizes = [], []
        for i, qs in enumerate(question_ids):
            if len(qs) == 0:
                raise ValueError(f"sample {i} has no question")
            groups.append([self.group_ids(q, first=(j == 0), n_l=n_l, n_s=n_s) for j, q in enumerate(qs)])
            sizes.append([n_l] + [n_s] * (len(qs) - 1))
        device = self.device
        emb, cu, _ = self._embed_stream(vision, groups, device)
        hidden, _ = self.decoder(emb, cu)
        out_mask, is_eos = self._output_mask(groups, sizes, vision.cu_seqlens.diff().tolist(), device)
        return self._finish(hidden[out_mask], sizes, is_eos, project)

    def _finish(self, hidden: torch.Tensor, sizes: list[list[int]], is_eos: torch.Tensor, project: bool) -> FusedTokens:
        cu = cu_seqlens_from_lengths([sum(s) for s in sizes], device=hidden.device)
        return FusedTokens(hidden, self.projection(hidden) if project else None, cu, sizes, is_eos)

    def prefix_cache(self, vision: VisionPrefix) -> FusionCache:
        """Run the vision prefixes alone and keep every layer's keys/values: the part of the
        fusion that no question can change (attention is causal)."""
        _, cache = self.decoder(vision.tokens, vision.cu_seqlens, use_cache=True)
        return cache

    def fuse_next(
        self,
        cache: FusionCache,
        question_ids: list[list[int]],
        first: list[bool],
        n_l: int | None = None,
        n_s: int | None = None,
        project: bool = True,
    ) -> tuple[FusedTokens, FusionCache]:
        """Append one question group per sample to cached streams; returns its fused tokens
        and the extended cache. Identical to recomputing the whole stream from scratch."""
        n_l, n_s = self.resolve_counts(n_l, n_s)
        if len(question_ids) != len(first) or len(first) != cache.cu_seqlens.numel() - 1:
            raise ValueError("fuse_next needs one question and one `first` flag per cached sample")
        groups = [[self.group_ids(q, first=f, n_l=n_l, n_s=n_s)] for q, f in zip(question_ids, first)]
        sizes = [[n_l if f else n_s] for f in first]
        emb, cu, _ = self._embed_stream(None, groups, self.device)
        hidden, new_cache = self.decoder(emb, cu, cache=cache, use_cache=True)
        out_mask, is_eos = self._output_mask(groups, sizes, [0] * len(groups), self.device)
        return self._finish(hidden[out_mask], sizes, is_eos, project), new_cache
