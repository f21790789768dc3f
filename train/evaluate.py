"""Closed-set answer accuracy by likelihood: for every question of a held-out sample, each
candidate answer is scored by the frozen LLM's log-probability of its tokens and closing EOS
(earlier turns teacher-forced with their true answers), and the best-scoring candidate is the
prediction (``accuracy``; ``accuracy_per_token`` ranks by the mean log-probability per token
instead, which does not favour short answers when the LLM is still unsure). Vision and fusion run once per sample; only the LLM sees each candidate."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fusedvlm.chat import IGNORE_INDEX, Tokens
from fusedvlm.packing import pad_tokens
from fusedvlm.train.data import Item, Record, SampleEncoder


def _candidate_rows(encoder: SampleEncoder, item: Item, candidates: Callable[[str], Sequence[str]]):
    """(turn, candidate, Tokens labelled on that candidate only) for every question."""
    layout = encoder.layout
    rows = []
    for j, (q, _) in enumerate(item.turns):
        counts = encoder.fused_counts(j + 1)
        prefix = layout.conversation(list(item.turns[:j]) + [(q, None)], counts)
        prefix = Tokens(prefix.ids, prefix.fused, [IGNORE_INDEX] * len(prefix))
        for c in candidates(q):
            rows.append((j, c, Tokens(prefix.ids[:], prefix.fused[:], prefix.labels[:]).extend(layout.answer(c))))
    return rows


@torch.no_grad()
def answer_accuracy(
    model,
    records: Sequence[Record],
    encoder: SampleEncoder,
    candidates: Callable[[str], Sequence[str]],
    batch_size: int = 16,
) -> dict[str, float]:
    """{"accuracy", "questions", "chance"} over every question of ``records``."""
    if encoder.stage != 2:
        raise ValueError("answer accuracy needs a stage-2 encoder (LLM layout)")
    was_training = model.training
    model.eval()
    correct = correct_mean = total = 0
    chance = 0.0
    device = model.device
    llm = model.llm
    try:
        for start in range(0, len(records), batch_size):
            items = [encoder.encode(r) for r in records[start : start + batch_size]]
            views = torch.cat([it.views for it in items]).to(device)
            vision = model.encode_views(views, [it.views.shape[0] for it in items])
            fused = model.fuse(vision, [it.question_ids for it in items], n_l=encoder.n_l, n_s=encoder.n_s).per_sample()
            for item, f in zip(items, fused):
                rows = _candidate_rows(encoder, item, candidates)
                ids, fused_slots, labels, mask = pad_tokens([t for _, _, t in rows], encoder.layout.placeholder_id)
                pieces = [f[: t.num_fused] for _, _, t in rows]
                emb = llm.get_input_embeddings()(ids.to(device))
                emb = emb.masked_scatter(fused_slots.to(device)[..., None], torch.cat(pieces).to(emb.dtype))
                logits = llm(inputs_embeds=emb, attention_mask=mask.to(device)).logits[:, :-1].float()
                targets = labels[:, 1:].to(device)
                logp = -F.cross_entropy(
                    logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
                ).sum(1)
                per_token = logp / (targets != IGNORE_INDEX).sum(1)
                best: dict[int, tuple[float, str]] = {}
                best_mean: dict[int, tuple[float, str]] = {}
                for (j, c, _), score, mean in zip(rows, logp.tolist(), per_token.tolist()):
                    if j not in best or score > best[j][0]:
                        best[j] = (score, c)
                    if j not in best_mean or mean > best_mean[j][0]:
                        best_mean[j] = (mean, c)
                for j, (_, answer) in enumerate(item.turns):
                    correct += int(best[j][1] == answer)
                    correct_mean += int(best_mean[j][1] == answer)
                    total += 1
                    chance += 1.0 / len(candidates(item.turns[j][0]))
    finally:
        model.train(was_training)
    return {
        "accuracy": correct / total,
        "accuracy_per_token": correct_mean / total,
        "questions": total,
        "chance": chance / total,
    }
