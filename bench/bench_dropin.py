"""Drop-in fusion vs the host's native path and training-free token reduction, on one host family.

``--host`` picks a host built from its transformers config classes with random weights, at the
released model's shapes (``--scale tiny`` shrinks every width and depth, for a smoke test):

* ``smolvlm``: SmolVLM-256M-Instruct (SigLIP-B/16 at 512 px, pixel shuffle x4, SmolLM2-135M);
  one 1024x1024 image = 2x2 tiles + a global view = 5 x 64 = 320 native tokens (the image
  processor's longest edge is 1024 here, not the released 2048, which makes 17 views);
* ``qwen2_vl``: Qwen2-VL-2B-Instruct (675M vision tower, 2x2 merger, 1.5B LLM) and
  ``qwen2_5_vl``: Qwen2.5-VL-3B-Instruct (its window-attention tower, 3B LLM); one 448x448
  image = a 32x32 patch grid = 256 native tokens;
* ``llava_onevision``: LLaVA-OneVision-0.5B (SigLIP-so400m at 384 px, AnyRes, Qwen2-0.5B); one
  384x384 image = base view + 1 tile = 2 x 729 tokens, packed by the host (unpadding, a
  newline per row) into its native count.

The image token id is the test tokenizer's ``<image>`` (the prompt only needs the right
lengths: a byte-level tokenizer with ChatML, one question). Rows, all in the same run:

* ``native``: the host's own vision path (``get_image_features``) and every token it makes;
* ``fusion n``: :mod:`fusedvlm.adapters` with n_l = n (a fusion decoder of ``--fusion-width``/
  ``--fusion-layers``, random weights: timing only);
* ``fastv n``: FastV-style (:func:`fusedvlm.adapters.baselines.fastv_keep`, K = ``--fastv-k``):
  a ranking pass of the first K+1 LLM layers over the native prompt (eager attention, timed as
  reduction), then the whole LLM over the prompt with n image tokens at their original
  positions. FastV proper shares layers < K between the two, so its prefill is shorter by
  K layers over the pruned prompt;
* ``visionzip n``: VisionZip-style (:func:`fusedvlm.adapters.baselines.visionzip`) on the
  adapter's per-view features, dominance scored by
  :func:`~fusedvlm.adapters.baselines.attention_received` over those features (the families
  do not expose the vision tower's attention maps alike), n tokens in all.

Columns: ``visual`` (visual tokens reaching the LLM), ``llm_tokens`` (prompt length),
``vision_ms`` (native: ``get_image_features``; the others: the adapter's ``vision_features``,
which stops before any packing), ``reduce_ms`` (fusion module / ranking pass + selection /
scoring + merging), ``prefill_ms`` (the host on the final prompt embeddings, ``use_cache``,
last logits only), ``ttft_ms`` = vision + reduce + prefill, ``decode_tps`` (greedy steps on the
prefill's KV cache), ``kv_mb`` (the prompt's KV cache), ``peak_mb`` (in the warm-up round; CUDA: max allocated;
CPU: growth of the process RSS during reduce + prefill + decode, an upper bound) and ``vs_native``
(native TTFT / row TTFT, > 1 is faster). Medians over ``--rounds`` rounds that interleave
every call, after a warm-up round, so a load spike on a shared machine hits every row alike.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_dropin.py --host smolvlm
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types

import numpy as np
import torch

from fusedvlm.benchmark.system import (
    PeakMemory,
    _rss_bytes,
    environment,
    kv_bytes_per_position,
    print_table,
    save_json,
    sync,
)

IMAGE_ID = 262
QUESTION = "What is the man holding in his left hand?"
COLUMNS = [
    "row",
    "visual",
    "llm_tokens",
    "vision_ms",
    "reduce_ms",
    "prefill_ms",
    "ttft_ms",
    "vs_native",
    "decode_tps",
    "kv_mb",
    "peak_mb",
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer():
    from fusedvlm.model.llm import byte_tokenizer

    tok = byte_tokenizer()
    # SmolVLM's tokenizer has its image markers as single tokens (written by the idefics3 adapter).
    markers = ["<fake_token_around_image>", "<global-img>"]
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", *markers]})
    tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    return tok


def _shrink(cfg: dict, tiny: bool, **small) -> dict:
    return {**cfg, **small} if tiny else cfg


# The --scale tiny text and vision towers every family shares (a quick smoke test).
TINY_TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def smolvlm(tiny: bool):
    from transformers import Idefics3ImageProcessor, SmolVLMConfig, SmolVLMForConditionalGeneration

    text = _shrink(
        dict(
            model_type="llama",
            vocab_size=49280,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
        tiny,
        **TINY_TEXT,
    )
    vision = _shrink(
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        tiny,
        **TINY_VISION,
    )
    vision.update(image_size=512, patch_size=16)
    cfg = SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=4, image_token_id=IMAGE_ID)
    # The released processor resizes to a 2048-px longest edge (16 tiles + global = 1088 tokens);
    # 1024 keeps the CPU run short and the native count above the largest budget.
    processor = Idefics3ImageProcessor(size={"longest_edge": 1024}, max_image_size={"longest_edge": 512})
    return SmolVLMForConditionalGeneration(cfg), processor, (1024, 1024)


def _qwen_text(tiny: bool, hidden: int, mlp: int, layers: int, heads: int) -> dict:
    return _shrink(
        dict(
            vocab_size=151936,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            rope_theta=1e6,
            tie_word_embeddings=True,
            rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]),
        ),
        tiny,
        **TINY_TEXT,
        rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]),
    )


def _qwen(config_cls, model_cls, text: dict, vision: dict, tiny: bool):
    """A Qwen2-VL-family host: its ids, its processor, and the image size (tiny: 224 px, a 16x16
    patch grid, 64 native tokens, a quick smoke test)."""
    from transformers import Qwen2VLImageProcessor

    cfg = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_ID,
        video_token_id=263,
        vision_start_token_id=264,
        vision_end_token_id=265,
    )
    processor = Qwen2VLImageProcessor(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
    )
    return model_cls(cfg), processor, (224, 224) if tiny else (448, 448)


def qwen2_5_vl(tiny: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = _shrink(
        dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        tiny,
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        fullatt_block_indexes=[1],
    )
    vision.update(patch_size=14, window_size=112, spatial_merge_size=2, temporal_patch_size=2)
    text = _qwen_text(tiny, 2048, 11008, 36, 16)
    return _qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, text, vision, tiny)


def qwen2_vl(tiny: bool):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = _shrink(
        dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16),
        tiny,
        depth=2,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
    )
    vision.update(patch_size=14, mlp_ratio=4, spatial_merge_size=2, temporal_patch_size=2)
    text = _qwen_text(tiny, 1536, 8960, 28, 12)
    return _qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration, text, vision, tiny)


def llava_onevision(tiny: bool):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor

    text = _shrink(
        dict(
            model_type="qwen2",
            vocab_size=152000,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rope_theta=1e6,
            tie_word_embeddings=True,
        ),
        tiny,
        **TINY_TEXT,
    )
    vision = _shrink(
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
        tiny,
        **TINY_VISION,
    )
    vision.update(model_type="siglip_vision_model", image_size=384, patch_size=14)
    pinpoints = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]
    cfg = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_ID,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    processor = LlavaOnevisionImageProcessor(
        size={"height": 384, "width": 384}, crop_size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints
    )
    return LlavaOnevisionForConditionalGeneration(cfg), processor, (384, 384)


HOSTS = {"smolvlm": smolvlm, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "llava_onevision": llava_onevision}


def native_features(host, family: str, vision: dict) -> torch.Tensor:
    """The tokens the host's own path puts in front of its LLM, (N, d_llm)."""
    model = host.model
    if family == "llava_onevision":
        out = model.get_image_features(
            vision["pixel_values"],
            vision["image_sizes"],
            vision_feature_layer=host.config.vision_feature_layer,
            vision_feature_select_strategy=host.config.vision_feature_select_strategy,
            vision_aspect_ratio=host.config.vision_aspect_ratio,
        )
    else:
        out = model.get_image_features(**vision)
    return torch.cat(list(out.pooler_output)).reshape(-1, host.config.get_text_config().hidden_size)


