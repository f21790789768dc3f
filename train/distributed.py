"""Process-group setup for torchrun (DDP) and small collective helpers that
are no-ops in a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1: NCCL on GPUs, gloo on CPU.
    ``device``: as :func:`fusedvlm.device.resolve_device` (``auto``: the local GPU when there is one)."""
    from fusedvlm.device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, dev)


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        value = value.to(ctx.device)
        dist.all_reduce(value)
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shard_trainable(objective: torch.nn.Module) -> set[torch.nn.Parameter]:
    """FSDP2 (``fully_shard``) over the trainable sides of a training objective: each CLIP
    vision block, each fusion decoder layer and (stage 1) each text-tower block is a unit,
    and the objective is the root unit holding the remaining trainable weights (embeddings,
    merge, projection, heads). The root is the objective rather than ``model.vision`` or
    ``model.fuser`` because the fusion module is driven through methods (``merge_views``,
    ``fuse``), not ``forward``, so only the objective's forward hook gathers its weights.

    The frozen LLM is left out (``ignored_params``): it has no gradients or optimiser state
    to shard, so every rank keeps a plain replica. FSDP2 cannot shard 0-d parameters (stage
    1's learnable temperature): they stay replicated too, and the caller must average their
    gradients over ranks (:func:`average_replicated_grads`). Returns those replicated
    trainable parameters. Needs an initialised process group (NCCL or gloo)."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ValueError("FSDP needs a process group: launch with torchrun (WORLD_SIZE >= 2)")
    model = objective.model
    units = list(model.vision.clip.transformer.resblocks) + list(model.fuser.decoder.layers)
    text = getattr(objective, "text", None)
    if text is not None:
        units += list(text.transformer.resblocks)
    for unit in units:
        fully_shard(unit)
    llm = set(model.llm.parameters()) if model.llm is not None else set()
    scalars = {p for p in objective.parameters() if p.dim() == 0 and p not in llm}
    fully_shard(objective, ignored_params=llm | scalars)
    return {p for p in scalars if p.requires_grad}


def average_replicated_grads(params, ctx: DistContext) -> None:
    """Average over ranks the gradients of parameters that no DDP/FSDP wrapper reduces."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(ctx.world)


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, in rank order, with gradients: the backward sums every rank's gradient
    of the gathered tensor (all_reduce, which gloo and NCCL both have) and keeps this rank's
    rows. Ranks may hold different numbers of rows (none, too)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, rank
        width = max(counts)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


def gather_rows(local: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """(n_r, ...) on every rank -> (sum n_r, ...) everywhere, differentiable. Each rank's
    backward adds every rank's gradient of the result, so when every rank computes the same
    loss from the gathered rows the local rows get ``world`` times its gradient: exactly what
    DDP's averaging over ranks then divides back out."""
    if not ctx.enabled:
        return local
    n = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n)
    return _GatherRows.apply(local, [int(s) for s in sizes], ctx.rank)
