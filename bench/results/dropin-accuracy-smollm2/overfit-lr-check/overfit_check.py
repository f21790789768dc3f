"""The overfit / image-dependence check behind the README's explanation of the constant fusion rows
(a diagnostic record, not part of the bench). Env: NTRAIN images, NAT_STEPS native steps at LR,
then FUS_STEPS fusion steps at FLR (n_l = BUDGET); prints the fused tokens' spread across images,
gradient norms, the residual at the fused positions and per-image predictions. E.g.
    OMP_NUM_THREADS=1 NAT_STEPS=60 FUS_STEPS=120 FLR=3e-4 .venv/bin/python <this file>
"""

import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fusedvlm.adapters.base import VisionFeatures
from fusedvlm.packing import cu_seqlens_from_lengths

# The bench by its path: the checkout root is never put on sys.path (tests/test_fresh_checkout.py).
_spec = importlib.util.spec_from_file_location(
    "bench_dropin_accuracy", Path(__file__).resolve().parents[4] / "bench" / "bench_dropin_accuracy.py"
)
acc = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acc)

torch.set_num_threads(1)
NTRAIN = int(os.environ.get("NTRAIN", 8))
NAT_STEPS = int(os.environ.get("NAT_STEPS", 60))
FUS_STEPS = int(os.environ.get("FUS_STEPS", 60))
LR = float(os.environ.get("LR", 4e-3))
FLR = float(os.environ.get("FLR", LR))
BUDGET = int(os.environ.get("BUDGET", 4))
args = acc.parse_args(
    [
        "--scale",
        "real",
        "--train-images",
        str(NTRAIN),
        "--eval-images",
        str(NTRAIN),
        "--steps",
        str(max(1, NAT_STEPS, FUS_STEPS)),
        "--lr",
        str(LR),
        "--quiet",
    ]
)
t0 = time.time()
run = acc.Run(args)
host, tok = run.host, run.tok
print(f"built in {time.time() - t0:.0f}s", flush=True)
E = host.get_input_embeddings().weight
print(
    f"LLM embedding row norm: mean {E.norm(dim=1).mean():.3f} median {E.norm(dim=1).median():.3f}; per-elem std {E.std():.4f}"
)


def decomp(adapter, q, feats):
    fusion = adapter.fusion
    ids = [fusion.cfg.fusion.query_token_id(i) for i in range(BUDGET - 1)] + [fusion.cfg.fusion.eos_token_id]
    emb = fusion.decoder.embed_tokens.weight[ids]
    seen = {}
    h = fusion.decoder.norm.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    with torch.no_grad():
        fused_for(adapter, q, feats)
    h.remove()
    x = seen["x"]  # (T, C) packed: the last BUDGET tokens of each sample are the outputs
    n = feats.shape[0]
    per = x.shape[0] // n
    xq = x.view(n, per, -1)[:, -BUDGET:]
    print(
        f"  query/EOS embedding row norm {emb.norm(dim=1).mean():.3f}; residual before final norm at outputs: norm {xq.norm(dim=-1).mean():.3f}, across-image std {xq.std(0).norm(dim=-1).mean():.3f}",
        flush=True,
    )


def tstats(name, x):  # x: (N images, tokens, d)
    x = x.detach()
    mean_norm = x.norm(dim=-1).mean()
    std_imgs = x.std(dim=0).norm(dim=-1).mean()  # per token position: spread across images
    print(
        f"  {name}: mean token norm {mean_norm:.3f}, across-image std norm {std_imgs:.3f}, ratio {std_imgs / mean_norm:.3f}",
        flush=True,
    )


with torch.no_grad():
    tstats("connector output (untrained)", acc.connector_tokens(host, run.train_images, slice(None)))
    tstats("vision tower output", run.train_images.hidden)


def first_answer_pred(hidden, labels):
    target = labels[:, 1:]
    where = target != -100
    first = where.float().argmax(1)
    logits = host.lm_head(hidden[torch.arange(len(first)), first])
    return logits.argmax(-1), target[torch.arange(len(first)), first]


def train_loop(name, params, loss_fn, steps, lr, batches):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    losses = []
    for step in range(steps):
        b = batches[step % len(batches)]
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        loss = loss_fn(b, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if globals().get("feat_leaf") is not None:
            feat_leaf.grad = None
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss))
        if step % 10 == 9:
            print(f"  {name} step {step + 1} loss {np.mean(losses[-10:]):.3f}", flush=True)
    return losses


items = run.train_items  # 2 per image
batches = [items[i : i + 8] for i in range(0, len(items), 8)]

# --- native: overfit
CACHE = f"/tmp/overfit_lr_check_conn_{NTRAIN}_{NAT_STEPS}.pt"
if NAT_STEPS and os.path.exists(CACHE):
    host.model.connector.load_state_dict(torch.load(CACHE))
    print("native connector from", CACHE)
