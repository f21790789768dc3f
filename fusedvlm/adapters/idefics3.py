"""Adapter for Hugging Face ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``.

Their image processor splits each image into tiles of the encoder's size plus one downscaled
global view and returns ``pixel_values`` (B, N, 3, S, S), all the views of row i's images
(all-zero views pad rows to the longest), with ``pixel_attention_mask`` (B, N, S, S).
``model.get_image_features`` drops the padding views, encodes the rest (SigLIP) and applies the
connector (pixel shuffle by ``scale_factor`` + a Linear into the LLM width): per view an
(S/patch/scale)^2 raster grid, e.g. 8x8 = 64 tokens per 512-px view for SmolVLM-256M. Those
grids are the features handed over, one segment per row: a row's views are the "images" of the
fusion module (several images in one row simply bring more views). The prompt is the
tokenizer's own chat template. The host's processor writes an unsplit image as
``<fake_token_around_image><global-img>`` + its tokens + ``<fake_token_around_image>`` and a split
one as ``<fake_token_around_image><row_i_col_j>`` + tokens per tile, then that global form; the
fused tokens are not per view, so every run of them is written in the global (unsplit) form:
exactly the processor's prompt for an unsplit image when n_l equals its token count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusedvlm.adapters.base import FusionAdapter, PromptFormat, VisionFeatures, require_host_parts, run_frozen
from fusedvlm.packing import cu_seqlens_from_lengths


class Idefics3FusionAdapter(FusionAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    default_prompt = PromptFormat(template=None)
    vision_inputs = ("pixel_values", "pixel_attention_mask")

    @classmethod
    def check_host(cls, host: nn.Module) -> None:
        require_host_parts(
            host,
            cls.family,
            config=("text_config", "vision_config", "image_token_id", "scale_factor"),
            modules=("model.vision_model", "model.connector"),
            methods=("get_image_features",),
        )

    @classmethod
    def image_markers(cls, tokenizer) -> tuple[str, str]:
        # Where the tokenizer names them, as SmolVLMProcessor reads them; else Idefics3Processor's strings.
        fake = getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>"
        glob = getattr(tokenizer, "global_image_token", None) or "<global-img>"
        return fake + glob, fake

    @classmethod
    def host_vision_layout(cls, host: nn.Module) -> tuple[int, tuple[int, int] | None]:
        cfg = host.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor
        return cls.host_llm_width(host), (side, side)

    def vision_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> VisionFeatures:
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be (B, views, 3, H, W), got shape {tuple(pixel_values.shape)}")
        model = self.host.model
        ref = next(model.vision_model.parameters())
        with run_frozen(model.vision_model):
            out = model.get_image_features(pixel_values.to(ref.device, ref.dtype), pixel_attention_mask.to(ref.device))
        per_view = math.prod(self.grid) if self.grid else math.prod(self.host_vision_layout(self.host)[1])
        lengths = [f.shape[0] for f in out.pooler_output]
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"row {empty[0]} of pixel_values holds no image (all its views are zero padding)")
        if any(n % per_view for n in lengths):
            raise ValueError(f"the host made {lengths} tokens per row, not whole views of {per_view}")
        feats = torch.cat(out.pooler_output)
        return VisionFeatures(feats, cu_seqlens_from_lengths(lengths, device=feats.device))
