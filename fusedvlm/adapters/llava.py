"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (LLaVA-1.5 and friends).

What is used of the host (both the transformers 4.x layout, with ``vision_tower`` on the
top-level model, and the 5.x one, under ``host.model``):

* the vision tower, called with ``output_hidden_states=True``; the features are the hidden
  states of ``config.vision_feature_layer`` (an int, or a list whose layers are concatenated),
  without the CLS token under ``vision_feature_select_strategy == "default"``: exactly what
  ``get_image_features`` feeds to ``multi_modal_projector``, which is bypassed;
* ``config.image_token_id`` (``image_token_index`` in older versions) as the placeholder id;
* ``config.text_config.hidden_size`` as the fusion output width.

For LLaVA-1.5 (CLIP ViT-L/14-336, penultimate layer, CLS dropped) the features are a 24x24
grid of 1024-wide tokens: the local merge turns them into 145 tokens per image and the LLM
sees n_l + (k - 1) * n_s fused tokens instead of 576 per image.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedvlm.adapters.base import FusionAdapter, PromptFormat, VisionFeatures
from fusedvlm.packing import cu_seqlens_from_lengths


def _vision_tower(host: nn.Module) -> nn.Module | None:
    tower = getattr(getattr(host, "model", None), "vision_tower", None)
    return tower if tower is not None else getattr(host, "vision_tower", None)


class LlavaFusionAdapter(FusionAdapter):
    family = "llava"
    model_types = ("llava",)
    default_prompt = PromptFormat()

    @classmethod
    def check_host(cls, host: nn.Module) -> None:
        cfg = getattr(host, "config", None)
        missing = [
            name
            for name in ("vision_config", "text_config", "vision_feature_layer", "vision_feature_select_strategy")
            if getattr(cfg, name, None) is None
        ]
        if missing:
            raise ValueError(f"{type(host).__name__} is not a LLaVA model: its config lacks {', '.join(missing)}")
        if _vision_tower(host) is None:
            raise ValueError(
                f"{type(host).__name__} has no vision_tower (looked at .model.vision_tower and .vision_tower)"
            )
        if not hasattr(host, "get_input_embeddings") or not hasattr(host, "generate"):
            raise ValueError(f"{type(host).__name__} lacks get_input_embeddings/generate of a Hugging Face causal LM")
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
        cls.host_image_token_id(host)

    @classmethod
    def host_vision_layout(cls, host: nn.Module) -> tuple[int, tuple[int, int] | None]:
        cfg = host.config
        layers = cfg.vision_feature_layer
        width = cfg.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
        if cfg.vision_feature_select_strategy == "full":
            return width, None  # CLS kept in front of the patches: not a grid
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return width, (side, side)

    @classmethod
    def host_image_token_id(cls, host: nn.Module) -> int:
        cfg = host.config
        token = getattr(cfg, "image_token_id", None)
        token = getattr(cfg, "image_token_index", None) if token is None else token
        if token is None:
            raise ValueError("the LLaVA config has neither image_token_id nor image_token_index")
        return int(token)

    def vision_features(self, pixel_values: torch.Tensor) -> VisionFeatures:
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        tower = _vision_tower(self.host)
        cfg = self.host.config
        ref = next(tower.parameters())
        # The frozen tower needs no graph; one unfrozen by the user gets its gradients.
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())):
            out = tower(pixel_values.to(ref.device, ref.dtype), output_hidden_states=True)
        layers = cfg.vision_feature_layer
        states = [out.hidden_states[layer] for layer in ([layers] if isinstance(layers, int) else layers)]
        if cfg.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        feats = torch.cat(states, dim=-1)
        b, n, c = feats.shape
        return VisionFeatures(feats.reshape(b * n, c), cu_seqlens_from_lengths([n] * b, device=feats.device))
