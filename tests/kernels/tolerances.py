"""The one table of test tolerances for kernels vs reference.

Absolute/relative tolerances per (op, dtype) for ops compared with plain allclose, and
``ERROR_RATIO`` for ops whose error is bounded relative to the reference's own error
(kernel error vs fp64 <= ERROR_RATIO * reference error vs fp64 in the same dtype + ATOL_FLOOR).
"""

import torch

TOL: dict[tuple[str, torch.dtype], dict[str, float]] = {
    ("local_merge", torch.float32): dict(atol=1e-4, rtol=1e-4),
    ("local_merge", torch.float16): dict(atol=2e-2, rtol=2e-2),
    ("local_merge", torch.bfloat16): dict(atol=1e-1, rtol=5e-2),
}

ERROR_RATIO: dict[str, float] = {
    "packed_attention": 3.0,
    "pairwise_cosine": 4.0,
}
ATOL_FLOOR: dict[tuple[str, torch.dtype], float] = {
    ("packed_attention", torch.float32): 1e-6,
    ("packed_attention", torch.float16): 1e-4,
    ("packed_attention", torch.bfloat16): 1e-3,
    ("pairwise_cosine", torch.float32): 1e-5,
    ("pairwise_cosine", torch.float16): 1e-3,
    ("pairwise_cosine", torch.bfloat16): 1e-2,
}


def tol(op: str, dtype: torch.dtype) -> dict[str, float]:
    return TOL[(op, dtype)]
