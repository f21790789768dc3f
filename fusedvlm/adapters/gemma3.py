"""Adapter for Hugging Face ``Gemma3ForConditionalGeneration`` (Gemma 3 with its SigLIP tower).

The image processor returns ``pixel_values`` (images, 3, 896, 896); ``model.get_image_features``
runs SigLIP (a 64x64 patch grid) and ``multi_modal_projector`` (4x4 average pooling, RMSNorm,
Linear into the LLM width): ``mm_tokens_per_image`` = 256 tokens per image, a 16x16 raster grid.
Those are the features handed over. Gemma 3 lets the image tokens of one image attend to each
other both ways when ``token_type_ids`` marks them; the adapter passes none, so the fused tokens
are causal like text (they are not a grid). Pan-and-scan crops are not supported: they arrive
as extra rows that the processor counts only in ``num_crops``. The prompt is the tokenizer's
own chat template.

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

    @classmethod
    def check_host(cls, host: nn.Module) -> None:
        require_host_parts(
            host,
            cls.family,
            config=("text_config", "vision_config", "image_token_id", "mm_tokens_per_image"),
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
    def host_vision_layout(cls, host: nn.Module) -> tuple[int, tuple[int, int] | None]:
        side = math.isqrt(host.config.mm_tokens_per_image)
        return cls.host_llm_width(host), (side, side)

    def host_generate(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs
    ) -> torch.Tensor:
        if (input_ids[:, -1] == self.image_token_id).any():
            raise ValueError("the prompt ends in an image placeholder; build it with prepare_inputs")
        mask = attention_mask[:, :-1]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        prefill = self.host(
            inputs_embeds=embeds[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        return self.host.generate(
            input_ids=input_ids, attention_mask=attention_mask, cache=prefill.cache, **generate_kwargs
        )

    def vision_features(self, pixel_values: torch.Tensor) -> VisionFeatures:
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (images, 3, H, W), got shape {tuple(pixel_values.shape)}")
        model = self.host.model
        ref = next(model.vision_tower.parameters())
        with run_frozen(model):
            feats = model.get_image_features(pixel_values.to(ref.device, ref.dtype)).pooler_output
        b, n, c = feats.shape
        return VisionFeatures(feats.reshape(b * n, c), cu_seqlens_from_lengths([n] * b, device=feats.device))
