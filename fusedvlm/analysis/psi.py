"""Divergence and dependency measures over answer pairs (design §8, paper section 3).

Per pair and prefix length n (from :func:`fusedvlm.kernels.pairwise_cosine_stats`):
psi_eq, psi_AB, psi_AA, psi_BB, psi_cross = (psi_AA + psi_BB) / 2 and D(n). Over pairs, for
every n: means, standard deviations (ddof = 1) and counts (a pair counts at n when both its
branches have n tokens). Then

    Upsilon(n) = n (1 - psi_eq(n)) + n (n - 1) (psi_cross(n) - psi_AB(n))
    E[D(n)] ~ lambda sqrt(Upsilon(n)),  lambda = argmin mean_n (E[D(n)] - lambda sqrt(Upsilon(n)))^2
    n_b = (1 - psi_eq) / (psi_cross - psi_AB) - 1                         (balance point)
    alpha(n) = (beta / 2) log_n((1 + n_b) / (n + n_b)) - beta / 2         (-beta/2 if psi_cross == psi_AB)

and the performance law S(n) = c / n^alpha fitted by BFGS on mean_i (log S_i - log c + alpha log n_i)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

STATS = ("eq", "ab", "aa", "bb", "cross", "div")


# --------------------------------------------------------------------------- aggregation


class PsiAccumulator:
    """Running sums over pairs of every per-prefix statistic, for n = 1..max_n (float64)."""

    def __init__(self, max_n: int):
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.max_n = max_n
        self.num_pairs = 0
        self._sum = {k: torch.zeros(max_n, dtype=torch.float64) for k in STATS}
        self._sq = {k: torch.zeros(max_n, dtype=torch.float64) for k in STATS}
        self._count = {k: torch.zeros(max_n, dtype=torch.float64) for k in STATS}

    def update(self, stats, cu_seqlens: torch.Tensor) -> None:
        """Add the per-token :class:`PsiStats` of a pack of pairs."""
        from fusedvlm.packing import lengths_from_cu_seqlens, positions_in_segment

        pos = positions_in_segment(cu_seqlens.cpu(), stats.eq.shape[0])
        if pos.numel() and int(pos.max()) >= self.max_n:
            raise ValueError(f"a pair has {int(pos.max()) + 1} tokens, more than max_n = {self.max_n}")
        values = {
            "eq": stats.eq,
            "ab": stats.ab,
            "aa": stats.aa,
            "bb": stats.bb,
            "cross": (stats.aa + stats.bb) / 2,
            "div": stats.div,
        }
        for k, v in values.items():
            v = v.detach().cpu().double()
            ok = torch.isfinite(v)
            self._sum[k].index_add_(0, pos[ok], v[ok])
            self._sq[k].index_add_(0, pos[ok], v[ok] ** 2)
            self._count[k].index_add_(0, pos[ok], torch.ones_like(v[ok]))
        self.num_pairs += int((lengths_from_cu_seqlens(cu_seqlens) > 0).sum())

    def curves(self) -> PsiCurves:
        mean, std, count = {}, {}, {}
        for k in STATS:
            c = self._count[k]
            m = self._sum[k] / c
            var = (self._sq[k] - c * m**2).clamp_min(0) / (c - 1)
            mean[k] = np.where(c > 0, m.numpy(), np.nan)
            std[k] = np.where(c > 1, var.sqrt().numpy(), np.nan)
            count[k] = c.numpy().astype(np.int64)
        return PsiCurves(n=np.arange(1, self.max_n + 1), mean=mean, std=std, count=count, num_pairs=self.num_pairs)


@dataclass
class PsiCurves:
    n: np.ndarray
    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    count: dict[str, np.ndarray]
    num_pairs: int

    def trimmed(self) -> PsiCurves:
        """Only the prefix lengths that at least one pair reaches."""
        keep = self.count["eq"] > 0
        return PsiCurves(
            self.n[keep],
            {k: v[keep] for k, v in self.mean.items()},
            {k: v[keep] for k, v in self.std.items()},
            {k: v[keep] for k, v in self.count.items()},
            self.num_pairs,
        )


# --------------------------------------------------------------------------- the bound


def upsilon(n, psi_eq, psi_cross, psi_ab) -> np.ndarray:
    """n (1 - psi_eq) + n (n - 1) (psi_cross - psi_AB); the cross term is 0 at n = 1."""
    n = np.asarray(n, dtype=np.float64)
    psi_eq, psi_cross, psi_ab = (np.asarray(x, dtype=np.float64) for x in (psi_eq, psi_cross, psi_ab))
    cross = np.where(n > 1, n * (n - 1) * np.nan_to_num(psi_cross - psi_ab, nan=0.0), 0.0)
    return n * (1 - psi_eq) + cross


def fit_lambda(mean_div, ups) -> float:
    """Least squares lambda of E[D(n)] ~ lambda sqrt(Upsilon(n)) over the n where both are
    finite and Upsilon >= 0: lambda = sum D sqrt(U) / sum U."""
    d = np.asarray(mean_div, dtype=np.float64)
    u = np.asarray(ups, dtype=np.float64)
    if d.shape != u.shape:
        raise ValueError(f"E[D] and Upsilon must have one shape, got {d.shape} and {u.shape}")
    ok = np.isfinite(d) & np.isfinite(u) & (u >= 0)
    if not ok.any() or u[ok].sum() == 0:
        raise ValueError("no prefix length with a finite E[D] and a positive Upsilon to fit lambda on")
    return float((d[ok] * np.sqrt(u[ok])).sum() / u[ok].sum())


def balance_point(psi_eq, psi_cross, psi_ab):
    """n_b = (1 - psi_eq) / (psi_cross - psi_AB) - 1 (inf where psi_cross == psi_AB)."""
    psi_eq, psi_cross, psi_ab = (np.asarray(x, dtype=np.float64) for x in (psi_eq, psi_cross, psi_ab))
    gap = psi_cross - psi_ab
    with np.errstate(divide="ignore", invalid="ignore"):
        nb = np.where(gap == 0, np.inf, (1 - psi_eq) / np.where(gap == 0, 1, gap) - 1)
    return float(nb) if nb.ndim == 0 else nb


def alpha_from_bound(n, n_b, beta: float) -> np.ndarray:
    """alpha(n) = (beta/2) log_n((1 + n_b) / (n + n_b)) - beta/2; -beta/2 when n_b is infinite
    (psi_cross == psi_AB). NaN at n = 1 (log base 1) and where the log's argument is <= 0."""
    n = np.asarray(n, dtype=np.float64)
    n_b = np.broadcast_to(np.asarray(n_b, dtype=np.float64), n.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (1 + n_b) / (n + n_b)
        log_n = np.where(
            (ratio > 0) & (n > 1), np.log(np.where(ratio > 0, ratio, 1)) / np.log(np.where(n > 1, n, 2)), np.nan
        )
    return np.where(np.isinf(n_b), -beta / 2, (beta / 2) * log_n - beta / 2)


# --------------------------------------------------------------------------- scaling law


@dataclass(frozen=True)
class ScalingFit:
    """S(n) = c / n^alpha."""

    c: float
    alpha: float
    loss: float = float("nan")

    def predict(self, n) -> np.ndarray:
        return self.c / np.asarray(n, dtype=np.float64) ** self.alpha


def fit_scaling_law(n, score) -> ScalingFit:
    """Minimise mean_i (log S_i - log c + alpha log n_i)^2 over (log c, alpha) with BFGS."""
    from scipy.optimize import minimize

    n = np.asarray(n, dtype=np.float64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if n.shape != s.shape:
        raise ValueError(f"n and score must have one length, got {n.size} and {s.size}")
    if n.size < 2 or np.unique(n).size < 2:
        raise ValueError(f"fitting c and alpha needs at least two distinct n, got {np.unique(n).size}")
    if not (np.isfinite(n).all() and np.isfinite(s).all()):
        raise ValueError("n and score must be finite")
    if (n <= 0).any() or (s <= 0).any():
        raise ValueError("n and score must be > 0 (the fit is in log space)")
    log_n, log_s = np.log(n), np.log(s)

    def loss(theta):
        log_c, alpha = theta
        return np.mean((log_s - log_c + alpha * log_n) ** 2)

    def grad(theta):
        log_c, alpha = theta
        r = log_s - log_c + alpha * log_n
        return np.array([-2 * r.mean(), 2 * (r * log_n).mean()])

    res = minimize(loss, x0=np.array([log_s.mean(), 0.0]), jac=grad, method="BFGS")
    log_c, alpha = res.x
    return ScalingFit(c=float(math.exp(log_c)), alpha=float(alpha), loss=float(res.fun))


# --------------------------------------------------------------------------- results


@dataclass
class PsiResult:
    curves: PsiCurves
    upsilon: np.ndarray
    lam: float
    balance_point: float
    balance_point_n: np.ndarray
    beta: float
    alpha: np.ndarray
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        def arr(x):
            return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, dtype=np.float64)]

        c = self.curves
        return {
            "meta": self.meta,
            "num_pairs": c.num_pairs,
            "n": c.n.tolist(),
            "mean": {k: arr(v) for k, v in c.mean.items()},
            "std": {k: arr(v) for k, v in c.std.items()},
            "count": {k: v.tolist() for k, v in c.count.items()},
            "upsilon": arr(self.upsilon),
            "lambda": self.lam,
            "lambda_sqrt_upsilon": arr(self.lam * np.sqrt(np.where(self.upsilon >= 0, self.upsilon, np.nan))),
            "balance_point": self.balance_point if math.isfinite(self.balance_point) else None,
            "balance_point_n": arr(self.balance_point_n),
            "beta": self.beta,
            "alpha": arr(self.alpha),
        }


