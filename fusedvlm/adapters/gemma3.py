"""Adapter for Hugging Face ``Gemma3ForConditionalGeneration`` (Gemma 3 with its SigLIP tower).

The image processor returns ``pixel_values`` (views, 3, 896, 896) and ``num_crops`` (images,):
each image's whole view, then, with ``do_pan_and_scan=True``, its ``num_crops`` pan-and-scan
crops (0 when the image is not elongated enough or pan-and-scan is off), image after image.
``model.get_image_features`` runs SigLIP (a 64x64 patch grid) and ``multi_modal_projector`` (4x4
average pooling, RMSNorm, Linear into the LLM width) on every view: ``mm_tokens_per_image`` =
256 tokens per view, a 16x16 raster grid. Those are the features handed over, one segment per
image holding its 1 + num_crops views, so the fusion module reads the crops as more views of
their image (as Idefics3's tiles). The host's prompt gives each view its own block ("Here is
the original image {view} and here are some crops to help you see better {crop} {crop}"); the
fused tokens of a question are one block drawn from all the views, so that per-crop text has
nothing to name and is not written: an image with crops gets the same prompt as one without.
Each block sits between the ids the host's processor puts around an image's tokens,
``<start_of_image>`` and ``<end_of_image>`` (``config.boi_token_index`` / ``eoi_token_index``;
the processor's blank lines around them are not written). Gemma 3 lets the image tokens of one
image attend to each other both ways when ``token_type_ids`` marks them; the adapter passes none,
so the fused tokens are causal like text (in a cached multi-turn chat that mask would have to
cover the cached turns too). The prompt is the tokenizer's own chat template.

Gemma 3's ``prepare_inputs_for_generation`` does not forward ``inputs_embeds`` (transformers
5.x), so ``generate`` refuses them: the adapter runs the host's forward over the fused prompt
but its last token (always text: the generation prompt) with ``use_cache=True`` and hands that
KV cache to ``host.generate``, which embeds the last token itself and decodes as usual.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusedvlm.adapters.base import FusionAdapter, PromptFormat, VisionFeatures, require_host_parts, run_frozen
from fusedvlm.packing import cu_seqlens_from_lengths


class Gemma3FusionAdapter(FusionAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    default_prompt = PromptFormat(template=None)
    vision_inputs = ("pixel_values", "num_crops")

    @classmethod
    def check_host(cls, host: nn.Module) -> None:
        require_host_parts(
            host,
            cls.family,
            config=(
                "text_config",
                "vision_config",
                "image_token_id",
                "mm_tokens_per_image",
                "boi_token_index",
                "eoi_token_index",
            ),
            modules=("model.vision_tower", "model.multi_modal_projector"),
            methods=("get_image_features",),
        )
        side = math.isqrt(host.config.mm_tokens_per_image)
        if side * side != host.config.mm_tokens_per_image:
            raise ValueError(
                f"{type(host).__name__} is not a gemma3 host: mm_tokens_per_image "
                f"{host.config.mm_tokens_per_image} is not a square grid"
            )

    @classmethod
    def host_fused_markers(cls, host: nn.Module) -> tuple[list[int], list[int]]:
        return [int(host.config.boi_token_index)], [int(host.config.eoi_token_index)]

    @classmethod
    def host_vision_layout(cls, host: nn.Module) -> tuple[int, tuple[int, int] | None]:
        side = math.isqrt(host.config.mm_tokens_per_image)
        return cls.host_llm_width(host), (side, side)

    def host_generate(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs
    ) -> torch.Tensor:
        if (input_ids[:, -1] == self.image_token_id).any():
            raise ValueError("the prompt ends in an image placeholder; build it with prepare_inputs")
        mask = attention_mask[:, :-1]
        positions = self.host_positions(input_ids[:, :-1], mask)
        prefill = self.host(
            inputs_embeds=embeds[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        return self.host.generate(
            input_ids=input_ids, attention_mask=attention_mask, cache=prefill.cache, **generate_kwargs
        )

    @classmethod
    def count_images(cls, pixel_values: torch.Tensor, num_crops: torch.Tensor) -> int:
        return len(cls._views_per_image(pixel_values, num_crops))

    @staticmethod
    def _views_per_image(pixel_values: torch.Tensor, num_crops: torch.Tensor) -> list[int]:
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (views, 3, H, W), got shape {tuple(pixel_values.shape)}")
        views = [1 + int(c) for c in torch.as_tensor(num_crops).reshape(-1).tolist()]
        if sum(views) != pixel_values.shape[0] or min(views, default=0) < 1:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} views but num_crops {[v - 1 for v in views]} makes "
                f"{sum(views)} (each image's whole view, then its pan-and-scan crops)"
            )
        return views

    def vision_features(self, pixel_values: torch.Tensor, num_crops: torch.Tensor) -> VisionFeatures:
        views = self._views_per_image(pixel_values, num_crops)
        model = self.host.model
        ref = next(model.vision_tower.parameters())
        with run_frozen(model):
            feats = model.get_image_features(pixel_values.to(ref.device, ref.dtype)).pooler_output
        _, n, c = feats.shape
        return VisionFeatures(
            feats.reshape(-1, c), cu_seqlens_from_lengths([v * n for v in views], device=feats.device)
        )
