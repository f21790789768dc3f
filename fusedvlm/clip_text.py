"""The CLIP BPE tokenizer of questions, as the authors run it.

The authors tokenise questions with Hugging Face's (fast) CLIP tokenizer: NFC, whitespace
runs collapsed to one space, lower case, then byte-level BPE. open_clip's ``SimpleTokenizer``
cleans text further first (``ftfy.fix_text`` and HTML unescaping), which turns curly quotes
into straight ones and ``&amp;`` into ``&``, so a few questions got other ids. fusedvlm builds
the same Hugging Face tokenizer from open_clip's bundled BPE tables (offline; OpenAI's
vocabulary), or from a converted checkpoint's ``clip/`` files.

Questions are tokenised as plain text: a typed ``<|endoftext|>`` is BPE text, not the EOS
that closes a fusion group. Long questions are not truncated (the authors' tokenizer only
warns beyond 77 tokens and their fusion decoder reads them whole); the fusion decoder's
``max_positions`` bounds the whole sequence instead.
"""

from __future__ import annotations

import functools
import gzip
import json
import os

from fusedvlm.text import check_text

VOCAB_NAME = "vocab.json"
MERGES_NAME = "merges.txt"


def _build(vocab: dict[str, int], merges: list[str]):
    import logging

    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    # Questions are never truncated; the 77-token warning would be noise.
    tok.model_max_length = int(1e12)
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    return tok


def openai_bpe() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's vocabulary (49408 ids) and merges, from open_clip's bundled table."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


@functools.cache
def default_clip_tokenizer():
    """The CLIP tokenizer of OpenAI's vocabulary (every fusedvlm preset)."""
    return _build(*openai_bpe())


def read_bpe(folder: str) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a Hugging Face CLIP tokenizer folder: the BPE model of its
    ``tokenizer.json`` (without added tokens) or its ``vocab.json`` + ``merges.txt``."""
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tj):
        with open(tj, encoding="utf-8") as f:
            model = json.load(f).get("model", {})
        if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
            raise ValueError(f"{tj} does not hold a BPE model (CLIP's tokenizer is BPE)")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        return dict(model["vocab"]), merges
    vocab_path, merges_path = os.path.join(folder, VOCAB_NAME), os.path.join(folder, MERGES_NAME)
    for p in (vocab_path, merges_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"CLIP tokenizer folder {folder} has neither tokenizer.json nor {os.path.basename(p)}"
            )
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
    return vocab, merges


def write_bpe(folder: str, vocab: dict[str, int], merges: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, VOCAB_NAME), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, MERGES_NAME), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def load_clip_tokenizer(folder: str):
    return _build(*read_bpe(folder))


class ClipText:
    """Question text -> CLIP BPE ids, no start/end token: the one question tokenizer of the
    fusion module, the training data and the converter."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    def encode(self, text: str) -> list[int]:
        return encode(self.hf, text)

    def question_ids(self, question: str, max_tokens: int | None = None) -> list[int]:
        """The ids of a question, or one ValueError naming what is wrong with it (not text,
        empty, not UTF-8, no CLIP tokens, more than ``max_tokens``)."""
        check_text(question, "question")
        ids = self.encode(question)
        if not ids:
            raise ValueError(f"question {question!r} has no CLIP tokens")
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(f"question has {len(ids)} CLIP tokens, more than max_question_tokens={max_tokens}")
        return ids


@functools.cache
def clip_tokenizer() -> ClipText:
    """The question tokenizer of OpenAI's vocabulary (every fusedvlm preset)."""
    return ClipText(default_clip_tokenizer())


def encode(tokenizer, text: str) -> list[int]:
    """CLIP ids of ``text`` as plain text: no start/end token, special strings not honoured."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)
