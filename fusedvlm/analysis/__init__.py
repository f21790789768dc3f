"""Divergence and dependency measures of the paper's section 3 (design §8).

Pairs of answers that share a prefix -> final hidden states of both branches -> per-prefix
psi statistics and divergence (:func:`fusedvlm.kernels.pairwise_cosine_stats`) -> curves over
pairs, the bound lambda sqrt(Upsilon(n)), the balance point, alpha(n), and scaling-law fits.
Command line: ``fusedvlm psi`` and ``fusedvlm fit-scaling``.
"""

from fusedvlm.analysis.pairs import Pair, generate_pairs, load_pairs, load_prompts, save_pairs
from fusedvlm.analysis.psi import (
    PsiAccumulator,
    PsiCurves,
    PsiResult,
    ScalingFit,
    alpha_from_bound,
    analyse,
    balance_point,
    fit_lambda,
    fit_scaling_law,
    psi_from_hidden_states,
    upsilon,
)

__all__ = [
    "Pair",
    "generate_pairs",
    "load_pairs",
    "load_prompts",
    "save_pairs",
    "PsiAccumulator",
    "PsiCurves",
    "PsiResult",
    "ScalingFit",
    "alpha_from_bound",
    "analyse",
    "balance_point",
    "fit_lambda",
    "fit_scaling_law",
    "psi_from_hidden_states",
    "upsilon",
]
