"""What a kernel, its torch path and its reference (:mod:`fusedvlm.ref`) share: token-grid
shapes of the local merge, the psi statistics' result type and row normalisation."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch


def grid_shape(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) of a raster token grid: square unless given."""
    if grid is not None:
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
        ):
            raise ValueError(f"grid must be a pair of ints (H, W), got {grid!r}")
        h, w = grid[0], grid[1]
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


# --------------------------------------------------------------------------- argument checks
# Pieces of each op's one argument check (``check_args`` in kernels/<op>.py), which every public
# call runs before it picks a backend, so that a bad input gets the same error on torch, C++ and
# Triton (docs/design.md). The messages are the C++ kernels' (csrc/), which check direct op calls
# and, for packed attention's offset values, every call they run (design §10).


def offsets_tensor(cu, name: str, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """An int32 (n + 1,) offset vector on ``like``'s device, made contiguous: the Triton kernels
    index it without strides, so a strided view would be read as other offsets."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor of n + 1 >= 1 offsets, got {cu.dtype} {tuple(cu.shape)}")
    if not (cu.is_cpu and like.is_cpu) and cu.device != like.device:  # is_cpu: no device object
        raise ValueError(f"{name} is on {cu.device} but {like_name} is on {like.device}")
    return cu if cu.is_contiguous() else cu.contiguous()


def host_offsets(cu: torch.Tensor, name: str, total: int, what: str) -> list[int]:
    """The offsets as a list, checked: 0 first, non-decreasing, ``total`` last (``what`` holds them).

    Only for CPU tensors, where reading them is free; CUDA offsets are checked once where the pack
    is built (:func:`fusedvlm.packing.check_cu_seqlens`), not by every layer's call."""
    row = cu.tolist()
    if row[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {row[0]}")
    if row != sorted(row):  # sorted() runs in C: cheaper than a Python loop on every call
        raise ValueError(f"{name} must be non-decreasing, got {row}")
    if row[-1] != total:
        raise ValueError(f"{name}[-1] = {row[-1]} but {what} has {total} tokens")
    return row


def flag(value, name: str) -> bool:
    """A bool argument; ``"no"`` or 0 would be read as a truth value the caller did not mean."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def finite_real(value, name: str) -> float:
    """A finite real number (a Python or 0-d tensor one; not a bool or a string)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)
