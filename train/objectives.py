"""The two training stages. One big batch, gradient accumulation and DDP/FSDP all give the
same loss and gradients:

* :class:`Stage2Objective`: answer cross-entropy through the frozen LLM (design §7).
  ``forward(batch)`` returns the micro-batch's loss summed over its ``batch.num_targets``
  targets; the trainer divides by the global count (summed over micro-batches and ranks).
* :class:`Stage1Objective`: CLIP InfoNCE between each question group's EOS output and the
  text tower's embedding of its answer, plus the orthogonality term. A contrastive loss does
  not add up over micro-batches (every pair is a negative for every other), so its
  ``forward`` takes all of a step's micro-batches at once (``whole_step``) and gathers the
  embeddings of every rank, with gradients: the negatives are the whole global batch, as in
  one process with one batch. The price is that gradient accumulation saves no activation
  memory in stage 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fusedvlm.chat import IGNORE_INDEX
from fusedvlm.checkpoint import leave_frozen_out_of_state_dict
from fusedvlm.train.config import Stage1Config
from fusedvlm.train.data import Batch
from fusedvlm.train.distributed import DistContext, all_reduce_sum, gather_rows
from fusedvlm.train.losses import clip_infonce, init_logit_scale, orthogonality_terms

TEXT_CONTEXT = 512  # design §7: CLIP text positions extended from 77
CLIP_CONTEXT = 77
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the inverse temperature


def _freeze_unused_clip_parts(model) -> None:
    """The vision tower uses the last layer's patch tokens only: CLIP's own final LayerNorm
    and projection never see a gradient, and DDP (without find_unused_parameters) and the
    optimiser must not wait for or carry them."""
    clip = model.vision.clip
    for name in ("ln_post", "proj", "attn_pool", "attn_pool_contrastive", "ln_post_contrastive"):
        part = getattr(clip, name, None)
        if isinstance(part, nn.Module):
            part.requires_grad_(False)
        elif isinstance(part, nn.Parameter):
            part.requires_grad_(False)


class Stage2Objective(nn.Module):
    def __init__(self, model, n_l: int | None = None, n_s: int | None = None, freeze_vision: bool = False):
        super().__init__()
        if model.llm is None:
            raise ValueError("stage 2 needs the model's LLM")
        self.model = model
        leave_frozen_out_of_state_dict(self, "model.llm")
        self.n_l, self.n_s = model.fuser.resolve_counts(n_l, n_s)
        model.llm.requires_grad_(False)
        _freeze_unused_clip_parts(model)
        if freeze_vision:
            model.vision.clip.requires_grad_(False)

    def forward(self, batch: Batch) -> torch.Tensor:
        model = self.model
        device = model.device
        vision = model.encode_views(batch.views.to(device), batch.num_views)
        fused = model.fuse(vision, batch.question_ids, n_l=self.n_l, n_s=self.n_s)
        llm = model.llm
        ids = batch.llm_ids.to(device)
        fused_mask = batch.llm_fused.to(device)
        if int(fused_mask.sum()) != fused.tokens.shape[0]:
            raise ValueError(
                f"the LLM batch has {int(fused_mask.sum())} fused slots but the fusion gave {fused.tokens.shape[0]}"
            )
        emb = llm.get_input_embeddings()(ids)
        emb = emb.masked_scatter(fused_mask[..., None], fused.tokens.to(emb.dtype))
        # Only labelled positions go through the LM head: (B, L, vocab) logits would dominate
        # memory for a 32k vocabulary.
        hidden = llm.base_model(inputs_embeds=emb, attention_mask=batch.llm_attention_mask.to(device)).last_hidden_state
        targets = batch.llm_labels.to(device)[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = llm.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def build_text_tower(
    embed_dim: int, width: int, layers: int, heads: int, model_name: str | None = None, checkpoint: str | None = None
) -> nn.Module:
    """An open_clip text transformer (random init, or a named open_clip config, optionally
    loaded from a local open_clip checkpoint) with its position table extended to 512."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    if model_name is not None:
        import open_clip

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config named {model_name!r}")
        text_cfg = CLIPTextCfg(**model_cfg["text_cfg"])
        if text_cfg.hf_model_name:
            raise ValueError(
                f"{model_name!r} has a Hugging Face text tower; stage 1 needs an open_clip TextTransformer"
            )
        tower_dim = model_cfg["embed_dim"]
        quick_gelu = model_cfg.get("quick_gelu", False)
    else:
        if width % heads:
            raise ValueError(f"text width {width} is not a multiple of its {heads} heads")
        text_cfg = CLIPTextCfg(context_length=CLIP_CONTEXT, width=width, layers=layers, heads=heads)
        tower_dim, quick_gelu = embed_dim, False
    if tower_dim != embed_dim:
        raise ValueError(f"text tower {model_name!r} embeds into {tower_dim} dimensions, not --embed-dim {embed_dim}")
    text = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
    if checkpoint:
        load_text_checkpoint(text, checkpoint)
    extend_positions(text, TEXT_CONTEXT)
    # open_clip applies its full context x context causal mask unless the pad mask is on, so
    # every text would have to be padded to 512 tokens. With it on, the causal mask is cut to
    # the batch's length and pad keys are masked: the EOT output is the same (pads follow EOT).
    text.use_pad_mask = True
    return text


