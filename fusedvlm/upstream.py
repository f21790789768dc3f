"""Convert the authors' released checkpoints (``tensorfusionvlm``, ModelScope
``LiTenghui/scalingcapabilitytokenspace``) into a fusedvlm model directory.

Their directory is a Hugging Face ``save_pretrained`` of ``ImageMultiQueryCLIPLLMModel``:
``config.json`` (``model_type`` ``modeling_query_adapt_clip_llm``), weights (safetensors or
``pytorch_model*.bin``, sharded with an index or not), the LLM tokenizer at the top level, the
CLIP tokenizer in ``clip/`` and ``preprocessor_config.json`` (Phi-3-V processor, ``num_crops``).

Name mapping (theirs -> ours):

* ``imgque_backbone.clip_model.vision_model.*`` (Hugging Face CLIP) -> ``vision.clip.*``
  (open_clip): ``embeddings.patch_embedding`` -> ``conv1``, ``embeddings.class_embedding``,
  ``embeddings.position_embedding`` -> ``positional_embedding``, ``pre_layrnorm`` -> ``ln_pre``,
  per layer ``self_attn.{q,k,v}_proj`` concatenated -> ``attn.in_proj_*``, ``out_proj``,
  ``layer_norm{1,2}`` -> ``ln_{1,2}``, ``mlp.fc{1,2}`` -> ``mlp.c_{fc,proj}``; their
  ``pos_layrnorm`` (after the last layer) -> ``vision.ln``; open_clip's unused ``ln_post`` and
  ``proj`` get identity / zero values.
* ``...vision_model.vision_embed_merge`` -> ``fuser.merge.weight``; ``token_LF`` (1, 1, C) ->
  ``fuser.merge.lf_token``.
* ``imgque_backbone.imgque_model.*`` (a ``LlamaModel``) -> ``fuser.decoder.*``. Their query
  tokens are the CLIP tokenizer's added ``<|placeholder_qed_i|>`` ids (any ids), or all the pad
  id when ``append_special_padding`` is false; our decoder keeps the text vocabulary and
  appends one row per query, so those rows are copied into place.
* ``fusion_backbone.imgque_proj.weight`` -> ``fuser.projection.weight``.
* ``llm_backbone.*`` -> the LLM, copied file to file one tensor at a time into ``OUT/llm`` (never held).

n_l / n_s come from ``length_que_end`` / ``length_que_end_short`` (n_s = n_l when unset, as in
their parser), the fusion decoder's shapes from the weights and its config, HD-N from
``num_crops``. The chat template is not stored in their checkpoints (their eval scripts name
it); it is read from the directory or LLM name (``llama-2`` -> llama-2-vision, ``vicuna`` ->
vicuna_v1.1, ``llama-3``, ``phi-3``) unless given; likewise the drop-query variants
(``drop-query`` in the name).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from fusedvlm.checkpoint import UPSTREAM_MODEL_TYPE

HD_IMGQUE_TYPE = "modeling_image_hd_multi_query_clip"
FUSION_NAME = "img_multi_que_clip_fusion_linear"
VISION = "imgque_backbone.clip_model.vision_model."
FUSION = "imgque_backbone.imgque_model."
PROJ = "fusion_backbone.imgque_proj.weight"
LLM = "llm_backbone."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
)


class UpstreamError(ValueError):
    """An authors' checkpoint directory that cannot be read; the message names the file or key."""


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UpstreamError(f"missing file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise UpstreamError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UpstreamError(f"{path} does not hold a JSON object")
    return data


def _need(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise UpstreamError(f"{where} has no {key!r}")
    return d[key]


# ---------------------------------------------------------------------------- weights
def weight_shards(src: str) -> list[str]:
    """The weight files of a checkpoint directory, in index order."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(src, index)
        if os.path.isfile(p):
            weight_map = _need(_read_json(p), "weight_map", p)
            files = list(dict.fromkeys(weight_map.values()))
            for f in files:
                if not os.path.isfile(os.path.join(src, f)):
                    raise UpstreamError(f"missing file {os.path.join(src, f)} (listed in {index})")
            return [os.path.join(src, f) for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(src, single)
        if os.path.isfile(p):
            return [p]
    raise UpstreamError(
        f"missing weights in {src}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        f"or pytorch_model.bin.index.json"
    )


def shard_tensors(path: str) -> dict:
    """name -> tensor of one weight file, without reading the data: a
    :class:`fusedvlm.weights.TensorEntry` per tensor of a safetensors file, a memory-mapped
    tensor per tensor of a ``.bin`` (the legacy non-zip format cannot be mapped and is read
    whole)."""
    if path.endswith(".safetensors"):
        from fusedvlm.weights import SafetensorsFile

        try:
            return SafetensorsFile(path).entries
        except ValueError as e:
            raise UpstreamError(f"cannot read {path}: {e}") from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise UpstreamError(f"cannot read {path}: {e}") from None
    if not isinstance(state, dict):
        raise UpstreamError(f"{path} does not hold a state dict")
    return state


# ---------------------------------------------------------------------------- config
def _infer_template(src: str, config: dict) -> str:
    hints = [
        os.path.basename(os.path.normpath(src)).lower(),
        str(config.get("llm_model_name_or_path") or "").lower(),
        str((config.get("llm_config") or {}).get("_name_or_path") or "").lower(),
    ]
    for hint in hints:
        if "vicuna" in hint:
            return "vicuna"
        if re.search(r"llama-?3", hint):
            return "llama3"
        if re.search(r"phi-?3", hint):
            return "phi3"
        if re.search(r"llama-?2", hint):
            return "llama2"
    raise UpstreamError(
        f"cannot tell the chat template of {src} (their checkpoints do not store it); pass --template "
        f"llama-2-vision, vicuna_v1.1, llama-3-vision or phi-3"
    )


def _clip_query_ids(
    clip_dir: str, n_queries: int, special_padding: bool, vocab: dict[str, int]
) -> tuple[list[int], int]:
    """(ids of the query tokens P0..P(n-1), EOS id) from the saved CLIP tokenizer."""
    added: dict[str, int] = {}
    tj = os.path.join(clip_dir, "tokenizer.json")
    if os.path.isfile(tj):
        for t in _read_json(tj).get("added_tokens", []):
            added[t["content"]] = int(t["id"])
    at = os.path.join(clip_dir, "added_tokens.json")
    if os.path.isfile(at):
        added.update({k: int(v) for k, v in _read_json(at).items()})
    table = {**vocab, **added}

    def token_str(value) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    special: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(clip_dir, name)
        if os.path.isfile(p):
            special = {**_read_json(p), **special}
    eos = token_str(special.get("eos_token")) or "<|endoftext|>"
    if eos not in table:
        raise UpstreamError(f"{clip_dir}: the CLIP tokenizer has no EOS token {eos!r}")
    # Their loader sets pad = eos when the tokenizer has no pad token.
    pad = token_str(special.get("pad_token")) or eos
    if not special_padding:
        if pad not in table:
            raise UpstreamError(f"{clip_dir}: the CLIP tokenizer has no pad token {pad!r}")
        return [table[pad]] * n_queries, table[eos]
    ids = []
    for i in range(n_queries):
        name = f"<|placeholder_qed_{i}|>"
        if name not in table:
            raise UpstreamError(
                f"{clip_dir}: the CLIP tokenizer has no query token {name!r} (append_special_padding is true)"
            )
        ids.append(table[name])
    return ids, table[eos]


def build_config(
    src: str, config: dict, weights: dict[str, torch.Tensor], template: str | None, drop_question: bool | None
):
    """Our ModelConfig for their checkpoint, plus the query ids and CLIP BPE tables."""
    from fusedvlm.clip_text import read_bpe
    from fusedvlm.config import FusionConfig, LLMConfig, ModelConfig, VisionConfig

    where = os.path.join(src, "config.json")
    if config.get("model_type") != UPSTREAM_MODEL_TYPE:
        raise UpstreamError(
            f"{where}: model_type {config.get('model_type')!r} is not the authors' {UPSTREAM_MODEL_TYPE!r}"
        )
    if config.get("fusion_name") != FUSION_NAME:
        raise UpstreamError(
            f"{where}: fusion_name {config.get('fusion_name')!r} is not supported (only {FUSION_NAME!r})"
        )
    imgque = _need(config, "imgque_config", where)
    if imgque.get("model_type") != HD_IMGQUE_TYPE:
        raise UpstreamError(
            f"{where}: imgque_config.model_type {imgque.get('model_type')!r} is not the HD model {HD_IMGQUE_TYPE!r}"
        )
    vis = _need(imgque, "vision_config", f"{where} imgque_config")
    llm_cfg = _need(config, "llm_config", where)
    for key, want in (
        ("enable_local_merge", True),
        ("enable_token_crlf", True),
        ("vembed_merge_kernel_size", 3),
        ("vembed_merge_stride", 2),
    ):
        if vis.get(key, want) != want:
            raise UpstreamError(f"{where}: vision_config.{key}={vis.get(key)!r} is not supported (only {want!r})")
    act = vis.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise UpstreamError(f"{where}: vision_config.hidden_act {act!r} is not supported (quick_gelu or gelu)")
    if abs(float(vis.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise UpstreamError(
            f"{where}: vision_config.layer_norm_eps {vis.get('layer_norm_eps')} is not supported (only 1e-5)"
        )
    width = int(_need(vis, "hidden_size", "vision_config"))
    vhd = vis.get("vembed_hidden_size") or width
    if vhd != width:
        raise UpstreamError(f"{where}: vision_config.vembed_hidden_size {vhd} != hidden_size {width} is not supported")
    vision = VisionConfig(
        image_size=int(vis.get("image_size", 224)),
        patch_size=int(vis.get("patch_size", 32)),
        width=width,
        layers=int(_need(vis, "num_hidden_layers", "vision_config")),
        heads=int(_need(vis, "num_attention_heads", "vision_config")),
        mlp_ratio=int(_need(vis, "intermediate_size", "vision_config")) / width,
        quick_gelu=(act == "quick_gelu"),
    )

    n_l = int(_need(config, "length_que_end", where))
    short = config.get("length_que_end_short")
    n_s = n_l if short is None else int(short)
    if n_l < 1 or n_s < 1 or n_s > n_l:
        raise UpstreamError(
            f"{where}: length_que_end={n_l}, length_que_end_short={short} are not usable (need 1 <= n_s <= n_l)"
        )

    clip_dir = os.path.join(src, "clip")
    if not os.path.isdir(clip_dir):
        raise UpstreamError(f"missing CLIP tokenizer folder {clip_dir}")
    try:
        vocab, merges = read_bpe(clip_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UpstreamError(str(e)) from None
    special_padding = bool(config.get("append_special_padding", imgque.get("append_special_padding", False)))
    query_ids, eos_id = _clip_query_ids(clip_dir, n_l - 1, special_padding, vocab)

    emb = weights[FUSION + "embed_tokens.weight"]
    for i in query_ids + [eos_id]:
        if i >= emb.shape[0]:
            raise UpstreamError(f"CLIP token id {i} is outside the fusion embedding table ({emb.shape[0]} rows)")
    inner = imgque.get("imgque_config") or {}
    num_layers = _count_layers(weights, FUSION + "layers.", inner.get("num_hidden_layers"), f"{where} imgque_config")
    hidden = emb.shape[1]
    heads = int(inner.get("num_attention_heads") or hidden // 64)
    kv_heads = int(inner.get("num_key_value_heads") or heads)
    fusion = FusionConfig(
        hidden_size=hidden,
        intermediate_size=weights[FUSION + "layers.0.mlp.gate_proj.weight"].shape[0] if num_layers else 4 * hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        rope_theta=float(inner.get("rope_theta", 10000.0)),
        rms_norm_eps=float(inner.get("rms_norm_eps", 1e-6)),
        text_vocab_size=len(vocab),
        eos_token_id=eos_id,
        max_queries=n_l - 1,
    )
    if inner.get("rope_scaling"):
        raise UpstreamError(f"{where}: imgque_config.rope_scaling {inner['rope_scaling']!r} is not supported")

    pre = _read_json(os.path.join(src, "preprocessor_config.json"))
    if "num_crops" not in pre:
        raise UpstreamError(
            f"{os.path.join(src, 'preprocessor_config.json')} has no 'num_crops' (not the HD Phi-3-V processor)"
        )
    name = os.path.basename(os.path.normpath(src)).lower()
    if drop_question is None:
        drop_question = "drop-query" in name or "drop_query" in name
    from fusedvlm.chat import UPSTREAM_TEMPLATES

    template = UPSTREAM_TEMPLATES.get(template, template) if template else _infer_template(src, config)
    llm = LLMConfig(
        source="pretrained",
        path="llm",
        hidden_size=int(llm_cfg.get("hidden_size", 4096)),
        intermediate_size=int(llm_cfg.get("intermediate_size", 11008)),
        num_layers=int(llm_cfg.get("num_hidden_layers", 32)),
        num_heads=int(llm_cfg.get("num_attention_heads", 32)),
        num_kv_heads=int(llm_cfg.get("num_key_value_heads") or llm_cfg.get("num_attention_heads", 32)),
        vocab_size=int(llm_cfg.get("vocab_size", 32000)),
        max_position_embeddings=int(llm_cfg.get("max_position_embeddings", 4096)),
        chat_template=template,
        system_prompt=None,
    )
    cfg = ModelConfig(
        vision=vision,
        fusion=fusion,
        llm=llm,
        n_l=n_l,
        n_s=n_s,
        hd_num=int(pre["num_crops"]),
        drop_question=bool(drop_question),
    )
    return cfg, query_ids, (vocab, merges)


# ---------------------------------------------------------------------------- mapping
def map_non_llm(weights: dict[str, torch.Tensor], cfg, query_ids: list[int]) -> dict[str, torch.Tensor]:
    """Their vision / fusion / projection tensors -> our FusedVLM state dict (non-LLM part)."""

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise UpstreamError(f"missing key {name} in the checkpoint weights")
        return weights[name]

    out: dict[str, torch.Tensor] = {}
    v, c = VISION, "vision.clip."
    out[c + "conv1.weight"] = take(v + "embeddings.patch_embedding.weight")
    out[c + "class_embedding"] = take(v + "embeddings.class_embedding")
    out[c + "positional_embedding"] = take(v + "embeddings.position_embedding.weight")
    for p in ("weight", "bias"):
        out[c + f"ln_pre.{p}"] = take(v + f"pre_layrnorm.{p}")
        out[f"vision.ln.{p}"] = take(v + f"pos_layrnorm.{p}")
    for i in range(cfg.vision.layers):
        h, o = v + f"encoder.layers.{i}.", c + f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.in_proj_{p}"] = torch.cat([take(h + f"self_attn.{x}_proj.{p}") for x in "qkv"])
            out[o + f"attn.out_proj.{p}"] = take(h + f"self_attn.out_proj.{p}")
            out[o + f"ln_1.{p}"] = take(h + f"layer_norm1.{p}")
            out[o + f"ln_2.{p}"] = take(h + f"layer_norm2.{p}")
            out[o + f"mlp.c_fc.{p}"] = take(h + f"mlp.fc1.{p}")
            out[o + f"mlp.c_proj.{p}"] = take(h + f"mlp.fc2.{p}")
    ref = out[c + "class_embedding"]
    width = ref.shape[0]
    # open_clip's final LayerNorm and projection exist in the module but fusedvlm never uses them.
    out[c + "ln_post.weight"] = torch.ones(width, dtype=ref.dtype)
    out[c + "ln_post.bias"] = torch.zeros(width, dtype=ref.dtype)
    out[c + "proj"] = torch.zeros(width, width, dtype=ref.dtype)

    out["fuser.merge.weight"] = take(v + "vision_embed_merge.weight")
    out["fuser.merge.lf_token"] = take(v + "token_LF").reshape(-1)
    emb = take(FUSION + "embed_tokens.weight")
    text = cfg.fusion.text_vocab_size
    out["fuser.decoder.embed_tokens.weight"] = (
        torch.cat([emb[:text], emb[query_ids]]) if query_ids else emb[:text].clone()
    )
    for k, t in weights.items():
        if k.startswith(FUSION) and k != FUSION + "embed_tokens.weight" and "rotary_emb" not in k:
            out["fuser.decoder." + k[len(FUSION) :]] = t
    out["fuser.projection.weight"] = take(PROJ)
    return out


def _count_layers(weights, prefix: str, declared, where: str) -> int:
    """How many layers ``prefix``N. the weights hold: 0..n-1 with none missing, and as many as
    the config declares where it does (a missing last layer would build a shallower model)."""
    found = sorted({int(k[len(prefix) :].split(".")[0]) for k in weights if k.startswith(prefix)})
    want = len(found) if declared is None else int(declared)
    missing = sorted(set(range(want)) - set(found))
    if missing:
        raise UpstreamError(
            f"missing key {prefix}{missing[0]}.*: {where} declares {want} layers, the weights hold {len(found)}"
        )
    if found and found[-1] >= want:
        raise UpstreamError(f"the weights hold {prefix}{found[-1]}.* but {where} declares {want} layers")
    return want


def weight_index(shards: list[str]) -> dict[str, torch.Tensor]:
    """Name -> a meta tensor (shape and dtype) of every weight, read from the file headers
    (``.bin`` files memory-mapped), so the whole checkpoint is checked before a byte is written."""
    index: dict[str, torch.Tensor] = {}
    for path in shards:
        for k, t in shard_tensors(path).items():
            index[k] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return index


def _check_fusion_keys(weights) -> None:
    for key in ("embed_tokens.weight", "layers.0.mlp.gate_proj.weight"):
        if FUSION + key not in weights:
            raise UpstreamError(f"missing key {FUSION}{key} in the checkpoint weights")


def check_paths(src: str, out: str) -> None:
    """Refuse an output that would overwrite, hold or sit inside the source, or cannot be written.

    ``src`` and ``out`` are absolute. Symbolic links are resolved: a link to the source is the source."""
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if real_out == real_src:
        raise UpstreamError(f"the output {out} is the source checkpoint; choose another OUT_DIR")
    if os.path.commonpath([real_src, real_out]) == real_src:
        raise UpstreamError(f"the output {out} is inside the source checkpoint {src}; choose a directory outside it")
    if os.path.commonpath([real_src, real_out]) == real_out:
        raise UpstreamError(f"the output {out} contains the source checkpoint {src}; it would be replaced")
    check_output_dir(out)


def check_output_dir(out: str, needed_bytes: int = 0) -> None:
    """An output directory that can be created or replaced: not an existing file, its parent
    writable, ``needed_bytes`` free there. One line naming the path otherwise."""
    from fusedvlm.outputs import check_output_dir as check

    try:
        check(out, needed_bytes)
    except ValueError as e:
        raise UpstreamError(str(e)) from None


def preflight(src: str, out: str, config: dict, template: str | None, drop_question: bool | None) -> list[str]:
    """Everything :func:`convert` can check before it writes a byte, from the config, the weight
    headers, the tokenizers and the preprocessor config; returns the weight shards."""
    from dataclasses import replace

    from fusedvlm.checkpoint import check_state_dict
    from fusedvlm.model.vlm import FusedVLM

    where = os.path.join(src, "config.json")
    if not os.path.isfile(os.path.join(src, "tokenizer_config.json")):
        raise UpstreamError(f"missing file {os.path.join(src, 'tokenizer_config.json')} (the LLM tokenizer)")
    shards = weight_shards(src)
    index = weight_index(shards)
    llm_cfg = _need(config, "llm_config", where)
    if not any(k.startswith(LLM) for k in index):
        raise UpstreamError(f"missing key {LLM}*: the checkpoint in {src} holds no LLM weights")
    _count_layers(index, LLM + "model.layers.", llm_cfg.get("num_hidden_layers"), f"{where} llm_config")
    non_llm = {k: t for k, t in index.items() if _is_non_llm(k)}
    _check_fusion_keys(non_llm)
    cfg, query_ids, _ = build_config(src, config, non_llm, template, drop_question)
    state = map_non_llm(non_llm, cfg, query_ids)
    with torch.device("meta"):
        # The LLM config's own fields give the projection's width; no LLM directory exists yet.
        model = FusedVLM(replace(cfg, llm=replace(cfg.llm, source="random")), load_language_model=False)
    check_state_dict(model.trainable_state_dict(), state, f"converted weights of {src}")
    check_output_dir(out, sum(os.path.getsize(p) for p in shards))
    return shards


def _is_non_llm(name: str) -> bool:
    return name.startswith(VISION) or name.startswith(FUSION) or name == PROJ


def convert(src: str, out: str, *, template: str | None = None, drop_question: bool | None = None, log=print) -> None:
    """Convert the authors' checkpoint directory ``src`` into a fusedvlm directory ``out``
    (written into a temporary sibling, then switched into place atomically). Everything that can
    be checked is checked before a byte is written (:func:`preflight`); an interruption, a full
    disk or a permission error leaves ``out`` as it was."""
    from fusedvlm.model.vlm import MODEL_FORMAT
    from fusedvlm.outputs import locked_output

    src, out = os.path.abspath(src), os.path.abspath(out)
    if not os.path.isdir(src):
        raise UpstreamError(f"checkpoint directory not found: {src}")
    config = _read_json(os.path.join(src, "config.json"))
    if config.get("format") == MODEL_FORMAT:
        raise UpstreamError(f"{src} is already a fusedvlm model directory; use it as is (fusedvlm chat --checkpoint)")
    check_paths(src, out)
    with locked_output(out):
        _convert(src, out, config, template, drop_question, log)


def _convert(src: str, out: str, config: dict, template: str | None, drop_question: bool | None, log) -> None:
    from dataclasses import replace

    from fusedvlm.checkpoint import atomic_directory, check_state_dict
    from fusedvlm.clip_text import write_bpe
    from fusedvlm.model.vlm import FusedVLM, write_model_dir
    from fusedvlm.weights import TensorEntry, write_safetensors

    shards = preflight(src, out, config, template, drop_question)
    llm_cfg = config["llm_config"]

    with atomic_directory(out) as tmp:
        llm_dir = os.path.join(tmp, "llm")
        os.makedirs(llm_dir)
        non_llm: dict[str, torch.Tensor] = {}
        weight_map: dict[str, str] = {}
        ignored = []
        for n, shard in enumerate(shards):
            llm_part = {}
            for k, t in shard_tensors(shard).items():
                if k.startswith(LLM):
                    llm_part[k[len(LLM) :]] = t
                elif _is_non_llm(k):
                    # Memory-mapped: only the pages the mapping below touches are read.
                    non_llm[k] = t.load() if isinstance(t, TensorEntry) else t
                else:
                    ignored.append(k)
            if llm_part:
                # The LLM's bytes are copied file to file, one tensor at a time.
                name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(llm_dir, name), llm_part, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(llm_part, name))
            del llm_part
            log(f"read {os.path.basename(shard)} ({n + 1}/{len(shards)})")
        if not weight_map:
            raise UpstreamError(f"missing key {LLM}*: the checkpoint in {src} holds no LLM weights")
        with open(os.path.join(llm_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        llm_json = dict(llm_cfg)
        if llm_json.get("model_type") == "llama":
            llm_json.setdefault("architectures", ["LlamaForCausalLM"])
        with open(os.path.join(llm_dir, "config.json"), "w") as f:
            json.dump(llm_json, f, indent=1)
        for name in TOKENIZER_FILES:
            p = os.path.join(src, name)
            if os.path.isfile(p):
                shutil.copy2(p, os.path.join(llm_dir, name))
        _pin_fast_tokenizer(llm_dir)
        _check_fusion_keys(non_llm)

        cfg, query_ids, (vocab, merges) = build_config(src, config, non_llm, template, drop_question)
        state = map_non_llm(non_llm, cfg, query_ids)
        del non_llm
        with torch.device("meta"):
            # The LLM's width comes from the directory just written (cfg names it relative to out).
            expected = FusedVLM(
                replace(cfg, llm=replace(cfg.llm, path=llm_dir)), load_language_model=False
            ).trainable_state_dict()
        check_state_dict(expected, state, f"converted weights of {src}")
        write_bpe(os.path.join(tmp, "clip"), vocab, merges)
        write_model_dir(tmp, cfg, state, source={"upstream": src, "ignored_keys": ignored[:20]})
    log(
        f"wrote {out} (n_l={cfg.n_l}, n_s={cfg.n_s}, HD-{cfg.hd_num}, template {cfg.llm.chat_template}"
        f"{', drop question' if cfg.drop_question else ''})"
    )


def _pin_fast_tokenizer(folder: str) -> None:
    """Make the LLM tokenizer load from its ``tokenizer.json`` exactly as saved.

    The authors ran the fast tokenizer their transformers (4.4x) saved; newer transformers
    rebuild a Llama tokenizer's normaliser from ``tokenizer_config.json`` instead (no ``▁``
    after ``<s>`` where theirs has one: ``<s>[INST]`` gives other ids). Naming the generic
    fast class keeps the saved pipeline."""
    tj, tc = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer_config.json")
    if not (os.path.isfile(tj) and os.path.isfile(tc)):
        return
    conf = _read_json(tc)
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(tc, "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=1, ensure_ascii=False)


def register(sub) -> None:
    p = sub.add_parser(
        "convert-upstream",
        help="convert an authors' (tensorfusionvlm) checkpoint directory",
        description="Convert a checkpoint of the authors' code (ModelScope LiTenghui/scalingcapabilitytokenspace) "
        "into a fusedvlm model directory for `fusedvlm chat --checkpoint OUT_DIR`.",
    )
    p.add_argument(
        "src", metavar="SRC_DIR", help="the authors' checkpoint directory (config.json, weights, clip/, tokenizer)"
    )
    p.add_argument("out", metavar="OUT_DIR", help="where to write the fusedvlm model directory")
    p.add_argument(
        "--template",
        default=None,
        choices=["llama-2-vision", "vicuna_v1.1", "llama-3-vision", "phi-3"],
        help="chat template (default: read from the directory or LLM name)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--drop-question",
        dest="drop_question",
        action="store_true",
        default=None,
        help="drop-query variant: the fusion decoder reads no question text (default: 'drop-query' in the name)",
    )
    g.add_argument("--keep-question", dest="drop_question", action="store_false")
    p.set_defaults(func=run)


def run(args) -> int:
    convert(args.src, args.out, template=args.template, drop_question=args.drop_question)
    return 0
