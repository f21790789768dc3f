"""Final hidden states (before the LM head) of both branches of every pair.

For a pair, the shared prefix (system prompt + question in the model's chat layout) runs once;
its key/value cache is repeated for the two branches, which then run together as one batch.
Several pairs run per forward: prefixes and branches are right-padded, and padded slots are
hidden by the attention mask. Right padding keeps every query row with at least one visible
key, so no softmax row is empty and nothing NaN reaches the cache. Branches are cut to the
shorter answer and to ``max_n`` tokens, which bounds the memory of a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fusedvlm.analysis.pairs import Pair, prefix_ids
from fusedvlm.hf_compat import cache_kwarg, output_cache
from fusedvlm.packing import pad_rows


@dataclass(frozen=True)
class EncodedPair:
    prefix: list[int]
    a: list[int]
    b: list[int]

    @property
    def n(self) -> int:
        return len(self.a)


def encode_pair(tokenizer, pair: Pair, max_n: int, template: str | None = None) -> EncodedPair:
    """Token ids of the prefix (chat layout ``template``, see :func:`prefix_ids`) and of both
    answers, cut to n = min(len A, len B, max_n)."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    a = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"]
    b = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"]
    n = min(len(a), len(b), max_n)
    return EncodedPair(prefix_ids(tokenizer, pair.question, pair.system, template), a[:n], b[:n])


@torch.no_grad()
def branch_hidden_states(model, batch: list[EncodedPair], pad_id: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(h_a, h_b)] of (n, d) float32 final hidden states at the answer tokens, one per pair."""
    if any(p.n == 0 or not p.prefix for p in batch):
        raise ValueError("every pair needs a non-empty prefix and at least one answer token")
    base = model.base_model
    device = next(model.parameters()).device
    npairs = len(batch)
    lp = torch.tensor([len(p.prefix) for p in batch], device=device)
    prefix, mask_p = pad_rows([p.prefix for p in batch], pad_id, device=device)
    width_p = prefix.shape[1]
    pos_p = torch.arange(width_p, device=device)[None].expand(npairs, -1)
    cache = output_cache(base(input_ids=prefix, attention_mask=mask_p, position_ids=pos_p, use_cache=True))
    cache.batch_repeat_interleave(2)

    # Branch rows a_0, b_0, a_1, b_1, ...: pair i's a and b continue its cached prefix.
    branch, mask_n = pad_rows([r for p in batch for r in (p.a, p.b)], pad_id, device=device)
    width_n = branch.shape[1]
    lp2 = lp.repeat_interleave(2)
    mask = torch.cat([mask_p.repeat_interleave(2, 0), mask_n], 1)
    # Branch tokens continue the prefix's positions, whatever padding sits between them.
    pos = lp2[:, None] + torch.arange(width_n, device=device)[None]
    h = base(
        input_ids=branch, attention_mask=mask, position_ids=pos, use_cache=False, **{cache_kwarg(base): cache}
    ).last_hidden_state
    h = h.float()
    return [(h[2 * i, : p.n], h[2 * i + 1, : p.n]) for i, p in enumerate(batch)]


def iter_hidden_states(
    model,
    tokenizer,
    pairs: list[Pair],
    *,
    max_n: int,
    batch_size: int = 8,
    progress: bool = True,
    template: str | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of pairs: (indices of the pairs used, h_a, h_b packed (T, d), cu_seqlens).

    Pairs whose shorter answer has no token are skipped (their indices never appear)."""
    from tqdm.auto import tqdm

    from fusedvlm.packing import cu_seqlens_from_lengths

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [(i, encode_pair(tokenizer, p, max_n, template)) for i, p in enumerate(pairs)]
    encoded = [(i, e) for i, e in encoded if e.n > 0]
    bar = tqdm(total=len(encoded), desc="hidden states", unit="pair", disable=not progress)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        hs = branch_hidden_states(model, [e for _, e in chunk], pad)
        h_a = torch.cat([a for a, _ in hs])
        h_b = torch.cat([b for _, b in hs])
        yield [i for i, _ in chunk], h_a, h_b, cu_seqlens_from_lengths([e.n for _, e in chunk], device=h_a.device)
        bar.update(len(chunk))
    bar.close()
