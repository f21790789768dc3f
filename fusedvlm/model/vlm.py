"""The whole model (SPEC section 1): HD-N views -> CLIP ViT -> LayerNorm -> fusion module
(local merge + LF, learnable queries, fusion decoder, projection) -> frozen LLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fusedvlm.chat import ChatLayout, Tokens
from fusedvlm.config import ModelConfig, get_preset
from fusedvlm.model.fusion import FusionCache
from fusedvlm.model.fusion_module import FusedTokens, FusionModule, VisionPrefix
from fusedvlm.model.llm import load_llm
from fusedvlm.model.vision import VisionTower


class FusedVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: nn.Module | None = None, tokenizer=None, *, load_language_model: bool = True):
        super().__init__()
        self.cfg = cfg
        if llm is None and load_language_model:
            llm, tokenizer = load_llm(cfg.llm)
        d_llm = llm.get_input_embeddings().weight.shape[1] if llm is not None else cfg.llm.hidden_size
        self.vision = VisionTower(cfg.vision)
        self.fuser = FusionModule(cfg.fusion_module(d_llm))
        self.llm = llm
        self.tokenizer = tokenizer
        self.layout = ChatLayout(cfg.llm.chat_template, tokenizer, cfg.llm.system_prompt) if tokenizer is not None else None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FusedVLM":
        return cls(get_preset(name, **overrides))

    # ------------------------------------------------------------------ parameters
    def trainable_named_parameters(self):
        """Everything but the frozen LLM."""
        for name, p in self.named_parameters():
            if not name.startswith("llm."):
                yield name, p

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.llm is not None:
            self.llm.eval()  # frozen: no dropout, whatever the caller does
        return self

    @property
    def device(self) -> torch.device:
        return self.fuser.device

    # ------------------------------------------------------------------ delegated to the fusion module
    def question_ids(self, question: str) -> list[int]:
        return self.fuser.question_ids(question)

    def num_fused(self, num_questions: int, n_l: int | None = None, n_s: int | None = None) -> int:
        return self.fuser.num_fused(num_questions, n_l, n_s)

    def fuse(self, vision: VisionPrefix, question_ids: list[list[list[int]]], **kw) -> FusedTokens:
        return self.fuser.fuse(vision, question_ids, **kw)

    def prefix_cache(self, vision: VisionPrefix) -> FusionCache:
        return self.fuser.prefix_cache(vision)

    def fuse_next(self, cache: FusionCache, question_ids: list[list[int]], first: list[bool], **kw):
        return self.fuser.fuse_next(cache, question_ids, first, **kw)

    # ------------------------------------------------------------------ vision
    def preprocess(self, images: Sequence) -> tuple[torch.Tensor, list[int]]:
        from fusedvlm.preprocess import hd_views_batch

        return hd_views_batch(images, hd_num=self.cfg.hd_num, size=self.cfg.view_size)

    def encode_views(self, views: torch.Tensor, num_views: list[int]) -> VisionPrefix:
        """(sum V_i, 3, S, S) -> packed vision prefixes (sum V_i * tpv, C)."""
        return self.fuser.merge_views(self.vision(views), num_views)

    def encode_images(self, images: Sequence) -> VisionPrefix:
        views, counts = self.preprocess(images)
        return self.encode_views(views, counts)

    # ------------------------------------------------------------------ LLM decoding
    def decode_engine(self, decode: str = "auto", compile: bool | None = None):
        """The LLM's decode engine (fusedvlm.decoding), built once per (path, compile) and kept, so
        that its compiled steps serve every later chat; rebuilt if the LLM moved device or dtype."""
        from fusedvlm.decoding import compile_default, make_engine

        compile = compile_default() if compile is None else compile
        weight = self.llm.get_input_embeddings().weight
        key = (decode, compile, weight.device, weight.dtype)
        engines = self.__dict__.setdefault("_decode_engines", {})
        if key not in engines:
            engines[key] = make_engine(self.llm, decode, compile)
        return engines[key]

    # ------------------------------------------------------------------ LLM inputs
    def llm_embeds(self, tokens: Tokens, fused: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """(L,) template ids with fused slots -> (L, d_llm) input embeddings; the fused rows
        are put in order into the slots, and their number must match exactly. ``past_length``
        tokens already sit in the LLM's cache before these."""
        if tokens.num_fused != fused.shape[0]:
            raise ValueError(f"the prompt has {tokens.num_fused} fused slots but {fused.shape[0]} fused tokens were given")
        max_len = getattr(self.llm.config, "max_position_embeddings", None)
        if max_len is not None and past_length + len(tokens) > max_len:
            raise ValueError(
                f"the conversation needs {past_length + len(tokens)} LLM positions ({tokens.num_fused} fused in this "
                f"turn), more than the LLM's context of {max_len}"
            )
        embed = self.llm.get_input_embeddings()
        ids = torch.tensor(tokens.ids, dtype=torch.long, device=embed.weight.device)
        mask = torch.tensor(tokens.fused, dtype=torch.bool, device=ids.device)
        emb = embed(ids)
        return emb.masked_scatter(mask[:, None], fused.to(emb.dtype))