def load_text_checkpoint(text: nn.Module, path: str) -> None:
    """A full open_clip CLIP state dict: the text tower's keys sit at the top level."""
    from fusedvlm.checkpoint import read_state_dict

    state = read_state_dict(path, "text checkpoint")
    wanted = set(text.state_dict())
    picked = {k: v for k, v in state.items() if k in wanted}
    missing = sorted(wanted - set(picked) - {"attn_mask"})
    if missing:
        raise ValueError(f"text checkpoint {path} lacks {missing[:8]}")
    text.load_state_dict(picked, strict=False)


@torch.no_grad()
def extend_positions(text: nn.Module, context: int, generator: torch.Generator | None = None) -> None:
    """Grow the position table to ``context`` rows; the new rows are drawn from the normal
    distribution with the old rows' per-dimension mean and standard deviation."""
    old = text.positional_embedding
    n, width = old.shape
    if context < n:
        raise ValueError(f"cannot shrink the text position table from {n} to {context}")
    mean, std = old.mean(0), old.std(0)
    new = torch.randn(context - n, width, generator=generator, dtype=old.dtype) * std + mean
    text.positional_embedding = nn.Parameter(torch.cat([old.detach(), new]))
    text.num_pos = text.context_length = context
    if getattr(text, "attn_mask", None) is not None:
        text.attn_mask = text.build_causal_mask()


class Stage1Objective(nn.Module):
    def __init__(
        self,
        model,
        text: nn.Module,
        embed_dim: int = Stage1Config.embed_dim,
        temperature: float = Stage1Config.temperature,
        orthogonality_weight: float = Stage1Config.orthogonality_weight,
        n_l: int | None = None,
        n_s: int | None = None,
        freeze_vision: bool = False,
    ):
        super().__init__()
        self.model = model
        leave_frozen_out_of_state_dict(self, "model.llm")
        self.text = text
        self.n_l, self.n_s = model.fuser.resolve_counts(n_l, n_s)
        self.head = nn.Linear(model.cfg.fusion.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.head.weight, std=model.cfg.fusion.hidden_size**-0.5)
        self.logit_scale = nn.Parameter(init_logit_scale(temperature))
        self.orthogonality_weight = orthogonality_weight
        # Stage 1 aligns fusion outputs with text; the LLM projection is stage 2's.
        model.fuser.projection.requires_grad_(False)
        if model.llm is not None:
            model.llm.requires_grad_(False)
        _freeze_unused_clip_parts(model)
        if freeze_vision:
            model.vision.clip.requires_grad_(False)

    whole_step = True  # the trainer passes all of a step's micro-batches to one forward

    def forward(self, micro_batches: Batch | list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (what to backpropagate, the step's loss). The loss is InfoNCE over every pair of
        the step on every rank plus the orthogonality term averaged over every group; what to
        backpropagate carries the ``world`` factor that DDP's gradient averaging removes."""
        if isinstance(micro_batches, Batch):
            micro_batches = [micro_batches]
        model = self.model
        device = model.device
        ctx = _dist_context(device)
        images, texts = [], []
        orth_sum, groups = torch.zeros((), device=device), 0
        for batch in micro_batches:
            vision = model.encode_views(batch.views.to(device), batch.num_views)
            fused = model.fuse(vision, batch.question_ids, n_l=self.n_l, n_s=self.n_s, project=False)
            images.append(F.normalize(self.head(fused.hidden[fused.is_eos]).float(), dim=-1))
            texts.append(F.normalize(self.text(batch.answer_ids.to(device)).float(), dim=-1))
            part, count = orthogonality_terms(fused.hidden, fused.is_eos, fused.group_sizes)
            orth_sum, groups = orth_sum + part, groups + count
        if images:
            image, text = torch.cat(images), torch.cat(texts)
        else:  # this rank's records were all skipped: it still joins the gathers (and their backward)
            width = self.head.out_features
            image = torch.zeros(0, width, device=device, requires_grad=True)
            text = torch.zeros(0, width, device=device, requires_grad=True)
        image, text = gather_rows(image, ctx), gather_rows(text, ctx)
        contrastive = clip_infonce(image, text, self.logit_scale.clamp(max=MAX_LOGIT_SCALE))
        sums = all_reduce_sum(torch.stack([orth_sum.detach().float(), torch.tensor(float(groups), device=device)]), ctx)
        total_groups = max(float(sums[1]), 1.0)
        objective = contrastive + self.orthogonality_weight * orth_sum * (ctx.world / total_groups)
        loss = contrastive.detach() + self.orthogonality_weight * sums[0] / total_groups
        return objective, loss


def _dist_context(device: torch.device) -> DistContext:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), 0, device)
    return DistContext(device=device)
