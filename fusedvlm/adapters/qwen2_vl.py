"""Adapter for Hugging Face ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

Both share one vision contract in transformers 5.x: the image processor packs each image's
14-px patches (pairs of frames, ``temporal_patch_size``) into ``pixel_values`` (sum of patches,
C*T*P*P) with ``image_grid_thw`` (images, 3) giving each image's (t, h, w) patch grid, and
``model.get_image_features`` returns, per image, the tokens of its patch merger: one per 2x2
patch block, LLM-wide, in raster order over an (h/2, w/2) grid. Those are the features handed
over (the merger is the last block of Qwen's vision tower, and its input is in the tower's
window-permuted order, so its output is the first raster grid the host exposes). The grid
follows each image's size, so the fusion module merges every image on its own grid.

The prompt is the tokenizer's own chat template (ChatML) with the host's markers around each
run of fused tokens, ``<|vision_start|>`` ... ``<|vision_end|>`` (the ids of
``config.vision_start_token_id``/``vision_end_token_id``), where the host's chat template writes
``<|vision_start|><|image_pad|><|vision_end|>`` and its processor repeats ``<|image_pad|>``: right
after the user header, before the question. Several images of one conversation give one fused
block, so one pair of markers.

M-RoPE positions come from the host's own ``model.get_rope_index``, which gives an image
block of (h, w) merged tokens starting at position p the ids (t, h, w) = (p, p + row, p + col)
and the text after it positions from p + max(h, w). The fused tokens are an ordered sequence,
not a spatial grid, so each fused block is handed to it as a 1 x n image: (p, p, p + j) for
its j-th token, and the text after it continues at p + n, its own index, as if the block were
text. ``forward`` and ``generate`` both take these position ids from the adapter
(:meth:`host_positions`), so they never depend on the ``rope_deltas`` the host caches from an
earlier native call.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from fusedvlm.adapters.base import FusionAdapter, PromptFormat, VisionFeatures, require_host_parts, run_frozen
from fusedvlm.packing import cu_seqlens_from_lengths


class Qwen2VLFusionAdapter(FusionAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    default_prompt = PromptFormat(template=None)
    vision_inputs = ("pixel_values", "image_grid_thw")
    dynamic_grid = True

    @classmethod
    def check_host(cls, host: nn.Module) -> None:
        require_host_parts(
            host,
            cls.family,
            config=("text_config", "vision_config", "image_token_id", "vision_start_token_id", "vision_end_token_id"),
            modules=("model.visual",),
            methods=("get_image_features",),
        )

    @classmethod
    def host_vision_layout(cls, host: nn.Module) -> tuple[int, tuple[int, int] | None]:
        return cls.host_llm_width(host), None

    @classmethod
    def host_fused_markers(cls, host: nn.Module) -> tuple[list[int], list[int]]:
        return [int(host.config.vision_start_token_id)], [int(host.config.vision_end_token_id)]

    def host_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(3, B, L) M-RoPE ids from the host's ``get_rope_index``, every run of fused tokens a
        1 x n image (see the module doc); padding gets 0, as the host gives it."""
        fused = (input_ids == self.image_token_id) & attention_mask.bool()
        m = self.host.config.vision_config.spatial_merge_size
        runs = [len(list(g)) for row in fused.tolist() for key, g in itertools.groupby(row) if key]
        grid = torch.tensor([[1, m, m * n] for n in runs], dtype=torch.long, device=input_ids.device)
        positions, _ = self.host.model.get_rope_index(
            input_ids,
            mm_token_type_ids=fused.int(),
            image_grid_thw=grid if runs else None,
            attention_mask=attention_mask,
        )
        return positions

    @classmethod
    def count_images(cls, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> int:
        return image_grid_thw.shape[0]

    def vision_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be (images, 3), got shape {tuple(image_grid_thw.shape)}")
        if (image_grid_thw[:, 0] != 1).any():
            raise ValueError(
                f"image_grid_thw has temporal sizes {image_grid_thw[:, 0].tolist()}: the adapter takes images "
                "(t = 1), not videos"
            )
        visual = self.host.model.visual
        m = visual.spatial_merge_size
        if (image_grid_thw[:, 1:] % m != 0).any():
            raise ValueError(f"image_grid_thw {image_grid_thw.tolist()} is not a multiple of the {m}x{m} merge")
        ref = next(visual.parameters())
        with run_frozen(visual):
            out = self.host.model.get_image_features(pixel_values.to(ref.device, ref.dtype), image_grid_thw)
        grids = [(h // m, w // m) for h, w in image_grid_thw[:, 1:].tolist()]
        feats = torch.cat(out.pooler_output)
        return VisionFeatures(feats, cu_seqlens_from_lengths([h * w for h, w in grids], device=feats.device), grids)