def analyse(curves: PsiCurves, beta: float = 1.0, meta: dict | None = None) -> PsiResult:
    """Upsilon, lambda, the balance point (from the psi of the longest prefix, the average over
    all its token pairs, i.e. the constant-psi estimate) and alpha(n) for ``beta``."""
    c = curves.trimmed()
    if c.n.size == 0:
        raise ValueError("no pair reaches n = 1: nothing to analyse")
    eq, cross, ab = c.mean["eq"], c.mean["cross"], c.mean["ab"]
    ups = upsilon(c.n, eq, cross, ab)
    lam = fit_lambda(c.mean["div"], ups)
    nb_n = balance_point(eq, cross, ab)
    nb = float(nb_n[-1]) if c.n.size > 1 else math.inf
    return PsiResult(
        curves=c,
        upsilon=ups,
        lam=lam,
        balance_point=nb,
        balance_point_n=nb_n,
        beta=beta,
        alpha=alpha_from_bound(c.n, nb, beta),
        meta=dict(meta or {}),
    )


def psi_from_hidden_states(batches, max_n: int, positive: bool = True) -> PsiCurves:
    """Aggregate an iterable of (h_a, h_b, cu_seqlens) packs into :class:`PsiCurves`."""
    from fusedvlm.kernels import pairwise_cosine_stats

    acc = PsiAccumulator(max_n)
    for h_a, h_b, cu in batches:
        acc.update(pairwise_cosine_stats(h_a, h_b, cu, positive=positive), cu)
    return acc.curves()
