"""Reference local merge (SPEC section 4), written as the unfused chain it replaces.

x (V, H*W, C_in) raster-order patch tokens -> grid (V, C_in, H, W)
  -> conv2d(weight (C_out, C_in, 3, 3), stride 2, padding 1) [+ bias]
  -> + grid[:, :, ::2, ::2] when ``residual`` (C_in == C_out)
  -> flatten raster order (V, Ho*Wo, C_out), Ho = ceil(H/2), Wo = ceil(W/2)
  -> append one LF token per view -> (V, Ho*Wo + 1, C_out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def local_merge(
    x: torch.Tensor,
    weight: torch.Tensor,
    lf_token: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: bool = True,
    grid: tuple[int, int] | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """(V, H*W, C_in) -> (V, ceil(H/2)*ceil(W/2) + 1, C_out). ``upcast`` computes in fp32."""
    out_dtype = x.dtype
    if upcast:
        x, weight, lf_token = x.float(), weight.float(), lf_token.float()
        bias = bias.float() if bias is not None else None
    v, n, c_in = x.shape
    h, w = grid_shape(n, grid)
    g = x.transpose(1, 2).reshape(v, c_in, h, w)
    y = F.conv2d(g, weight, bias, stride=2, padding=1)
    if residual:
        y = y + g[:, :, ::2, ::2]
    y = y.flatten(2).transpose(1, 2)
    lf = lf_token.to(y.dtype).expand(v, 1, -1)
    return torch.cat([y, lf], 1).to(out_dtype)
