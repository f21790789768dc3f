#!/usr/bin/env python3
"""Write a random-weight checkpoint in the authors' (tensorfusionvlm) on-disk format, at the
paper's shapes by default: Llama-2-7B + CLIP ViT-L/14-336 + a 20-layer 1024-wide fusion decoder,
n_l = 256, n_s = 8, HD-9 (about 14.8 GB in bf16).

What makes it "their format" is taken from the parity fixture that their own code saved
(tests/fixtures/upstream/tiny-llama2/checkpoint, see tools/upstream_oracle.py): their
config.json with the shape fields rewritten, their tensor names, their tokenizer layout (the
offline Llama-2-style LLM tokenizer, clip/ with one ``<|placeholder_qed_i|>`` per query) and
preprocessor_config.json. Weights are sharded like ``save_pretrained`` (safetensors or
``pytorch_model-*.bin`` with an index).

Streamed: a safetensors shard is written one tensor at a time (header first, from the shapes),
so writing needs about one tensor of memory; a ``.bin`` shard is one ``torch.save`` and holds
that shard (keep --shard-gb small for it).

Weights: norms 1, biases 0, everything else N(0, 0.02) from a seeded generator (reproducible).
The LLM's output rows past the tokenizer's vocabulary are zero, so greedy answers stay
inside what the tokenizer can decode (the random rows' maximum is positive almost surely).

    python tools/make_upstream_checkpoint.py OUT_DIR                       # paper size, safetensors
    python tools/make_upstream_checkpoint.py OUT_DIR --weights bin --shard-gb 1
    python tools/make_upstream_checkpoint.py OUT_DIR --llm-width 512 --llm-layers 4 ...   # scaled down
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from fusedvlm.weights import write_safetensors

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "upstream" / "tiny-llama2" / "checkpoint"
VISION = "imgque_backbone.clip_model.vision_model."
FUSION = "imgque_backbone.imgque_model."
PROJ = "fusion_backbone.imgque_proj.weight"
LLM = "llm_backbone."
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("out", type=Path, help="directory to write (must not exist)")
    p.add_argument("--weights", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB (save_pretrained's default: 5)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="saved dtype (theirs: bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-l", type=int, default=256)
    p.add_argument("--n-s", type=int, default=8)
    p.add_argument("--num-crops", type=int, default=9, help="HD-N")
    p.add_argument("--vision-width", type=int, default=1024)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--vision-heads", type=int, default=16)
    p.add_argument("--vision-mlp", type=int, default=4096)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--fusion-width", type=int, default=1024)
    p.add_argument("--fusion-layers", type=int, default=20)
    p.add_argument("--fusion-heads", type=int, default=16)
    p.add_argument("--fusion-mlp", type=int, default=4096)
    p.add_argument("--llm-width", type=int, default=4096)
    p.add_argument("--llm-layers", type=int, default=32)
    p.add_argument("--llm-heads", type=int, default=32)
    p.add_argument("--llm-kv-heads", type=int, default=32)
    p.add_argument("--llm-mlp", type=int, default=11008)
    p.add_argument("--llm-vocab", type=int, default=32000)
    p.add_argument("--template-from", type=Path, default=FIXTURE, help="a checkpoint their code saved (layout source)")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists; pick a new directory")
    if not 1 <= args.n_s <= args.n_l:
        p.error(f"need 1 <= --n-s <= --n-l, got {args.n_s}, {args.n_l}")
    for name in ("vision", "fusion", "llm"):
        width, heads = getattr(args, f"{name}_width"), getattr(args, f"{name}_heads")
        if width % heads:
            p.error(f"--{name}-width {width} is not a multiple of --{name}-heads {heads}")
    if args.shard_gb <= 0:
        p.error("--shard-gb must be positive")
    return args


def clip_tokenizer(src: Path, dst: Path, n_queries: int) -> int:
    """Copy their clip/ folder with exactly ``n_queries`` placeholder tokens; the number of
    fusion embedding rows it needs."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(f, dst / f.name)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    kept = [t for t in tok["added_tokens"] if not t["content"].startswith("<|placeholder_qed_")]
    template = next(t for t in tok["added_tokens"] if t["content"].startswith("<|placeholder_qed_"))
    next_id = max([t["id"] for t in kept] + [len(tok["model"]["vocab"]) - 1]) + 1
    added = [dict(template, id=next_id + i, content=f"<|placeholder_qed_{i}|>") for i in range(n_queries)]
    tok["added_tokens"] = kept + added
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    conf_path = src / "tokenizer_config.json"
    if conf_path.is_file():
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in conf:
            entry = {k: v for k, v in template.items() if k not in ("id", "content")}
            conf["added_tokens_decoder"] = {str(t["id"]): {**entry, "content": t["content"]} for t in kept + added}
        (dst / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False), encoding="utf-8")
    return next_id + n_queries


