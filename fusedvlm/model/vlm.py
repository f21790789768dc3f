"""The whole model (design §1): HD-N views -> CLIP ViT -> LayerNorm -> fusion module
(local merge + LF, learnable queries, fusion decoder, projection) -> frozen LLM.

A model directory (:meth:`FusedVLM.save_pretrained`, ``fusedvlm convert-upstream``)::

    config.json         {"format": "fusedvlm.FusedVLM", "version": 1, "config": ModelConfig}
    model.safetensors   every tensor but the LLM's
    llm/                the LLM and its tokenizer (Hugging Face layout; config.llm.path = "llm")
    clip/               the question tokenizer's BPE tables (vocab.json, merges.txt), if not OpenAI's
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import nn

from fusedvlm.chat import ChatLayout, Tokens
from fusedvlm.checkpoint import drop_frozen
from fusedvlm.config import ModelConfig, get_preset
from fusedvlm.model.fusion import FusionCache
from fusedvlm.model.fusion_module import (
    CHECKPOINT_FORMAT as FUSION_MODULE_FORMAT,
)
from fusedvlm.model.fusion_module import (
    FusedTokens,
    FusionModule,
    VisionPrefix,
)
from fusedvlm.model.llm import llm_hidden_size, load_llm
from fusedvlm.model.vision import VisionTower

MODEL_FORMAT = "fusedvlm.FusedVLM"
MODEL_VERSION = 1


class FusedVLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, llm: nn.Module | None = None, tokenizer=None, *, load_language_model: bool = True
    ):
        super().__init__()
        self.cfg = cfg
        if llm is None and load_language_model:
            llm, tokenizer = load_llm(cfg.llm)
        if llm is not None:
            d_llm = llm.get_input_embeddings().weight.shape[1]
        else:
            # Without the LLM (stage 1) the projection still gets the width of the LLM it will feed.
            d_llm = llm_hidden_size(cfg.llm)
        self.vision = VisionTower(cfg.vision)
        self.fuser = FusionModule(cfg.fusion_module(d_llm))
        self.llm = llm
        self.tokenizer = tokenizer
        self.layout = (
            ChatLayout(cfg.llm.chat_template, tokenizer, cfg.llm.system_prompt) if tokenizer is not None else None
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> FusedVLM:
        return cls(get_preset(name, **overrides))

    # ------------------------------------------------------------------ parameters
    def trainable_named_parameters(self):
        """Everything but the frozen LLM."""
        for name, p in self.named_parameters():
            if not name.startswith("llm."):
                yield name, p

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return drop_frozen(self.state_dict(), "llm")

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

    def fuse_single(self, cache: FusionCache, samples, question_ids, n_l, **kw) -> FusedTokens:
        return self.fuser.fuse_single(cache, samples, question_ids, n_l, **kw)

    # ------------------------------------------------------------------ vision
    def preprocess(self, images: Sequence) -> tuple[torch.Tensor, list[int]]:
        from fusedvlm.preprocess import hd_views_batch

        cfg = self.cfg
        return hd_views_batch(
            images, hd_num=cfg.hd_num, size=cfg.view_size, global_view=cfg.global_view, alpha=cfg.alpha
        )

    def encode_views(self, views: torch.Tensor, num_views: list[int]) -> VisionPrefix:
        """(sum V_i, 3, S, S) -> packed vision prefixes (sum V_i * tpv, C)."""
        return self.fuser.merge_views(self.vision(views), num_views)

    def encode_images(self, images: Sequence) -> VisionPrefix:
        views, counts = self.preprocess(images)
        return self.encode_views(views, counts)

    # ------------------------------------------------------------------ LLM decoding
    def decode_engine(self, decode: str = "auto", compile: bool | None = None, fused: bool | None = None):
        """The LLM's decode engine (fusedvlm.decode.make_engine), built once per (path, compile,
        fused) and kept, so that its compiled steps serve every later chat; rebuilt if the LLM moved
        device or dtype."""
        from fusedvlm.decode import make_engine
        from fusedvlm.decode.engine import compile_default

        compile = compile_default() if compile is None else compile
        weight = self.llm.get_input_embeddings().weight
        key = (decode, compile, fused, weight.device, weight.dtype)
        engines = self.__dict__.setdefault("_decode_engines", {})
        if key not in engines:
            engines[key] = make_engine(self.llm, decode, compile, fused)
        return engines[key]

    # ------------------------------------------------------------------ LLM inputs
    def check_llm_context(self, positions: int, num_fused: int) -> None:
        """Refuse a prompt that needs more positions than the LLM has (``num_fused`` of them
        fused tokens of this turn)."""
        max_len = getattr(self.llm.config, "max_position_embeddings", None)
        if max_len is not None and positions > max_len:
            raise ValueError(
                f"the conversation needs {positions} LLM positions ({num_fused} fused in this "
                f"turn), more than the LLM's context of {max_len}"
            )

    def llm_embeds(self, tokens: Tokens, fused: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """(L,) template ids with fused slots -> (L, d_llm) input embeddings; the fused rows
        are put in order into the slots, and their number must match exactly. ``past_length``
        tokens already sit in the LLM's cache before these."""
        if tokens.num_fused != fused.shape[0]:
            raise ValueError(
                f"the prompt has {tokens.num_fused} fused slots but {fused.shape[0]} fused tokens were given"
            )
        self.check_llm_context(past_length + len(tokens), tokens.num_fused)
        embed = self.llm.get_input_embeddings()
        ids = torch.tensor(tokens.ids, dtype=torch.long, device=embed.weight.device)
        mask = torch.tensor(tokens.fused, dtype=torch.bool, device=ids.device)
        emb = embed(ids)
        return emb.masked_scatter(mask[:, None], fused.to(emb.dtype))

    # ------------------------------------------------------------------ model directories
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a model directory (see the module docstring); an existing one is replaced
        only once the new one is complete."""
        from dataclasses import replace

        from fusedvlm.checkpoint import atomic_directory

        with atomic_directory(path) as tmp:
            cfg = self.cfg
            if self.llm is not None:
                self.llm.save_pretrained(os.path.join(tmp, "llm"))
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(os.path.join(tmp, "llm"))
                cfg = replace(cfg, llm=replace(cfg.llm, source="pretrained", path="llm"))
            tok = self.fuser.text_tokenizer
            if tok is not None:
                from fusedvlm.clip_text import write_bpe

                model = json.loads(tok.hf.backend_tokenizer.to_str())["model"]
                write_bpe(
                    os.path.join(tmp, "clip"),
                    model["vocab"],
                    [m if isinstance(m, str) else " ".join(m) for m in model["merges"]],
                )
            write_model_dir(tmp, cfg, self.trainable_state_dict())

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        llm_dtype: torch.dtype | None = None,
    ) -> FusedVLM:
        """Load a model directory written by :meth:`save_pretrained` or ``convert-upstream`` on
        ``device``: floating weights in ``dtype`` (the LLM in ``llm_dtype``, default ``dtype``).
        The model is built without storage and filled one tensor at a time from the
        safetensors files (fusedvlm.weights), so loading needs about the model's own bytes in
        that dtype; on the CPU in the files' dtype the weights stay memory-mapped."""
        from dataclasses import replace

        from fusedvlm.clip_text import ClipText, load_clip_tokenizer
        from fusedvlm.weights import buffers_to, fill_module, iter_missing, open_entries, params_on_meta

        path = os.path.abspath(os.fspath(path))
        device = torch.device(device)
        cfg = read_model_config(path)
        weights = os.path.join(path, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"model directory {path} has no model.safetensors")
        entries = open_entries([weights])  # a corrupt file is refused before the LLM is read
        ints = [k for k, e in entries.items() if not e.dtype.is_floating_point]
        if ints:
            raise ValueError(
                f"{weights}: tensor {ints[0]} is {entries[ints[0]].dtype}; model weights must be floating point"
            )
        if cfg.llm.source == "pretrained" and cfg.llm.path and not os.path.isabs(cfg.llm.path):
            cfg = replace(cfg, llm=replace(cfg.llm, path=os.path.join(path, cfg.llm.path)))
        llm, tokenizer = load_llm(cfg.llm, device=device, dtype=llm_dtype or dtype)
        with params_on_meta():
            model = cls(cfg, llm=llm, tokenizer=tokenizer)
        trainable = nn.ModuleDict({"vision": model.vision, "fuser": model.fuser})
        fill_module(trainable, entries, device=device, dtype=dtype, what=weights)
        buffers_to(trainable, device)
        on_meta = list(iter_missing(model))
        if on_meta:
            raise ValueError(f"{weights} left tensors unset: {on_meta[:5]}")
        clip_dir = os.path.join(path, "clip")
        if os.path.isdir(clip_dir):
            model.fuser.text_tokenizer = ClipText(load_clip_tokenizer(clip_dir))
        return model.eval()


