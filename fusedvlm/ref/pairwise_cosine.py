"""Reference psi / divergence statistics: full n x n cosine matrices, clear over fast.

h_a, h_b (T, d) are the two branches of every pair, packed with the same ``cu_seqlens``.
For the prefix of length n of a pair (a_1..a_n, b_1..b_n), with c the cosine (0 when either
vector is zero) and f = max(0, .) when ``positive`` else the identity:

    eq(n) = mean_{i<=n}     f(c(a_i, b_i))
    ab(n) = mean_{i!=j<=n}  f(c(a_i, b_j))      (NaN at n = 1)
    aa(n) = mean_{i!=j<=n}  f(c(a_i, a_j)),  bb likewise
    div(n) = || sum_{i<=n} (a_i - b_i) ||_2

Every statistic is returned per token (T,): the value at token t is the one of the prefix of
its pair that ends at t. The reference builds each pair's whole cosine matrices and reads all
prefix sums off their 2-D cumulative sums.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedvlm.packing import check_cu_seqlens


class PsiStats(NamedTuple):
    """Per-token prefix statistics, each (T,) float32 (see the module docstring)."""

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


def _prefix_offdiag_mean(c: torch.Tensor) -> torch.Tensor:
    """(n, n) matrix -> (n,): mean of the off-diagonal entries of every leading m x m block."""
    n = c.shape[0]
    total = c.cumsum(0).cumsum(1).diagonal()
    diag = c.diagonal().cumsum(0)
    m = torch.arange(1, n + 1, dtype=c.dtype, device=c.device)
    pairs = m * (m - 1)
    return torch.where(pairs > 0, (total - diag) / torch.where(pairs > 0, pairs, 1), float("nan"))


def pairwise_cosine_stats(
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    positive: bool = True,
    upcast: bool = True,
) -> PsiStats:
    """Reference statistics; ``upcast`` computes in float64, else in the inputs' dtype."""
    if h_a.shape != h_b.shape or h_a.dim() != 2:
        raise ValueError(f"h_a and h_b must be (T, d) of one shape, got {tuple(h_a.shape)} and {tuple(h_b.shape)}")
    check_cu_seqlens(cu_seqlens, h_a.shape[0])
    work = torch.float64 if upcast else h_a.dtype
    a, b = h_a.to(work), h_b.to(work)
    out = {k: torch.empty(a.shape[0], dtype=work, device=a.device) for k in PsiStats._fields}
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        if hi == lo:
            continue
        ua, ub = unit_rows(a[lo:hi]), unit_rows(b[lo:hi])
        f = (lambda x: x.clamp_min(0)) if positive else (lambda x: x)
        c_ab, c_aa, c_bb = f(ua @ ub.T), f(ua @ ua.T), f(ub @ ub.T)
        m = torch.arange(1, hi - lo + 1, dtype=work, device=a.device)
        out["eq"][lo:hi] = c_ab.diagonal().cumsum(0) / m
        out["ab"][lo:hi] = _prefix_offdiag_mean(c_ab)
        out["aa"][lo:hi] = _prefix_offdiag_mean(c_aa)
        out["bb"][lo:hi] = _prefix_offdiag_mean(c_bb)
        out["div"][lo:hi] = torch.linalg.vector_norm((a[lo:hi] - b[lo:hi]).cumsum(0), dim=1)
    return PsiStats(**{k: v.float() for k, v in out.items()})
