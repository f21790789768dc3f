"""Adapter for Hugging Face ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision, AnyRes).

Its image processor returns, per image, a base view plus the tiles of the best-fitting
resolution in ``image_grid_pinpoints`` as ``pixel_values`` (images, max views, 3, S, S) (rows
padded to the longest) and ``image_sizes`` (images, 2). The host's ``get_image_features``
encodes every view, applies ``multi_modal_projector`` and then packs the views (unpadding,
a newline token per row, bilinear downsampling past ``anyres_max_9``), which is no longer a
grid. The adapter stops before that packing: the tower's ``vision_feature_layer`` features of
each view (CLS dropped under the ``default`` strategy of a CLIP tower) through the projector,
one (S/patch)^2 raster grid per view, e.g. 27x27 = 729 tokens per 384-px SigLIP view. The
prompt is the tokenizer's own chat template (Qwen2's ChatML for the released models).
"""

from __future__ import annotations

import torch
from torch import nn

from fusedvlm.adapters.base import FusionAdapter, PromptFormat, VisionFeatures, require_host_parts, run_frozen
from fusedvlm.packing import cu_seqlens_from_lengths


def _has_cls(host: nn.Module) -> bool:
    return host.config.vision_config.model_type == "clip_vision_model"


class LlavaOnevisionFusionAdapter(FusionAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    default_prompt = PromptFormat(template=None)
    vision_inputs = ("pixel_values", "image_sizes")

    @classmethod
    def check_host(cls, host: nn.Module) -> None:
        require_host_parts(
            host,
            cls.family,
            config=(
                "text_config",
                "vision_config",
                "image_token_id",
                "image_grid_pinpoints",
                "vision_feature_layer",
                "vision_feature_select_strategy",
            ),
            modules=("model.vision_tower", "model.multi_modal_projector"),
        )

    @classmethod
    def host_vision_layout(cls, host: nn.Module) -> tuple[int, tuple[int, int] | None]:
        cfg = host.config
        if _has_cls(host) and cfg.vision_feature_select_strategy == "full":
            return cls.host_llm_width(host), None  # CLS kept in front of the patches: not a grid
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return cls.host_llm_width(host), (side, side)

    def vision_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionFeatures:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be (images, views, 3, H, W), got shape {tuple(pixel_values.shape)}")
        if image_sizes.shape != (pixel_values.shape[0], 2):
            raise ValueError(
                f"image_sizes must be ({pixel_values.shape[0]}, 2) for {pixel_values.shape[0]} images, "
                f"got shape {tuple(image_sizes.shape)}"
            )
        cfg = self.host.config
        views = [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in image_sizes.tolist()
        ]
        if max(views) > pixel_values.shape[1]:
            raise ValueError(
                f"image_sizes {image_sizes.tolist()} need up to {max(views)} views, pixel_values has "
                f"{pixel_values.shape[1]}"
            )
        model = self.host.model
        tower = model.vision_tower
        ref = next(tower.parameters())
        tiles = torch.cat([pv[:n] for pv, n in zip(pixel_values, views)]).to(ref.device, ref.dtype)
        with run_frozen(model):
            out = tower(tiles, output_hidden_states=True)
            layers = cfg.vision_feature_layer
            states = torch.cat(
                [out.hidden_states[layer] for layer in ([layers] if isinstance(layers, int) else layers)], dim=-1
            )
            if cfg.vision_feature_select_strategy == "default" and _has_cls(self.host):
                states = states[:, 1:]
            feats = model.multi_modal_projector(states)
        per_view = feats.shape[1]
        return VisionFeatures(
            feats.reshape(-1, feats.shape[-1]),
            cu_seqlens_from_lengths([n * per_view for n in views], device=feats.device),
        )
