"""The psi analysis end to end: pairs -> hidden states -> per-prefix stats -> curves, fits, files."""

from __future__ import annotations

import json
import os
import time

from fusedvlm.analysis.hidden import iter_hidden_states
from fusedvlm.analysis.pairs import Pair
from fusedvlm.analysis.psi import PsiResult, analyse, psi_from_hidden_states


def run_psi(
    model,
    tokenizer,
    pairs: list[Pair],
    *,
    max_n: int,
    batch_size: int = 8,
    positive: bool = True,
    beta: float = 1.0,
    out_dir: str | None = None,
    progress: bool = True,
    meta: dict | None = None,
    template: str | None = None,
) -> PsiResult:
    """Curves and fits over ``pairs``; with ``out_dir``, also psi.json, psi_curves.png and
    divergence.png there. Hidden states are reduced batch by batch, so memory is bounded by
    ``batch_size`` pairs of at most ``max_n`` tokens."""
    if not pairs:
        raise ValueError("no pairs to analyse")
    t0 = time.perf_counter()
    packs = (
        (h_a, h_b, cu)
        for _, h_a, h_b, cu in iter_hidden_states(
            model, tokenizer, pairs, max_n=max_n, batch_size=batch_size, progress=progress, template=template
        )
    )
    curves = psi_from_hidden_states(packs, max_n, positive=positive)
    if curves.num_pairs == 0:
        raise ValueError("every pair has an empty answer after tokenization: nothing to analyse")
    info = dict(
        meta or {},
        positive=positive,
        max_n=max_n,
        pairs_given=len(pairs),
        hidden_size=int(model.config.hidden_size),
        seconds=round(time.perf_counter() - t0, 2),
    )
    result = analyse(curves, beta=beta, meta=info)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def write_outputs(result: PsiResult, out_dir: str) -> dict[str, str]:
    from fusedvlm.analysis.plots import plot_divergence, plot_psi_curves

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "psi.json")}
    with open(paths["json"], "w") as f:
        json.dump(result.to_json(), f, indent=1)
    paths["psi_curves"] = plot_psi_curves(result, os.path.join(out_dir, "psi_curves.png"))
    paths["divergence"] = plot_divergence(result, os.path.join(out_dir, "divergence.png"))
    return paths


def summary_lines(result: PsiResult, at=(1, 8, 32, 128)) -> list[str]:
    """A small table of the mean curves at a few n, then lambda and the balance point."""
    c = result.curves
    lines = [
        f"{'n':>5} {'pairs':>5} {'psi_eq':>8} {'psi_AB':>8} {'psi_AA':>8} {'psi_BB':>8} {'psi_cross':>9} {'E[D]':>9} {'lam*sqrtU':>9} {'alpha':>7}"
    ]
    for n in at:
        hit = (c.n == n).nonzero()[0]
        if not hit.size:
            continue
        i = int(hit[0])
        bound = result.lam * max(result.upsilon[i], 0.0) ** 0.5
        lines.append(
            f"{n:>5} {c.count['eq'][i]:>5} {c.mean['eq'][i]:>8.4f} {c.mean['ab'][i]:>8.4f} {c.mean['aa'][i]:>8.4f} "
            f"{c.mean['bb'][i]:>8.4f} {c.mean['cross'][i]:>9.4f} {c.mean['div'][i]:>9.4g} {bound:>9.4g} {result.alpha[i]:>7.4f}"
        )
    lines.append(
        f"lambda = {result.lam:.5g}   balance point n_b = {result.balance_point:.5g}   "
        f"beta = {result.beta:g}   pairs = {c.num_pairs}   n = 1..{int(c.n[-1])}"
    )
    return lines
