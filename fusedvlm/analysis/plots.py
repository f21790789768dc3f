"""PNG plots of the psi analysis and of scaling-law fits (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os

import numpy as np

from fusedvlm.analysis.psi import PsiResult, ScalingFit

_LABELS = {
    "eq": r"$\psi_{eq}$",
    "ab": r"$\psi_{AB}$",
    "aa": r"$\psi_{AA}$",
    "bb": r"$\psi_{BB}$",
    "cross": r"$\psi_{cross}$",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_psi_curves(result: PsiResult, path: str) -> str:
    """psi_eq, psi_AB, psi_AA, psi_BB, psi_cross vs n, each with its +-1 sigma band over pairs."""
    plt = _pyplot()
    c = result.curves
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, label in _LABELS.items():
        m, s = c.mean[k], c.std[k]
        (line,) = ax.plot(c.n, m, label=label, lw=1.6 if k in ("eq", "ab", "cross") else 1.0)
        ax.fill_between(c.n, m - s, m + s, color=line.get_color(), alpha=0.12, lw=0)
    ax.set_xlabel("n (answer tokens)")
    ax.set_ylabel(r"$\psi(n)$")
    mode = "max(0, cos)" if result.meta.get("positive", True) else "cos"
    ax.set_title(f"psi over {c.num_pairs} pairs ({mode})")
    ax.legend(ncol=3, fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_divergence(result: PsiResult, path: str) -> str:
    """E[D(n)] with its +-1 sigma band, lambda sqrt(Upsilon(n)) and the balance point."""
    plt = _pyplot()
    c = result.curves
    m, s = c.mean["div"], c.std["div"]
    bound = result.lam * np.sqrt(np.where(result.upsilon >= 0, result.upsilon, np.nan))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(c.n, m, label=r"$E[D(n)]$", color="C0")
    ax.fill_between(c.n, m - s, m + s, color="C0", alpha=0.15, lw=0, label=r"$\pm 1\sigma$ over pairs")
    ax.plot(c.n, bound, "--", color="C3", label=rf"$\lambda\sqrt{{\Upsilon(n)}}$, $\lambda$ = {result.lam:.3g}")
    nb = result.balance_point
    if math.isfinite(nb) and c.n[0] <= nb <= c.n[-1]:
        ax.axvline(nb, color="k", lw=0.8, ls=":", label=f"balance point $n_b$ = {nb:.3g}")
    else:
        ax.plot([], [], " ", label=f"balance point $n_b$ = {nb:.3g} (off the axis)")
    ax.set_xlabel("n (answer tokens)")
    ax.set_ylabel(r"$D(n) = \|\sum_{i \leq n} (h^A_i - h^B_i)\|$")
    ax.set_title(f"divergence over {c.num_pairs} pairs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_scaling_fits(groups: dict[str, tuple[np.ndarray, np.ndarray, ScalingFit]], path: str) -> str:
    """Data points and the fitted S(n) = c / n^alpha per group, log-log axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, (n, score, fit)) in enumerate(groups.items()):
        color = f"C{i % 10}"
        ax.scatter(n, score, color=color, s=18)
        grid = np.geomspace(n.min(), n.max(), 100)
        ax.plot(grid, fit.predict(grid), color=color, label=f"{name}: c = {fit.c:.4g}, alpha = {fit.alpha:.4g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("score")
    ax.set_title(r"$S(n) = c / n^{\alpha}$")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
