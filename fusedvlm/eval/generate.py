"""Greedy answers of many single-turn prompts at once.

An evaluation sweep asks the LLM hundreds of short questions. One at a time, every decode
step of every answer reads all the LLM's weights for a single token; batched, one step
serves the whole batch. Prompts are sorted by length and batched with left padding (an
attention mask hides the pads, positions start at 0 at each prompt's first real token), so
every answer is the one :func:`fusedvlm.generation.prefill` / ``decode`` would give alone.
"""

from __future__ import annotations

import torch

from fusedvlm.hf_compat import cache_kwarg, output_cache


@torch.no_grad()
def greedy_batch(llm, embeds: list[torch.Tensor], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy continuations of prompts given as input embeddings (L_i, d); each stops after
    its EOS (included) or ``max_new_tokens`` ids."""
    if not embeds:
        return []
    device, dtype = embeds[0].device, embeds[0].dtype
    b = len(embeds)
    lengths = [e.shape[0] for e in embeds]
    width = max(lengths)
    x = torch.zeros(b, width, embeds[0].shape[1], device=device, dtype=dtype)
    mask = torch.zeros(b, width, dtype=torch.long, device=device)
    for i, e in enumerate(embeds):
        x[i, width - e.shape[0] :] = e
        mask[i, width - e.shape[0] :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = llm(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    past = output_cache(out)
    ids: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    next_pos = torch.tensor(lengths, device=device)[:, None]
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        tok = logits.float().argmax(-1)
        for i in range(b):
            if not done[i]:
                ids[i].append(int(tok[i]))
        done |= tok == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], 1)
        step_kw = {cache_kwarg(llm): past}
        out = llm(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True, **step_kw)
        past, next_pos = output_cache(out), next_pos + 1
        logits = out.logits[:, -1]
    return ids
