"""Drop-in fusion in a tiny LLaVA: prefill time of the adapted model vs the unmodified one.

One random ``LlavaForConditionalGeneration`` with LLaVA-1.5's geometry (CLIP 336 px / patch 14,
a 24x24 grid: 576 image tokens per image, penultimate layer, CLS dropped) but narrow widths,
and a prompt ``USER: <image>\\n{question} ASSISTANT:``. Rows, all timed in the same run:

* ``llava``     : the unmodified host, ``host(input_ids, pixel_values)`` with 576 image tokens
                  (vision tower, multi_modal_projector, LLM): the baseline of every ratio;
* ``fused n_l`` : :class:`fusedvlm.adapters.llava.LlavaFusionAdapter` on the same host, n_l in
                  ``--n-l`` (default 16, 64, 256): vision tower, fusion module (merge to 145
                  tokens, fusion decoder over [V | question | queries], projection), LLM over
                  n_l fused tokens.

Prefill = one forward over the whole prompt with ``use_cache=True`` and only the last
position's logits (what generate's first step does). Every call is timed once per round, the
rounds interleave all rows (a load spike on a shared machine then hits every row alike), and
the medians over rounds are reported. Columns: ``llm_tokens`` (prompt length the LLM sees),
``prefill_ms`` (median; ``prefill_min_ms`` the fastest round) and ``vs_llava`` (baseline
median / row median, > 1 is faster),
and the split: ``vision_ms`` (host vision tower, plus the projector for ``llava``), ``fusion_ms``
(fusion module) and ``llm_ms`` (the LLM alone on precomputed embeddings).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_dropin.py
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from fusedvlm.benchmark.system import environment, print_table, save_json, time_fn

IMAGE_ID = 260
QUESTION = "What is the man holding in his left hand?"
COLUMNS = ["model", "n_l", "llm_tokens", "prefill_ms", "prefill_min_ms", "vs_llava", "vision_ms", "fusion_ms", "llm_ms"]


def build(args, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from fusedvlm.config import FusionConfig
    from fusedvlm.model.llm import byte_tokenizer

    vision = CLIPVisionConfig(
        hidden_size=args.vision_width,
        intermediate_size=4 * args.vision_width,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_width // 64,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=261,
        hidden_size=args.llm_width,
        intermediate_size=int(2.75 * args.llm_width),
        num_hidden_layers=args.llm_layers,
        num_attention_heads=args.llm_width // 64,
        num_key_value_heads=args.llm_width // 64,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=259,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        host = LlavaForConditionalGeneration(
            LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID)
        )
    host = host.to(dtype).eval()
    fusion = FusionConfig(
        hidden_size=args.fusion_width,
        intermediate_size=4 * args.fusion_width,
        num_layers=args.fusion_layers,
        num_heads=args.fusion_width // 64,
        num_kv_heads=args.fusion_width // 64,
        max_queries=max(args.n_l) - 1,
    )
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return host, fusion, tok


def run(args) -> dict:
    from fusedvlm.adapters.llava import LlavaFusionAdapter

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    host, fusion_cfg, tok = build(args, device, dtype)
    torch.manual_seed(args.seed + 1)
    pixels = torch.randn(1, 3, 336, 336, device=device, dtype=dtype)
    lm = host.model.language_model

    # Every (row, metric) -> the call to time; built first so that the timing rounds interleave them.
    calls: dict[tuple[str, str], object] = {}
    rows = []
    # The host's own path: the same llava prompt as the adapters', with 576 image tokens.
    prompt = LlavaFusionAdapter.default_prompt.layout(tok).question(QUESTION, 576, True)
    ids = torch.tensor([[IMAGE_ID if f else i for i, f in zip(prompt.ids, prompt.fused)]], device=device)
    mask = torch.ones_like(ids)
    embeds = host.get_input_embeddings()(ids).detach()
    rows.append(dict(model="llava", n_l=None, llm_tokens=ids.shape[1]))
    calls["llava", "prefill_ms"] = lambda: host(
        input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True, logits_to_keep=1
    )
    calls["llava", "vision_ms"] = lambda: host.model.get_image_features(pixel_values=pixels)
    calls["llava", "llm_ms"] = lambda e=embeds, m=mask: lm(inputs_embeds=e, attention_mask=m, use_cache=True)
    fusion_params = 0
    for n_l in args.n_l:
        torch.manual_seed(args.seed + 2)
        adapter = LlavaFusionAdapter.attach(host, fusion_cfg, n_l=n_l)
        fusion_params = sum(p.numel() for p in adapter.fusion.parameters())
        inputs = {k: v.to(device) for k, v in adapter.prepare_inputs(tok, [(QUESTION, None)], pixels).items()}
        fq = (inputs["fusion_question_ids"], inputs["fusion_cu_seqlens"])
        with torch.no_grad():
            feats, cu = adapter.vision_features(pixels)
            fused_embeds = adapter.inputs_embeds(inputs["input_ids"], pixels, *fq)
        name = f"fused {n_l}"
        rows.append(dict(model="fused", n_l=n_l, llm_tokens=inputs["input_ids"].shape[1]))
        calls[name, "prefill_ms"] = lambda a=adapter, i=inputs: a(**i, use_cache=True, logits_to_keep=1)
        calls[name, "vision_ms"] = lambda a=adapter: a.vision_features(pixels)
        calls[name, "fusion_ms"] = lambda a=adapter, f=feats, c=cu, q=fq: a.fusion(f, c, *q)
        calls[name, "llm_ms"] = lambda e=fused_embeds, m=inputs["attention_mask"]: lm(
            inputs_embeds=e, attention_mask=m, use_cache=True
        )

    # Interleaved rounds: on a shared machine a load spike then hits every row alike.
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    with torch.no_grad():
        for r in range(args.rounds):
            for key, fn in calls.items():
                samples[key].append(
                    time_fn(
                        fn, name=" ".join(key), warmup=args.warmup if r == 0 else 0, repeats=1, device=device
                    ).median_ms
                )
    for row in rows:
        name = "llava" if row["model"] == "llava" else f"fused {row['n_l']}"
        for metric in ("prefill_ms", "vision_ms", "fusion_ms", "llm_ms"):
            row[metric] = statistics.median(samples[name, metric]) if (name, metric) in samples else None
        row["prefill_min_ms"] = min(samples[name, "prefill_ms"])
        row["vs_llava"] = rows[0]["prefill_ms"] / row["prefill_ms"]
    return dict(
        rows=rows,
        samples={" ".join(k): v for k, v in samples.items()},
        params=dict(host=sum(p.numel() for p in host.parameters()), fusion=fusion_params),
    )


def main(argv: list[str] | None = None) -> int:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-l", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--llm-width", type=int, default=512)
    p.add_argument("--llm-layers", type=int, default=8)
    p.add_argument("--fusion-width", type=int, default=128)
    p.add_argument("--fusion-layers", type=int, default=2)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds; each times every call once, interleaved")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also save the results as JSON here")
    args = p.parse_args(argv)
    env = environment()
    result = run(args)
    title = (
        f"drop-in fusion in a tiny LLaVA (24x24 grid, 576 image tokens), one question, {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} threads; vs_llava = unmodified prefill time / row time"
    )
    print_table(result["rows"], COLUMNS, title)
    print(
        f"parameters: host {result['params']['host'] / 1e6:.1f} M, fusion module {result['params']['fusion'] / 1e6:.2f} M"
    )
    if args.out:
        save_json(args.out, dict(env=env, args=vars(args), **result))
        print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
