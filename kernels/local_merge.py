"""Fused local merge. The Triton kernel arrives with its own issue; until then the
public op runs the torch path."""

from __future__ import annotations

import torch

from fusedvlm.ref.local_merge import local_merge as _ref_local_merge


def local_merge(x: torch.Tensor, weight: torch.Tensor, lf_token: torch.Tensor, *, bias=None, residual: bool = True, grid=None) -> torch.Tensor:
    """(V, H*W, C_in) -> (V, ceil(H/2)*ceil(W/2) + 1, C_out); see fusedvlm.ref.local_merge."""
    return _ref_local_merge(x, weight, lf_token, bias=bias, residual=residual, grid=grid)
