"""Training-free visual-token reduction baselines, for comparisons at the same number of visual
tokens reaching the LLM (``bench/bench_dropin.py``).

* :func:`fastv_keep`: FastV -- Chen et al., "An Image is Worth 1/2 Tokens After Layer 2:
  Plug-and-Play Inference Acceleration for Large Vision-Language Models", ECCV 2024,
  arXiv:2403.06764. At LLM layer K, every image token is scored by the attention it receives,
  averaged over heads and over all query positions; the top ``budget`` stay.
* :func:`visionzip`: VisionZip -- Yang et al., "VisionZip: Longer is Better but Not Necessary
  in Vision Language Models", CVPR 2025, arXiv:2412.04467. The ``budget - contextual``
  dominant tokens (highest score) stay as they are; the other tokens are merged into
  ``contextual`` tokens: targets spaced evenly over them, every other one averaged into the
  target whose key it is most similar to (cosine).

Both return what reaches the LLM; the caller places it in the host's prompt.
"""

from __future__ import annotations

import math

import torch


def _check_budget(budget: int, available: int, what: str) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if budget > available:
        raise ValueError(f"budget {budget} exceeds the {available} {what}")


def fastv_keep(attention: torch.Tensor, image_mask: torch.Tensor, budget: int) -> torch.Tensor:
    """Positions (ascending) of the ``budget`` image tokens that receive the most attention.

    ``attention``: one sequence's attention probabilities at LLM layer K, (heads, L, L) or
    (L, L), rows are queries; ``image_mask``: (L,) bool, the image token positions."""
    if attention.dim() == 2:
        attention = attention[None]
    if attention.dim() != 3 or attention.shape[1] != attention.shape[2]:
        raise ValueError(f"attention must be (heads, L, L) or (L, L), got shape {tuple(attention.shape)}")
    if image_mask.shape != (attention.shape[-1],) or image_mask.dtype != torch.bool:
        raise ValueError(
            f"image_mask must be a ({attention.shape[-1]},) bool tensor, got {image_mask.dtype} {tuple(image_mask.shape)}"
        )
    positions = image_mask.nonzero().squeeze(1)
    _check_budget(budget, positions.numel(), "image tokens")
    received = attention.float().mean(dim=(0, 1))  # (L,): over heads and query rows, as FastV averages
    top = received[positions].topk(budget).indices
    return positions[top].sort().values


def attention_received(tokens: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) mean softmax attention each token receives among ``tokens`` (one head, scaled
    dot product of ``keys``, default the tokens): a stand-in for a vision tower's attention
    maps where a host does not expose them."""
    k = (tokens if keys is None else keys).float()
    probs = torch.softmax(k @ k.T / math.sqrt(k.shape[-1]), dim=-1)
    return probs.mean(0)


def visionzip(
    tokens: torch.Tensor,
    scores: torch.Tensor,
    budget: int,
    contextual: int | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, C) tokens of one image -> (budget, C): the dominant tokens (in their order), then
    the contextual ones. ``scores`` (N,) rank dominance (VisionZip: the attention a token
    receives in the vision tower); ``keys`` (N, C_k) decide the merging (default the tokens);
    ``contextual`` defaults to VisionZip's ratio of 10 in 64."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, C), got shape {tuple(tokens.shape)}")
    n = tokens.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must be ({n},), got shape {tuple(scores.shape)}")
    keys = tokens if keys is None else keys
    if keys.shape[0] != n:
        raise ValueError(f"keys must have {n} rows, got shape {tuple(keys.shape)}")
    _check_budget(budget, n, "tokens")
    if budget == n:
        return tokens
    if contextual is None:
        contextual = min(budget - 1, max(1, round(budget * 10 / 64))) if budget > 1 else 0
    if not 0 <= contextual < budget:
        raise ValueError(f"contextual must be in [0, {budget}) for budget {budget}, got {contextual}")
    dominant = scores.topk(budget - contextual).indices.sort().values
    if contextual == 0:
        return tokens[dominant]
    rest = torch.ones(n, dtype=torch.bool, device=tokens.device)
    rest[dominant] = False
    rest = rest.nonzero().squeeze(1)
    # Targets evenly spaced over the remaining tokens; every other remaining token joins its nearest target.
    step = rest.numel() // contextual
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=tokens.device)
    is_target[torch.arange(contextual, device=tokens.device) * step] = True
    targets, others = rest[is_target], rest[~is_target]
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    nearest = (k[others] @ k[targets].T).argmax(-1)
    sums = tokens[targets].float().index_add(0, nearest, tokens[others].float())
    counts = torch.ones(contextual, device=tokens.device).index_add(
        0, nearest, torch.ones(others.numel(), device=tokens.device)
    )
    merged = (sums / counts[:, None]).to(tokens.dtype)
    return torch.cat([tokens[dominant], merged])