class Bench:
    def __init__(self, args):
        from fusedvlm.adapters import adapter_for
        from fusedvlm.config import FusionConfig

        torch.manual_seed(args.seed)
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        host, processor, (h, w) = HOSTS[args.host](args.scale == "tiny")
        self.host = host.to(self.device, self.dtype).eval()
        self.cls = adapter_for(self.host)
        self.tok = tokenizer()
        rng = np.random.default_rng(args.seed)
        from PIL import Image

        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        processed = processor(images=[[image]] if self.cls.family == "idefics3" else [image], return_tensors="pt")
        self.vision = {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in processed.items()
            if k in self.cls.vision_inputs
        }
        width = 64 if args.scale == "tiny" else args.fusion_width
        self.fusion_cfg = FusionConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_layers=2 if args.scale == "tiny" else args.fusion_layers,
            num_heads=max(1, width // 64),
            num_kv_heads=max(1, width // 64),
            max_queries=max(args.budgets) - 1,
        )
        self.text_cfg = self.host.config.get_text_config()
        torch.manual_seed(args.seed + 1)
        self.adapter = self.cls.attach(self.host, self.fusion_cfg, n_l=max(args.budgets))
        self.kv_per_token = kv_bytes_per_position(types.SimpleNamespace(config=self.text_cfg), self.dtype)

    # ---------------------------------------------------------------- prompts
    def prompt(self, n_image: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The adapter's layout: the host's image markers, as text (Idefics3's) or ids (Qwen's).
        ids, _ = self.adapter.host_tokens(self.adapter.layout(self.tok).question(QUESTION, n_image, True))
        ids = torch.tensor([ids], device=self.device)
        return ids, ids[0] == IMAGE_ID

    def embeds(self, ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        e = self.host.get_input_embeddings()(ids)
        return e.masked_scatter((ids == IMAGE_ID)[..., None], visual.to(e.dtype))

    # ---------------------------------------------------------------- LLM phases
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor):
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        return self.host(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )

    def decode(self, out, positions: torch.Tensor, steps: int) -> None:
        cache, last = out.cache, int(positions[0, -1])
        length = positions.shape[1]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            mask = torch.ones(1, length + i + 1, dtype=torch.long, device=self.device)
            pos = torch.tensor([[last + 1 + i]], device=self.device)
            step = self.host(input_ids=token, cache=cache, attention_mask=mask, position_ids=pos, use_cache=True)
            cache, token = step.cache, step.logits[:, -1].argmax(-1, keepdim=True)

    def fastv_rank(self, embeds: torch.Tensor, positions: torch.Tensor, image_mask: torch.Tensor, budget: int):
        """Attention at LLM layer K over the native prompt (only layers 0..K run) -> kept image positions."""
        from fusedvlm.adapters.baselines import fastv_keep

        lm = (
            self.host.model.language_model if hasattr(self.host.model, "language_model") else self.host.model.text_model
        )
        k = self.args.fastv_k
        if not 0 <= k < len(lm.layers):
            raise SystemExit(f"--fastv-k {k} is not a layer of the {len(lm.layers)}-layer LLM")
        layers, impl = lm.layers, lm.config._attn_implementation
        lm.layers = torch.nn.ModuleList(list(layers)[: k + 1])
        lm.config._attn_implementation = "eager"  # the attention probabilities are needed
        try:
            out = lm(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
                position_ids=positions,
                use_cache=False,
                output_attentions=True,
            )
        finally:
            lm.layers, lm.config._attn_implementation = layers, impl
        return fastv_keep(out.attentions[k][0], image_mask, budget)

    # ---------------------------------------------------------------- rows
    def build_rows(self):
        from fusedvlm.adapters.baselines import attention_received, visionzip

        args, rows = self.args, {}
        native = native_features(self.host, self.cls.family, self.vision)
        n_native = native.shape[0]
        ids, image_mask = self.prompt(n_native)
        pos = torch.arange(ids.shape[1], device=self.device)[None]
        native_embeds = self.embeds(ids, native)
        rows["native"] = dict(
            visual=n_native,
            vision=lambda: native_features(self.host, self.cls.family, self.vision),
            reduce=None,
            embeds=native_embeds,
            positions=pos,
        )
        adapter_vision = lambda: self.adapter.vision_features(**self.vision)  # noqa: E731
        feats = adapter_vision()
        for n in args.budgets:
            inputs = self.adapter.prepare_inputs(self.tok, [(QUESTION, None)], n_l=n, **self.vision)
            qs = self.adapter.fusion.split_questions(
                inputs["fusion_question_ids"], inputs["fusion_cu_seqlens"], None, 1
            )
            fids = inputs["input_ids"].to(self.device)

            def fuse(n=n, qs=qs):
                return self.adapter.fusion.fuse(self.adapter.encode_features(feats), qs, n_l=n).tokens

            with torch.no_grad():
                fused_embeds = self.embeds(fids, fuse())
            rows[f"fusion {n}"] = dict(
                visual=n,
                vision=adapter_vision,
                reduce=fuse,
                embeds=fused_embeds,
                positions=torch.arange(fids.shape[1], device=self.device)[None],
            )
        for n in args.budgets:
            if n > n_native:
                continue

            def rank(n=n):
                return self.fastv_rank(native_embeds, pos, image_mask, n)

            kept = rank()
            keep = ~image_mask
            keep[kept] = True
            rows[f"fastv {n}"] = dict(
                visual=n, vision=None, reduce=rank, embeds=native_embeds[:, keep], positions=pos[:, keep]
            )
        per_view = feats.tokens
        for n in args.budgets:
            if n > per_view.shape[0]:
                continue

            def zip_(n=n):
                return visionzip(per_view, attention_received(per_view), n)

            zids, _ = self.prompt(n)
            rows[f"visionzip {n}"] = dict(
                visual=n,
                vision=adapter_vision,
                reduce=zip_,
                embeds=self.embeds(zids, zip_()),
                positions=torch.arange(zids.shape[1], device=self.device)[None],
            )
        rows["_adapter_vision"] = adapter_vision
        return rows

    def run(self) -> dict:
        args = self.args
        with torch.no_grad():
            rows = self.build_rows()
            adapter_vision = rows.pop("_adapter_vision")
            native_vision = rows["native"]["vision"]
            samples: dict[str, dict[str, list[float]]] = {name: {} for name in rows}
            vision_samples: dict[str, list[float]] = {"native": [], "adapter": []}

            def clock(fn) -> float:
                sync(self.device)
                t = time.perf_counter()
                fn()
                sync(self.device)
                return (time.perf_counter() - t) * 1e3

            peaks = {}
            for r in range(args.rounds + 1):  # round 0 warms up every call and records peak memory
                vision_samples["native"].append(clock(native_vision))
                vision_samples["adapter"].append(clock(adapter_vision))
                for name, row in rows.items():
                    s = samples[name]
                    before = _rss_bytes() if self.device.type == "cpu" else 0
                    with PeakMemory(self.device) if r == 0 else contextlib.nullcontext() as pm:
                        if row["reduce"] is not None:
                            s.setdefault("reduce", []).append(clock(row["reduce"]))
                        holder = {}
                        s.setdefault("prefill", []).append(
                            clock(lambda row=row, h=holder: h.update(out=self.prefill(row["embeds"], row["positions"])))
                        )
                        s.setdefault("decode", []).append(
                            clock(lambda row=row, h=holder: self.decode(h["out"], row["positions"], args.decode_steps))
                        )
                    if r == 0:
                        peaks[name] = (pm.peak_bytes - before) / 2**20

        def med(xs):
            return statistics.median(xs[1:])

        table = []
        for name, row in rows.items():
            s = samples[name]
            # FastV prunes the host's own tokens, so it pays the host's vision path.
            native_path = name == "native" or name.startswith("fastv")
            vision = med(vision_samples["native" if native_path else "adapter"])
            reduce = med(s["reduce"]) if "reduce" in s else 0.0
            prefill = med(s["prefill"])
            table.append(
                dict(
                    row=name,
                    visual=row["visual"],
                    llm_tokens=row["embeds"].shape[1],
                    vision_ms=vision,
                    reduce_ms=reduce if "reduce" in s else None,
                    prefill_ms=prefill,
                    ttft_ms=vision + reduce + prefill,
                    decode_tps=args.decode_steps / (med(s["decode"]) / 1e3),
                    kv_mb=self.kv_per_token * row["embeds"].shape[1] / 2**20,
                    peak_mb=peaks[name],
                )
            )
        for t in table:
            t["vs_native"] = table[0]["ttft_ms"] / t["ttft_ms"]
        params = dict(
            host=sum(p.numel() for p in self.host.parameters()),
            fusion=sum(p.numel() for p in self.adapter.fusion.parameters()),
        )
        return dict(rows=table, samples=samples, vision_samples=vision_samples, params=params)


def main(argv: list[str] | None = None) -> int:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", choices=sorted(HOSTS), required=True)
    p.add_argument("--scale", choices=["real", "tiny"], default="real", help="tiny: a smoke test of the script")
    p.add_argument("--budgets", type=int, nargs="+", default=[16, 64, 256], help="n_l and the baselines' budgets")
    p.add_argument("--fusion-width", type=int, default=512)
    p.add_argument("--fusion-layers", type=int, default=6)
    p.add_argument("--fastv-k", type=int, default=2, help="FastV's layer K (the paper's default)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round, interleaved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also save the results as JSON here")
    args = p.parse_args(argv)
    env = environment(args.device)
    start = time.perf_counter()
    result = Bench(args).run()
    title = (
        f"drop-in comparison on {args.host} ({args.scale} shapes, random weights), one image, one question, "
        f"{args.device} {args.dtype}, {torch.get_num_threads()} threads; vs_native = native TTFT / row TTFT"
    )
    print_table(result["rows"], COLUMNS, title)
    print(
        f"parameters: host {result['params']['host'] / 1e6:.1f} M, fusion module {result['params']['fusion'] / 1e6:.1f} M;"
        f" {time.perf_counter() - start:.0f} s"
    )
    if args.out:
        save_json(args.out, dict(env=env, args=vars(args), **result))
        print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