def write_model_dir(folder: str, cfg: ModelConfig, state: dict[str, torch.Tensor], source: dict | None = None) -> None:
    """config.json + model.safetensors of a model directory (the LLM is written apart)."""
    from fusedvlm.weights import write_safetensors

    write_safetensors(os.path.join(folder, "model.safetensors"), state, metadata={"format": MODEL_FORMAT})
    meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "config": cfg.to_dict()}
    if source:
        meta["source"] = source
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a model directory; an authors' directory gets a pointer to the converter."""
    from fusedvlm.checkpoint import is_upstream_checkpoint, read_config_json, remove_stale_temporaries

    if not os.path.lexists(path):
        # A save killed between the two renames of its fallback switch (no atomic exchange on
        # this file system) parked the previous directory beside it: put it back now rather
        # than at the next save.
        remove_stale_temporaries(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    if is_upstream_checkpoint(path):
        raise ValueError(
            f"{path} is a checkpoint of the authors' code (tensorfusionvlm); convert it first: "
            f"fusedvlm convert-upstream {path} OUT_DIR, then use OUT_DIR"
        )
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        weights = os.path.join(path, "model.safetensors")
        if os.path.isfile(weights):
            raise FileNotFoundError(
                f"{path} has no config.json, so it is not a model directory; "
                f"for the weights a training run wrote, pass the file {weights}"
            )
        raise FileNotFoundError(f"model directory {path} has no config.json")
    alone = (
        f"{path} is a save_pretrained directory of a FusionModule alone (FusionModule.from_pretrained "
        "reads it); a model directory comes from FusedVLM.save_pretrained or fusedvlm convert-upstream"
    )
    return read_config_json(config, MODEL_FORMAT, MODEL_VERSION, {FUSION_MODULE_FORMAT: alone}, ModelConfig.from_dict)
