"""What a kernel, its torch path and its reference (:mod:`fusedvlm.ref`) share: token-grid
shapes of the local merge, the psi statistics' result type and row normalisation."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def grid_shape(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) of a raster token grid: square unless given."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h <= 0 or w <= 0 or h * w != num_tokens:
            raise ValueError(f"grid {grid} does not hold {num_tokens} tokens")
        return h, w
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or side == 0:
        raise ValueError(f"{num_tokens} tokens is not a square grid; pass grid=(H, W)")
    return side, side


def merged_tokens_per_view(h: int, w: int) -> int:
    """Tokens a view yields after the merge, LF token included."""
    return ((h + 1) // 2) * ((w + 1) // 2) + 1


class PsiStats(NamedTuple):
    """Per-token prefix statistics, each (T,) float32 (see :mod:`fusedvlm.kernels.pairwise_cosine`)."""

    eq: torch.Tensor
    ab: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor
    div: torch.Tensor


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero (their cosines are 0), NaN rows stay NaN.

    Each row is divided by its largest |entry| before its norm is taken, so rows of 1e20 or
    1e-30 give their direction (the squares would overflow or underflow in fp32)."""
    amax = x.abs().amax(-1, keepdim=True)
    y = x / torch.where(amax > 0, amax, 1)
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    return torch.where(norm == 0, 0, y / norm)
