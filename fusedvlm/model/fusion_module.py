"""The fusion module: everything between vision tokens and the LLM (design §4-6).

It owns the local merge (+ LF token), the learnable queries, the fusion decoder and the
projection into the LLM width, and nothing model-specific: :class:`fusedvlm.model.FusedVLM`
puts a CLIP tower in front of it and a frozen causal LM behind it, and the drop-in adapters
put it inside other VLMs.

Token stream of one sample (design §5)::

    [V][Q1 text][P0 .. P(n_l-2)][EOS][Q2 text][P0 .. P(n_s-2)][EOS] ... [Qk text][P0 .. P(n_s-2)][EOS]

The outputs at the query and EOS positions of a group are its fused tokens: n_l for the
first question, n_s for every later one. Many samples run as one packed stream.

Standalone use (drop-in for other VLMs, see :mod:`fusedvlm.adapters`): :meth:`FusionModule.forward`
takes everything packed, flash-attn style, and nothing model-specific::

    vision_tokens (T_v, C_v)        every sample's vision tokens, back to back
    cu_seqlens_vision (n + 1,)      int32 offsets: sample i owns rows cu[i]:cu[i+1]
    question_ids (T_q,)             CLIP BPE ids of every question, back to back
    cu_seqlens_questions (Q + 1,)   int32 offsets: one segment per question
    questions_per_sample (n,)       how many consecutive questions belong to each sample
                                    (None: one question per sample, Q == n)

Questions are listed sample by sample, in conversation order. The result is a
:class:`FusedTokens` whose ``tokens`` are packed per sample (``cu_seqlens``), each sample's
block ordered [n_l fused tokens of its first question][n_s of the second]...: the order in
which they sit in front of the questions in the LLM prompt.

With ``merge=True`` a sample's vision tokens are one or more views, each a raster grid of
``grid=(H, W)`` tokens (config or call; without it each sample is one square view).
``input_size`` (off by default: the design's vision tower (§3) already has the fusion width and its
own LayerNorm) adds a LayerNorm + Linear from the host's vision width into the fusion width.

Checkpoints: :meth:`FusionModule.save_pretrained` writes ``config.json`` and
``model.safetensors``; :meth:`FusionModule.from_pretrained` rebuilds the module from them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fusedvlm.checkpoint import CONFIG_NAME, atomic_directory, check_state_dict, read_config_json, read_safetensors
from fusedvlm.clip_text import ClipText, clip_tokenizer
from fusedvlm.config import FusionModuleConfig, check_query_counts, n_s_for
from fusedvlm.kernels import local_merge
from fusedvlm.model.fusion import FusionCache, FusionDecoder
from fusedvlm.packing import check_cu_seqlens, cu_seqlens_from_lengths

WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_FORMAT = "fusedvlm.FusionModule"
CHECKPOINT_VERSION = 1


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
        return [self.tokens[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]


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

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(V, H*W, C) -> (V, ceil(H/2)*ceil(W/2) + 1, C); square grid unless ``grid=(H, W)``."""
        return local_merge(tokens, self.weight, self.lf_token, residual=True, grid=grid)


