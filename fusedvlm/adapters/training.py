"""Stage-2 training of an adapter's fusion module with :class:`fusedvlm.train.loop.Trainer`.

The trainer takes an objective (``forward(batch)`` returns the micro-batch's summed loss; the
batch carries its target count, ``num_targets``), a dataset, a collator and a
:class:`~fusedvlm.train.loop.TrainConfig`; this module supplies the three for
a drop-in adapter::

    records, _ = read_records("data.json", "images/")          # LLaVA-style records
    dataset = AdapterDataset(records, adapter, processor.image_processor)
    collator = AdapterCollator(adapter, processor.tokenizer)
    Trainer(AdapterStage2Objective(adapter), dataset, collator, TrainConfig(steps=...), "runs/x").fit()
    adapter.save_pretrained("runs/x/fusion")

The loss is next-token cross-entropy on the answers and their closing EOS only (design §7);
the host stays frozen. Trainer checkpoints hold the fusion module only: the objective's state
dict leaves the host out, so a 7B host does not land in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fusedvlm.adapters.base import FusionAdapter
from fusedvlm.chat import IGNORE_INDEX
from fusedvlm.checkpoint import leave_frozen_out_of_state_dict
from fusedvlm.train.data import BatchCounts, Skipped


@dataclass
class AdapterItem:
    index: int
    vision: dict[str, torch.Tensor]  # the image processor's outputs for this one image (the family's vision_inputs)
    turns: tuple[tuple[str, str], ...]


def collate_vision(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One image's processor outputs each -> the batch's: zero-padded to the largest size on
    every dimension after the first, then concatenated along the first. Zero views are what the
    AnyRes and image-splitting processors pad with themselves, and packed layouts (Qwen's
    patches) already share every dimension after the first."""
    out = {}
    for key in items[0]:
        tensors = [it[key] for it in items]
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for t in tensors:
            pad = [p for d in reversed(range(1, t.dim())) for p in (0, shape[d - 1] - t.shape[d])]
            padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
        out[key] = torch.cat(padded)
    return out


@dataclass
class AdapterBatch(BatchCounts):
    """A micro-batch: ``inputs`` are :meth:`FusionAdapter.prepare_inputs`'s tensors (labels included)."""

    indices: list[int]
    inputs: dict[str, torch.Tensor]
    num_targets: int
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def llm_attention_mask(self) -> torch.Tensor | None:
        return self.inputs.get("attention_mask")

    @property
    def fusion_tokens(self) -> int:
        """Question tokens of the fusion stream."""
        return int(self.inputs["fusion_question_ids"].numel())


class AdapterDataset(torch.utils.data.Dataset):
    """Records (``fusedvlm.train.data.Record``: image path and (question, answer) turns) ->
    the host ``image_processor``'s outputs that the adapter's family takes (``vision_inputs``:
    pixel values and, e.g., Qwen's ``image_grid_thw``). Unreadable images and questions the
    fusion module rejects (empty, longer than max_question_tokens) come back as ``Skipped``,
    which the trainer reports with the record index."""

    def __init__(self, records, adapter: FusionAdapter, image_processor):
        self.records, self.image_processor = list(records), image_processor
        self.question_ids = adapter.fusion.question_ids
        self.vision_inputs = adapter.vision_inputs

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> AdapterItem | Skipped:
        from PIL import Image, UnidentifiedImageError

        from fusedvlm.preprocess import upright

        rec = self.records[i]
        try:
            for q, _ in rec.turns:
                self.question_ids(q)
            with Image.open(rec.image) as im:
                out = self.image_processor(images=upright(im, rec.image).convert("RGB"), return_tensors="pt")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return Skipped(rec.index, str(e))
        missing = [k for k in self.vision_inputs if k not in out]
        if missing:
            raise ValueError(f"the image processor returned no {', '.join(missing)}; is it the host's own?")
        return AdapterItem(rec.index, {k: out[k] for k in self.vision_inputs}, tuple(rec.turns))


class AdapterCollator:
    """Items -> :class:`AdapterBatch` through ``adapter.prepare_inputs`` (right padding)."""

    def __init__(self, adapter: FusionAdapter, tokenizer):
        self.adapter, self.tokenizer = adapter, tokenizer

    def __call__(self, items: list[AdapterItem | Skipped]) -> AdapterBatch:
        skipped = [it for it in items if isinstance(it, Skipped)]
        items = [it for it in items if isinstance(it, AdapterItem)]
        if not items:
            return AdapterBatch([], {}, 0, skipped)
        inputs = self.adapter.prepare_inputs(
            self.tokenizer,
            [it.turns for it in items],
            padding_side="right",
            **collate_vision([it.vision for it in items]),
        )
        targets = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        return AdapterBatch([it.index for it in items], inputs, targets, skipped)


class AdapterStage2Objective(nn.Module):
    """Summed answer cross-entropy; the trainer divides by the step's global target count
    (``AdapterBatch.num_targets``)."""

    def __init__(self, adapter: FusionAdapter):
        super().__init__()
        self.adapter = adapter
        leave_frozen_out_of_state_dict(self, "adapter.host")

    def forward(self, batch: AdapterBatch) -> torch.Tensor:
        device = self.adapter.fusion.device
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        labels = inputs.pop("labels")
        logits = self.adapter(**inputs).logits[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