elif NAT_STEPS:
    conn = host.model.connector
    conn.requires_grad_(True)
    t = time.time()
    train_loop(
        "native", list(conn.parameters()), lambda b, s: run.native_loss(run.train_images, b), NAT_STEPS, LR, batches
    )
    conn.requires_grad_(False)
    print(f"native {NAT_STEPS} steps in {time.time() - t:.0f}s", flush=True)
    with torch.no_grad():
        l, ex = run.native_loss(run.train_images, items, True)
    print(f"native train loss {l:.3f}, exact {ex.float().mean():.3f}", flush=True)
    torch.save(host.model.connector.state_dict(), CACHE)
with torch.no_grad():
    feats_all = acc.connector_tokens(host, run.train_images, slice(None))
    tstats("connector output (after native)", feats_all)

adapter = run.attach(BUDGET)
adapter.train()
fusion = adapter.fusion
PROJ = os.environ.get("PROJ", "")
if PROJ == "emb":
    target = float(E.norm(dim=1).mean())
    with torch.no_grad():
        fusion.projection.weight.normal_(std=target / math.sqrt(fusion.projection.weight.numel()))
    print("projection re-initialised to the embedding norm", target)
elif PROJ == "zero":
    with torch.no_grad():
        fusion.projection.weight.zero_()


def fused_for(adapter, q, feats):
    """Fused tokens (N, n_l, d) of every image with the same question q."""
    n = feats.shape[0]
    vf = VisionFeatures(feats.flatten(0, 1), cu_seqlens_from_lengths([feats.shape[1]] * n))
    prefix = adapter.encode_features(vf)
    qs = [[fusion.question_ids(q)] for _ in range(n)]
    out = fusion.fuse(prefix, qs, n_l=BUDGET)
    return out.tokens.view(n, BUDGET, -1), prefix.tokens.view(n, -1, prefix.tokens.shape[-1])


qcol = [q for _, k, q, _ in items if k == "colour"][0]
with torch.no_grad():
    ft, pre = fused_for(adapter, qcol, feats_all)
    tstats("fusion vision prefix (init)", pre)
    tstats("fused tokens (init)", ft)
decomp(adapter, qcol, feats_all)


def grad_report(step):
    groups = {
        "input_projection": fusion.input_projection,
        "merge": fusion.merge,
        "decoder": fusion.decoder,
        "projection": fusion.projection,
    }
    s = ", ".join(
        f"{k} {torch.sqrt(sum((p.grad.float() ** 2).sum() for p in m.parameters() if p.grad is not None)):.2e}"
        for k, m in groups.items()
    )
    print(f"  grads step {step}: {s}", flush=True)


feat_leaf = feats_all.clone().requires_grad_(True)


def floss(b, step):
    f = feat_leaf if step in (0, FUS_STEPS // 2) else feats_all
    loss = run.fusion_pass(adapter, f, run.train_images, b, BUDGET)[0]
    if step in (0, FUS_STEPS // 2):
        loss.backward(retain_graph=True)
        grad_report(step)
        print(f"  d loss / d vision features norm {feat_leaf.grad.norm():.2e}", flush=True)
        feat_leaf.grad = None
        for p in fusion.parameters():
            p.grad = None
    if step % 10 == 0:
        with torch.no_grad():
            ft, pre = fused_for(adapter, qcol, feats_all)
            tstats(f"step {step} prefix", pre)
            tstats(f"step {step} fused", ft)
    return loss


t = time.time()
params = [p for p in fusion.parameters() if p.requires_grad]
losses = [] if not FUS_STEPS else train_loop(f"fusion {BUDGET}", params, floss, FUS_STEPS, FLR, batches)
print(f"fusion {FUS_STEPS} steps in {time.time() - t:.0f}s", flush=True)
adapter.eval()
with torch.no_grad():
    ft, pre = fused_for(adapter, qcol, feats_all)
    tstats("fusion vision prefix (trained)", pre)
    tstats("fused tokens (trained)", ft)
    decomp(adapter, qcol, feats_all)
    l, ex = run.fusion_pass(adapter, feats_all, run.train_images, items, BUDGET)
    print(f"fusion train loss {l:.3f}, exact {ex.float().mean():.3f}", flush=True)
    # per-image predictions
    idx = [i for i, *_ in items]
    inputs = adapter.prepare_inputs(
        tok,
        [[(q, a)] for _, _, q, a in items],
        pixel_values=run.train_images.pixel_values[idx],
        pixel_attention_mask=run.train_images.pixel_attention_mask[idx],
        n_l=BUDGET,
        padding_side="right",
    )
    labels = inputs.pop("labels")
    inputs.pop("attention_mask")
    vf = VisionFeatures(feats_all[idx].flatten(0, 1), cu_seqlens_from_lengths([feats_all.shape[1]] * len(idx)))
    with acc.precomputed_vision(adapter, vf):
        embeds = adapter.inputs_embeds(**inputs)
    pred, gold = first_answer_pred(acc.llm_hidden(host, embeds), labels)
    for (i, kind, _q, a), p, _g in zip(items, pred, gold):
        print(f"   img {i} {kind:8s} gold {a!r:10} pred {tok.decode([int(p)])!r}")