def config_json(template: dict, a, fusion_vocab: int) -> dict:
    c = copy.deepcopy(template)
    c["length_que_end"] = c["imgque_config"]["length_que_end"] = a.n_l
    c["length_que_end_short"] = c["imgque_config"]["length_que_end_short"] = a.n_s
    c["hidden_size"] = a.llm_width
    iq = c["imgque_config"]
    iq["hidden_size"] = iq["projection_dim"] = a.fusion_width
    iq["vocab_size"] = fusion_vocab
    f = iq["imgque_config"]
    f.update(
        hidden_size=a.fusion_width,
        intermediate_size=a.fusion_mlp,
        num_hidden_layers=a.fusion_layers,
        num_attention_heads=a.fusion_heads,
        num_key_value_heads=a.fusion_heads,
        head_dim=a.fusion_width // a.fusion_heads,
        vocab_size=fusion_vocab,
    )
    v = iq["vision_config"]
    v.update(
        hidden_size=a.vision_width,
        vembed_hidden_size=a.vision_width,
        projection_dim=a.vision_width,
        intermediate_size=a.vision_mlp,
        num_hidden_layers=a.vision_layers,
        num_attention_heads=a.vision_heads,
        patch_size=a.patch_size,
        image_size=336,
    )
    llm = c["llm_config"]
    llm.update(
        hidden_size=a.llm_width,
        intermediate_size=a.llm_mlp,
        num_hidden_layers=a.llm_layers,
        num_attention_heads=a.llm_heads,
        num_key_value_heads=a.llm_kv_heads,
        head_dim=a.llm_width // a.llm_heads,
        vocab_size=a.llm_vocab,
    )
    # What their training scripts record for the Llama-2 chat LLM (the converter reads the template from it).
    llm["_name_or_path"] = "meta-llama/Llama-2-7b-chat-hf"
    c["torch_dtype"] = str(DTYPES[a.dtype]).removeprefix("torch.")
    return c


