"""Training losses (design §7).

* :func:`clip_infonce`: symmetric CLIP InfoNCE between paired, L2-normalised embeddings with a
  learnable log inverse temperature.
* :func:`orthogonality_loss`: ``MSE(Z Z^T, I)`` over each group's L2-normalised query outputs,
  through whichever of the n x n and C x C Gram matrices is smaller (exact either way).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusedvlm.train.config import Stage1Config


def clip_infonce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """image, text (N, D) L2-normalised and paired row by row; logit_scale = log(1 / T).
    Mean of the image->text and text->image cross-entropies."""
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must be equal (N, D) shapes")
    if image.shape[0] == 0:
        raise ValueError("InfoNCE needs at least one pair")
    logits = logit_scale.exp() * image.float() @ text.float().t()
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def init_logit_scale(temperature: float = Stage1Config.temperature) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.tensor(math.log(1.0 / temperature))


def orthogonality_sq_error(z: torch.Tensor) -> torch.Tensor:
    """||Z Z^T - I||_F^2 for groups z (..., n, C) of unit rows -> (...,).

    Expanding, ||Z Z^T||_F^2 - 2 tr(Z Z^T) + n with ||Z Z^T||_F = ||Z^T Z||_F and
    tr(Z Z^T) = ||Z||_F^2: the C x C Gram matrix gives the same value without the n x n one,
    which is cheaper when n > C (n_l = 768 queries of a 256-wide decoder, say)."""
    n, c = z.shape[-2:]
    z = z.float()
    if n <= c:
        gram = z @ z.transpose(-1, -2)
        return (gram - torch.eye(n, device=z.device)).pow(2).sum((-1, -2))
    return (z.transpose(-1, -2) @ z).pow(2).sum((-1, -2)) - 2 * z.pow(2).sum((-1, -2)) + n


def orthogonality_loss(hidden: torch.Tensor, is_eos: torch.Tensor, group_sizes: list[list[int]]) -> torch.Tensor:
    """Mean over groups of MSE(Z Z^T, I) = ||Z Z^T - I||_F^2 / n^2, Z the L2-normalised
    non-EOS query outputs of the group (n = group size - 1; single-token groups have none
    and are skipped). ``hidden`` (T_f, C) packs the groups in order, EOS last in each."""
    total, count = orthogonality_terms(hidden, is_eos, group_sizes)
    return total / count if count else total


def orthogonality_terms(
    hidden: torch.Tensor, is_eos: torch.Tensor, group_sizes: list[list[int]]
) -> tuple[torch.Tensor, int]:
    """(sum over groups of MSE(Z Z^T, I), number of groups counted): the parts of
    :func:`orthogonality_loss` that add up over micro-batches and ranks."""
    sizes = [m for sample in group_sizes for m in sample]
    if sum(sizes) != hidden.shape[0] or is_eos.shape[0] != hidden.shape[0]:
        raise ValueError(f"group sizes sum to {sum(sizes)} but there are {hidden.shape[0]} fused outputs")
    if int(is_eos.sum()) != len(sizes):
        raise ValueError(f"{int(is_eos.sum())} EOS outputs for {len(sizes)} groups")
    z_all = F.normalize(hidden[~is_eos].float(), dim=-1)
    # Groups come in at most two sizes (n_l, n_s): batch each size into one (G, n, C) tensor.
    starts: dict[int, list[int]] = {}
    offset = 0
    for m in sizes:
        if m > 1:
            starts.setdefault(m - 1, []).append(offset)
        offset += m - 1
    total, count = z_all.new_zeros(()), 0
    for n, group_starts in starts.items():
        index = torch.tensor(group_starts, device=z_all.device)[:, None] + torch.arange(n, device=z_all.device)
        total = total + (orthogonality_sq_error(z_all[index]) / n**2).sum()
        count += len(group_starts)
    return total, count
