"""Reference local merge (design §4), written as the unfused chain it replaces.

x (V, H*W, C_in) raster-order patch tokens -> grid (V, C_in, H, W)
  -> conv2d(weight (C_out, C_in, 3, 3), stride 2, padding 1) [+ bias]
  -> + grid[:, :, ::2, ::2] when ``residual`` (C_in == C_out)
  -> flatten raster order (V, Ho*Wo, C_out), Ho = ceil(H/2), Wo = ceil(W/2)
  -> append one LF token per view -> (V, Ho*Wo + 1, C_out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedvlm.kernels.common import grid_shape


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