class InputProjection(nn.Module):
    """LayerNorm + Linear from a host VLM's vision features into the fusion width. The norm
    plays the part of the new LayerNorm after CLIP (design §3): hosts often hand over features of
    an inner layer (LLaVA: the penultimate), which no final LayerNorm has seen."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.linear = nn.Linear(input_size, hidden_size, bias=False)
        nn.init.normal_(self.linear.weight, std=input_size**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class FusionModule(nn.Module):
    def __init__(self, cfg: FusionModuleConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.fusion.hidden_size
        self.input_projection = InputProjection(cfg.input_size, c) if cfg.input_size is not None else None
        self.merge = LocalMerge(c) if cfg.merge else None
        self.decoder = FusionDecoder(cfg.fusion)
        self.projection = nn.Linear(c, cfg.output_size, bias=False)
        nn.init.normal_(self.projection.weight, std=c**-0.5)
        # Question tokenizer (a ClipText); None: OpenAI's CLIP vocabulary.
        self.text_tokenizer: ClipText | None = None

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    # ------------------------------------------------------------------ questions
    def question_ids(self, question: str) -> list[int]:
        """CLIP BPE ids of a question (no start/end token)."""
        return (self.text_tokenizer or clip_tokenizer()).question_ids(question, self.cfg.max_question_tokens)

    def group_ids(
        self, question_ids: Sequence[int], first: bool, n_l: int | None = None, n_s: int | None = None
    ) -> list[int]:
        """[question ids][P0 .. P(m-2)][EOS], m = n_l for the first question else n_s."""
        n_l, n_s = self.resolve_counts(n_l, n_s)
        m = n_l if first else n_s
        text = [] if self.cfg.drop_question else list(question_ids)
        return text + [self.cfg.fusion.query_token_id(i) for i in range(m - 1)] + [self.cfg.fusion.eos_token_id]

    def resolve_counts(self, n_l: int | None, n_s: int | None) -> tuple[int, int]:
        """(n_l, n_s) with the config's defaults filled in and the design §5 rule for n_s."""
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
    @property
    def vision_width(self) -> int:
        """The width of the vision tokens this module takes."""
        return self.cfg.input_size if self.cfg.input_size is not None else self.cfg.fusion.hidden_size

    def merge_views(
        self, patch_tokens: torch.Tensor, num_views: list[int], grid: tuple[int, int] | None = None
    ) -> VisionPrefix:
        """(sum V_i, H*W, C_v) patch tokens of every view -> packed vision prefixes.
        ``grid`` defaults to the config's (square when neither gives one)."""
        if self.input_projection is not None:
            patch_tokens = self.input_projection(patch_tokens)
        if self.merge is not None and patch_tokens.shape[0]:
            merged = self.merge(patch_tokens, grid if grid is not None else self.cfg.grid)
        else:
            merged = patch_tokens
        tpv = merged.shape[1]
        cu = cu_seqlens_from_lengths([v * tpv for v in num_views], device=merged.device)
        return VisionPrefix(merged.reshape(-1, merged.shape[-1]), cu, list(num_views))

    # ------------------------------------------------------------------ fusion
    def _embed_stream(
        self, vision: VisionPrefix | None, groups: list[list[list[int]]], device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    def _output_mask(
        self, groups: list[list[list[int]]], sizes: list[list[int]], v_lens: list[int], device
    ) -> tuple[torch.Tensor, torch.Tensor]:
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

    def fuse_single(
        self,
        cache: FusionCache,
        samples: Sequence[int],
        question_ids: Sequence[Sequence[int]],
        n_l: Sequence[int],
        project: bool = True,
    ) -> FusedTokens:
        """Many independent single-question streams over cached vision prefixes, in one pack.

        Entry j is ``[V_samples[j]][question_ids[j]][P0 .. P(n_l[j]-2)][EOS]``: the prefix of
        cached sample ``samples[j]`` (repeats allowed) followed by one first-question group with
        its own n_l. Every entry yields n_l[j] fused tokens, equal to :meth:`fuse` of that image
        and question alone; an evaluation sweep encodes each image once and asks all its
        (question, n_l) pairs here. ``cache`` is left unchanged."""
        if not (len(samples) == len(question_ids) == len(n_l)):
            raise ValueError(
                f"fuse_single needs one sample, question and n_l per entry, got "
                f"{len(samples)}, {len(question_ids)}, {len(n_l)}"
            )
        num_cached = cache.cu_seqlens.numel() - 1
        bad = [s for s in samples if not 0 <= s < num_cached]
        if bad:
            raise ValueError(f"sample {bad[0]} is not in the cache of {num_cached} samples")
        groups, sizes = [], []
        for q, m in zip(question_ids, n_l):
            m, _ = self.resolve_counts(int(m), None)
            groups.append([self.group_ids(q, first=True, n_l=m)])
            sizes.append([m])
        emb, cu, _ = self._embed_stream(None, groups, self.device)
        hidden, _ = self.decoder(emb, cu, cache=cache.select(list(samples)))
        out_mask, is_eos = self._output_mask(groups, sizes, [0] * len(groups), self.device)
        return self._finish(hidden[out_mask], sizes, is_eos, project)

    # ------------------------------------------------------------------ packed entry point
    def forward(
        self,
        vision_tokens: torch.Tensor,
        cu_seqlens_vision: torch.Tensor,
        question_ids: torch.Tensor,
        cu_seqlens_questions: torch.Tensor,
        questions_per_sample: Sequence[int] | torch.Tensor | None = None,
        *,
        n_l: int | None = None,
        n_s: int | None = None,
        grid: tuple[int, int] | None = None,
        project: bool = True,
    ) -> FusedTokens:
        """Packed vision tokens + packed questions -> packed fused tokens (module docstring).

        Sample i gets n_l + (k_i - 1) * n_s fused tokens for its k_i questions; ``tokens`` is
        (T_f, output_size) when ``project`` else None (``hidden`` is always there)."""
        vision = self.encode_vision(vision_tokens, cu_seqlens_vision, grid)
        n = vision.cu_seqlens.numel() - 1
        questions = self.split_questions(question_ids, cu_seqlens_questions, questions_per_sample, n)
        return self.fuse(vision, questions, n_l=n_l, n_s=n_s, project=project)

    def encode_vision(
        self, vision_tokens: torch.Tensor, cu_seqlens_vision: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> VisionPrefix:
        """Packed per-sample vision tokens (T_v, C_v) -> packed vision prefixes (input
        projection, then the local merge over each sample's views)."""
        if not isinstance(vision_tokens, torch.Tensor) or vision_tokens.dim() != 2:
            raise ValueError(
                f"vision_tokens must be (T_v, C_v), got shape {tuple(getattr(vision_tokens, 'shape', ()))}"
            )
        if vision_tokens.shape[1] != self.vision_width:
            hint = (
                ""
                if self.cfg.input_size is not None
                else " (set input_size in the config to project a different width)"
            )
            raise ValueError(
                f"vision_tokens have width {vision_tokens.shape[1]}, the fusion module takes {self.vision_width}{hint}"
            )
        check_cu_seqlens(cu_seqlens_vision, vision_tokens.shape[0], name="cu_seqlens_vision")
        lengths = cu_seqlens_vision.diff().tolist()
        if self.merge is None:
            tokens = self.input_projection(vision_tokens) if self.input_projection is not None else vision_tokens
            return VisionPrefix(tokens, cu_seqlens_vision.to(tokens.device), [1 if n else 0 for n in lengths])
        grid = grid if grid is not None else self.cfg.grid
        if grid is None:
            sides = {math.isqrt(n) for n in lengths if n}
            if len(sides) > 1 or any(math.isqrt(n) ** 2 != n for n in lengths):
                raise ValueError(
                    f"without grid=(H, W) every sample must be one square view of the same size; "
                    f"got vision lengths {lengths}"
                )
            side = sides.pop() if sides else 1
            grid = (side, side)
        per_view = grid[0] * grid[1]
        bad = [i for i, n in enumerate(lengths) if n % per_view]
        if bad:
            raise ValueError(
                f"sample {bad[0]} has {lengths[bad[0]]} vision tokens, not a whole number of {grid[0]}x{grid[1]} views"
            )
        views = vision_tokens.reshape(-1, per_view, vision_tokens.shape[1])
        return self.merge_views(views, [n // per_view for n in lengths], grid=grid)

    def split_questions(
        self,
        question_ids: torch.Tensor,
        cu_seqlens_questions: torch.Tensor,
        questions_per_sample: Sequence[int] | torch.Tensor | None,
        num_samples: int,
    ) -> list[list[list[int]]]:
        """Packed questions -> per sample, the CLIP ids of each of its questions."""
        if not isinstance(question_ids, torch.Tensor) or question_ids.dim() != 1:
            raise ValueError(
                f"question_ids must be a 1-D tensor (T_q,), got shape {tuple(getattr(question_ids, 'shape', ()))}"
            )
        if question_ids.dtype.is_floating_point or question_ids.dtype == torch.bool:
            raise ValueError(f"question_ids must be integer token ids, got {question_ids.dtype}")
        check_cu_seqlens(cu_seqlens_questions, question_ids.numel(), name="cu_seqlens_questions")
        ids = question_ids.tolist()
        vocab = self.cfg.fusion.text_vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(
                f"question_ids must be CLIP BPE ids in [0, {vocab}), got values in [{min(ids)}, {max(ids)}]"
            )
        cu = cu_seqlens_questions.tolist()
        questions = [ids[cu[j] : cu[j + 1]] for j in range(len(cu) - 1)]
        if questions_per_sample is None:
            counts = [1] * num_samples
        else:
            counts = [
                int(c)
                for c in (
                    questions_per_sample.tolist()
                    if isinstance(questions_per_sample, torch.Tensor)
                    else questions_per_sample
                )
            ]
        if len(counts) != num_samples:
            raise ValueError(f"questions_per_sample has {len(counts)} entries for {num_samples} samples")
        if any(c < 1 for c in counts):
            raise ValueError(f"every sample needs at least one question, got questions_per_sample={counts}")
        if sum(counts) != len(questions):
            raise ValueError(
                f"questions_per_sample sums to {sum(counts)} but cu_seqlens_questions holds {len(questions)} questions"
            )
        out, start = [], 0
        for c in counts:
            out.append(questions[start : start + c])
            start += c
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | os.PathLike, extra_json: dict[str, dict] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (and ``extra_json``: more JSON files by
        name) into directory ``path`` as one atomic switch of the whole directory
        (:func:`fusedvlm.checkpoint.atomic_directory`): a crash at any point leaves the old
        directory or the new one, never new weights beside an old config."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.cfg.to_dict()}
        with atomic_directory(path) as tmp:
            save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": CHECKPOINT_FORMAT})
            for name, payload in {CONFIG_NAME: meta, **(extra_json or {})}.items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(payload, f, indent=2)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> FusionModule:
        """Rebuild a module saved by :meth:`save_pretrained`; the weights keep their saved
        dtype unless ``dtype`` is given."""
        path = os.fspath(path)
        cfg = load_config(path)
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"fusion module checkpoint {path} has no {WEIGHTS_NAME}")
        with torch.device("meta"):
            module = cls(cfg)
        state = read_safetensors(weights, "fusion module weights", device=str(device))
        check_state_dict(module.state_dict(), state, weights)
        module.load_state_dict(state, assign=True)
        return module.to(dtype) if dtype is not None else module


def load_config(path: str | os.PathLike) -> FusionModuleConfig:
    """The :class:`FusionModuleConfig` of a checkpoint directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"fusion module checkpoint directory not found: {path}")
    config = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config):
        raise FileNotFoundError(f"fusion module checkpoint {path} has no {CONFIG_NAME}")
    return read_config_json(config, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, parse=FusionModuleConfig.from_dict)
