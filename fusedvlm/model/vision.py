"""Vision encoder (design §3): open_clip ViT patch tokens -> new LayerNorm.

views (V, 3, S, S) -> CLIP ViT last-layer patch tokens (V, g*g, C) (CLS dropped, CLIP's own
final LayerNorm and projection unused) -> LayerNorm (trainable, new). The local merge that
follows belongs to the fusion module (fusedvlm.model.fusion_module).
"""

from __future__ import annotations

import torch
from torch import nn

from fusedvlm.config import VisionConfig


def build_clip_vision_tower(cfg: VisionConfig) -> nn.Module:
    """An open_clip VisionTransformer, random init, optionally loaded from a local checkpoint."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if cfg.model_name is not None:
        import open_clip

        model_cfg = open_clip.get_model_config(cfg.model_name)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config named {cfg.model_name!r}")
        vcfg = dict(model_cfg["vision_cfg"])
        if vcfg.get("timm_model_name"):
            raise ValueError(f"{cfg.model_name!r} is a timm tower; fusedvlm needs an open_clip ViT")
        vision_cfg = CLIPVisionCfg(**vcfg)
        embed_dim = model_cfg["embed_dim"]
        quick_gelu = model_cfg.get("quick_gelu", False) if cfg.quick_gelu is None else cfg.quick_gelu
    else:
        vision_cfg = CLIPVisionCfg(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.width,
            layers=cfg.layers,
            head_width=cfg.width // cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
        )
        embed_dim, quick_gelu = cfg.width, bool(cfg.quick_gelu)
    tower = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
    if tower.positional_embedding.shape[0] != cfg.grid**2 + 1 or tower.conv1.out_channels != cfg.width:
        raise ValueError(
            f"open_clip tower {cfg.model_name!r} has {tower.positional_embedding.shape[0] - 1} patches of width "
            f"{tower.conv1.out_channels}; the config says {cfg.grid**2} of width {cfg.width}"
        )
    if cfg.checkpoint:
        load_clip_vision_checkpoint(tower, cfg.checkpoint)
    return tower


def load_clip_vision_checkpoint(tower: nn.Module, path: str) -> None:
    """Load a full open_clip CLIP state dict (``visual.*`` keys) or a visual-only one."""
    from fusedvlm.checkpoint import read_state_dict

    state = read_state_dict(path, "vision checkpoint")
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"vision checkpoint {path} does not match the tower: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.clip = build_clip_vision_tower(cfg)
        self.ln = nn.LayerNorm(cfg.width)

    def patch_tokens(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) -> (V, g*g, C): the last layer's patch tokens, CLS dropped."""
        clip = self.clip
        s = self.cfg.image_size
        if views.dim() != 4 or views.shape[1:] != (3, s, s):
            raise ValueError(f"views must be (V, 3, {s}, {s}), got {tuple(views.shape)}")
        x = clip.conv1(views.to(device=clip.conv1.weight.device, dtype=clip.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = clip.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + clip.positional_embedding.to(x.dtype)
        x = clip.ln_pre(x)
        if getattr(clip.transformer, "batch_first", True):
            x = clip.transformer(x)
        else:
            x = clip.transformer(x.transpose(0, 1)).transpose(0, 1)
        return x[:, 1:]

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) -> (V, g*g, C): patch tokens after the new LayerNorm."""
        if views.shape[0] == 0:
            raise ValueError("no views to encode")
        return self.ln(self.patch_tokens(views))