def tensor_specs(a, fusion_vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) in their state-dict order; init is "one", "zero" or "normal"."""
    specs = []
    w, m = a.vision_width, a.vision_mlp
    grid = 336 // a.patch_size
    specs += [
        (VISION + "embeddings.class_embedding", (w,), "normal"),
        (VISION + "embeddings.patch_embedding.weight", (w, 3, a.patch_size, a.patch_size), "normal"),
        (VISION + "embeddings.position_embedding.weight", (grid * grid + 1, w), "normal"),
        (VISION + "pre_layrnorm.weight", (w,), "one"),
        (VISION + "pre_layrnorm.bias", (w,), "zero"),
    ]
    for i in range(a.vision_layers):
        h = VISION + f"encoder.layers.{i}."
        for x in ("q", "k", "v", "out"):
            specs += [
                (h + f"self_attn.{x}_proj.weight", (w, w), "normal"),
                (h + f"self_attn.{x}_proj.bias", (w,), "zero"),
            ]
        for n in ("layer_norm1", "layer_norm2"):
            specs += [(h + f"{n}.weight", (w,), "one"), (h + f"{n}.bias", (w,), "zero")]
        specs += [
            (h + "mlp.fc1.weight", (m, w), "normal"),
            (h + "mlp.fc1.bias", (m,), "zero"),
            (h + "mlp.fc2.weight", (w, m), "normal"),
            (h + "mlp.fc2.bias", (w,), "zero"),
        ]
    specs += [
        (VISION + "pos_layrnorm.weight", (w,), "one"),
        (VISION + "pos_layrnorm.bias", (w,), "zero"),
        (VISION + "token_LF", (1, 1, w), "normal"),
        (VISION + "vision_embed_merge.weight", (w, w, 3, 3), "normal"),
    ]
    fw, fm = a.fusion_width, a.fusion_mlp
    specs.append((FUSION + "embed_tokens.weight", (fusion_vocab, fw), "normal"))
    for i in range(a.fusion_layers):
        specs += _llama_layer(FUSION + f"layers.{i}.", fw, fm, fw)
    specs.append((FUSION + "norm.weight", (fw,), "one"))
    specs.append((PROJ, (a.llm_width, fw), "normal"))
    lw = a.llm_width
    kv = a.llm_kv_heads * (lw // a.llm_heads)
    specs.append((LLM + "model.embed_tokens.weight", (a.llm_vocab, lw), "normal"))
    for i in range(a.llm_layers):
        specs += _llama_layer(LLM + f"model.layers.{i}.", lw, a.llm_mlp, kv)
    specs.append((LLM + "model.norm.weight", (lw,), "one"))
    specs.append((LLM + "lm_head.weight", (a.llm_vocab, lw), "normal"))
    return specs


def _llama_layer(h: str, width: int, mlp: int, kv: int) -> list:
    return [
        (h + "self_attn.q_proj.weight", (width, width), "normal"),
        (h + "self_attn.k_proj.weight", (kv, width), "normal"),
        (h + "self_attn.v_proj.weight", (kv, width), "normal"),
        (h + "self_attn.o_proj.weight", (width, width), "normal"),
        (h + "mlp.gate_proj.weight", (mlp, width), "normal"),
        (h + "mlp.up_proj.weight", (mlp, width), "normal"),
        (h + "mlp.down_proj.weight", (width, mlp), "normal"),
        (h + "input_layernorm.weight", (width,), "one"),
        (h + "post_attention_layernorm.weight", (width,), "one"),
    ]


class RandomTensor:
    """A tensor made only when its bytes are written (write_safetensors takes any object with
    dtype, shape and ``write_to``), so a shard never exists in memory."""

    def __init__(self, index: int, shape, init: str, dtype: torch.dtype, seed: int, zero_rows_from: int | None):
        self.index, self.shape, self.init, self.dtype, self.seed = index, tuple(shape), init, dtype, seed
        self.zero_rows_from = zero_rows_from

    def make(self) -> torch.Tensor:
        if self.init == "one":
            return torch.ones(self.shape, dtype=self.dtype)
        if self.init == "zero":
            return torch.zeros(self.shape, dtype=self.dtype)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        t = torch.empty(self.shape, dtype=self.dtype).normal_(0.0, 0.02, generator=gen)
        if self.zero_rows_from is not None:
            t[self.zero_rows_from :] = 0
        return t

    def write_to(self, out) -> None:
        t = self.make()
        out.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def main(argv=None) -> int:
    a = parse_args(argv)
    src = a.template_from
    dtype = DTYPES[a.dtype]
    tmp = a.out.with_name(a.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fusion_vocab = clip_tokenizer(src / "clip", tmp / "clip", a.n_l - 1)
    template = json.loads((src / "config.json").read_text(encoding="utf-8"))
    (tmp / "config.json").write_text(json.dumps(config_json(template, a, fusion_vocab), indent=2), encoding="utf-8")
    pre = json.loads((src / "preprocessor_config.json").read_text(encoding="utf-8"))
    pre["num_crops"] = a.num_crops
    (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
    llm_tokens = len(json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    if llm_tokens > a.llm_vocab:
        raise SystemExit(f"--llm-vocab {a.llm_vocab} is smaller than the LLM tokenizer's {llm_tokens} tokens")

    specs = tensor_specs(a, fusion_vocab)
    limit = int(a.shard_gb * 1e9)
    shards, current, size = [], [], 0
    for i, (name, shape, init) in enumerate(specs):
        nbytes = math.prod(shape) * dtype.itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        zero_from = llm_tokens if name == LLM + "lm_head.weight" else None
        current.append((name, RandomTensor(i, shape, init, dtype, a.seed, zero_from)))
        size += nbytes
    shards.append(current)

    total = sum(math.prod(s) * dtype.itemsize for _, s, _ in specs)
    stem, ext = ("model", "safetensors") if a.weights == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for n, shard in enumerate(shards):
        fname = f"{stem}-{n + 1:05d}-of-{len(shards):05d}.{ext}" if len(shards) > 1 else f"{stem}.{ext}"
        if a.weights == "safetensors":
            write_safetensors(str(tmp / fname), dict(shard), metadata={"format": "pt"})
        else:
            torch.save({k: t.make() for k, t in shard}, tmp / fname)
        weight_map.update(dict.fromkeys((k for k, _ in shard), fname))
        print(f"wrote {fname} ({len(shard)} tensors)", flush=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    os.replace(tmp, a.out)
    n_params = sum(math.prod(s) for _, s, _ in specs)
    print(f"{a.out}: {n_params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB in {a.dtype}, {len(shards)} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
