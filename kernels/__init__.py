"""Triton kernels (installed as ``fusedvlm.kernels``).

Each public op dispatches through :mod:`fusedvlm.backend`: the Triton kernel on CUDA
tensors or under ``TRITON_INTERPRET=1``, else a torch path. Importing this package does
not import triton eagerly and never touches CUDA.
"""

if __name__ != "fusedvlm.kernels":  # found as a bare `kernels` from a checkout root
    from fusedvlm._checkout import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from fusedvlm.kernels.local_merge import local_merge
    from fusedvlm.kernels.packed_attention import packed_attention
    from fusedvlm.kernels.pairwise_cosine import PsiStats, pairwise_cosine_stats

    __all__ = ["PsiStats", "local_merge", "packed_attention", "pairwise_cosine_stats"]
