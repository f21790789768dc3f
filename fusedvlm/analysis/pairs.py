"""A/B answer pairs that share a prefix (system prompt + question).

A pair is the record layout of public preference data sets such as orca_dpo_pairs:
``{system?, question, chosen, rejected}``; here "chosen" and "rejected" are just branches A and
B. Pairs come from JSONL or Parquet files, or are generated offline by sampling two answers
per prompt from a local causal LM (:func:`generate_pairs`, prompts from :func:`load_prompts`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import resources

FIELDS = ("system", "question", "chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    question: str
    chosen: str
    rejected: str
    system: str | None = None


def _pair_from_record(rec: dict, where: str) -> Pair:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with question/chosen/rejected, got {type(rec).__name__}")
    missing = [k for k in ("question", "chosen", "rejected") if rec.get(k) is None]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {', '.join(missing)} (a pair needs question, chosen, rejected; system is optional)"
        )
    for k in FIELDS:
        if rec.get(k) is not None and not isinstance(rec[k], str):
            raise ValueError(f"{where}: field {k!r} must be a string, got {type(rec[k]).__name__}")
    return Pair(
        question=rec["question"], chosen=rec["chosen"], rejected=rec["rejected"], system=rec.get("system") or None
    )


def _jsonl(lines, where: str):
    """(``where:lineno``, record) for every non-blank line; a line that is not JSON is an error naming it."""
    for lineno, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            # Decoded line by line, so that a stray byte is reported with its line.
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}:{lineno}: not UTF-8 text (byte {line[e.start : e.start + 1]!r} at column {e.start + 1})"
                ) from None
        if not line.strip():
            continue
        try:
            yield f"{where}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{lineno}: not valid JSON ({e.msg})") from None


def load_pairs(path: str, limit: int | None = None) -> list[Pair]:
    """Pairs from a ``.jsonl`` or ``.parquet`` file of {system?, question, chosen, rejected}."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"pair file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        pairs = []
        with open(path, "rb") as f:
            for where, rec in _jsonl(f, path):
                pairs.append(_pair_from_record(rec, where))
                if limit is not None and len(pairs) >= limit:
                    break
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [k for k in ("question", "chosen", "rejected") if k not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; columns are {table.column_names}")
        rows = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
        pairs = [_pair_from_record(rec, f"{path}: row {i}") for i, rec in enumerate(rows)]
    else:
        raise ValueError(f"{path}: unsupported pair file type {ext!r}; use .jsonl or .parquet")
    if not pairs:
        raise ValueError(f"{path}: no pairs in the file")
    return pairs


def save_pairs(pairs: list[Pair], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({k: v for k, v in asdict(p).items() if v is not None}, ensure_ascii=False) + "\n")


def load_prompts(path: str | None = None) -> list[dict]:
    """Prompts {system?, question}: ``path`` (JSONL) or the small set shipped with fusedvlm."""
    if path is None:
        text = resources.files("fusedvlm.analysis").joinpath("prompts.jsonl").read_text(encoding="utf-8")
        where = "fusedvlm/analysis/prompts.jsonl"
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"prompt file not found: {path}")
        with open(path, "rb") as f:
            text = f.read()
        where = path
    prompts = []
    for at, rec in _jsonl(text.splitlines(), where):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise ValueError(f"{at}: a prompt needs a string field 'question'")
        prompts.append({"question": rec["question"], "system": rec.get("system") or None})
    if not prompts:
        raise ValueError(f"{where}: no prompts in the file")
    return prompts


def prefix_ids(tokenizer, question: str, system: str | None, template: str | None = None) -> list[int]:
    """The shared prefix: the question turn up to the assistant's answer in the chat layout
    ``template`` (default: the tokenizer's own chat template; see :class:`fusedvlm.chat.ChatLayout`)."""
    from fusedvlm.chat import ChatLayout

    return ChatLayout(template, tokenizer, system).question(question, 0, True).ids


def generate_pairs(
    model,
    tokenizer,
    prompts: list[dict],
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    template: str | None = None,
) -> list[Pair]:
    """Two sampled answers per prompt (A = "chosen", B = "rejected"), offline.

    ``min_new_tokens`` holds back EOS so that both branches reach the lengths the analysis
    needs; prompts are batched with left padding.
    """
    import torch
    from tqdm.auto import tqdm

    from fusedvlm.packing import pad_rows

    if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
        raise ValueError(
            f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got {min_new_tokens}, {max_new_tokens}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    pairs: list[Pair] = []
    bar = tqdm(total=len(prompts), desc="generating pairs", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [prefix_ids(tokenizer, p["question"], p.get("system"), template) for p in chunk]
        input_ids, mask = pad_rows(ids, pad, side="left", device=device)
        width = input_ids.shape[1]
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                num_return_sequences=2,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, p in enumerate(chunk):
            pairs.append(
                Pair(question=p["question"], system=p.get("system"), chosen=texts[2 * i], rejected=texts[2 * i + 1])
            )
        bar.update(len(chunk))
    bar.close()
    return pairs
