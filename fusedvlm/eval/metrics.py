"""Answer extraction and the benchmarks' official metrics (as VLMEvalKit computes them with
exact matching, no LLM judge).

Every metric takes a list of :class:`Scored` (the item, its extracted answer and whether
that is right) and returns ``{split: {metric: value}}`` with values in percent (MME: points).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from fusedvlm.eval.data import Item

MME_PERCEPTION = (
    "OCR",
    "artwork",
    "celebrity",
    "color",
    "count",
    "existence",
    "landmark",
    "position",
    "posters",
    "scene",
)
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")
# Headline metrics per kind: the rows of scores.csv (split "Overall" unless named).
HEADLINE = {
    "mme": (("Overall", "perception"), ("Overall", "cognition")),
    "pope": (("Overall", "acc"), ("Overall", "f1")),
    "hallusionbench": (("Overall", "aAcc"), ("Overall", "fAcc"), ("Overall", "qAcc")),
    "mcq": (("Overall", "acc"),),
}

_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!.:*#]")


def extract_yes_no(text: str) -> str:
    """'Yes' / 'No' when the answer says exactly one of them as a word, else 'Unknown'."""
    words = set(_PUNCT.sub(" ", text.lower()).split())
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return "Unknown"


def extract_option(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names: exactly one option letter standing as a word
    ("B", "(B)", "B. cat"), else exactly one option text contained in the answer; None when
    neither singles out one option."""
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    named = [k for k in options if k in words]
    if len(named) == 1:
        return named[0]
    if not named:
        low = text.lower()
        hits = [k for k, v in options.items() if v.strip() and v.strip().lower() in low]
        if len(hits) == 1:
            return hits[0]
    return None


@dataclass(frozen=True)
class Scored:
    item: Item
    extracted: str | None
    correct: bool


def score_item(item: Item, prediction: str, yes_no: bool) -> Scored:
    extracted = extract_yes_no(prediction) if yes_no else extract_option(prediction, item.options)
    return Scored(item, extracted, extracted == item.answer)


def _pct(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def mme_metrics(scored: list[Scored]) -> dict[str, dict[str, float]]:
    """Per category: acc (questions), acc+ (images whose questions are all right) and
    score = acc + acc+ (0..200); perception and cognition sum the scores of their categories."""
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for s in scored:
        by_cat[s.item.category][s.item.fields["image_path"]].append(s.correct)
    out: dict[str, dict[str, float]] = {}
    for cat, images in sorted(by_cat.items()):
        acc = _pct(c for v in images.values() for c in v)
        acc_plus = _pct(all(v) for v in images.values())
        out[cat] = {"acc": acc, "acc+": acc_plus, "score": acc + acc_plus}
    overall = {}
    for name, cats in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [c for c in cats if c in out]
        if present:
            overall[name] = sum(out[c]["score"] for c in present)
            overall[f"{name}_categories"] = float(len(present))
    out = {"Overall": overall, **out}
    return out


def _binary(scored: list[Scored]) -> dict[str, float]:
    tp = sum(s.item.answer == "Yes" and s.extracted == "Yes" for s in scored)
    fp = sum(s.item.answer == "No" and s.extracted == "Yes" for s in scored)
    fn = sum(s.item.answer == "Yes" and s.extracted != "Yes" for s in scored)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "acc": _pct(s.correct for s in scored),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": _pct(s.extracted == "Yes" for s in scored),
        "unknown": _pct(s.extracted == "Unknown" for s in scored),
    }


def pope_metrics(scored: list[Scored]) -> dict[str, dict[str, float]]:
    """Accuracy, precision / recall / F1 of 'Yes' and the yes ratio, overall and per split
    (an item listed under several comma-separated splits counts in each)."""
    splits: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        for name in s.item.fields.get("split", "").split(","):
            if name.strip():
                splits[name.strip()].append(s)
    return {"Overall": _binary(scored), **{k: _binary(v) for k, v in sorted(splits.items())}}


def _hallusion(scored: list[Scored]) -> dict[str, float]:
    figures: dict[tuple, list[bool]] = defaultdict(list)
    questions: dict[tuple, list[bool]] = defaultdict(list)
    for s in scored:
        f = s.item.fields
        figures[(f["l2-category"], f["set_id"], f["figure_id"])].append(s.correct)
        questions[(f["l2-category"], f["set_id"], f["question_id"])].append(s.correct)
    return {
        "aAcc": _pct(s.correct for s in scored),
        "fAcc": _pct(all(v) for v in figures.values()),
        "qAcc": _pct(all(v) for v in questions.values()),
    }


def _by_category(scored: list[Scored]) -> dict[str, list[Scored]]:
    """The scored items per category and per l2-category (one flat dict, sorted by name per
    kind; an item without a value is in no group of that kind)."""
    out: dict[str, list[Scored]] = {}
    for key in ("category", "l2-category"):
        groups: dict[str, list[Scored]] = defaultdict(list)
        for s in scored:
            value = s.item.category if key == "category" else s.item.fields.get(key, "")
            if value:
                groups[value].append(s)
        out.update(sorted(groups.items()))
    return out


def hallusion_metrics(scored: list[Scored]) -> dict[str, dict[str, float]]:
    """aAcc (all questions), fAcc (figures whose questions are all right), qAcc (questions
    right on every figure they are asked about); overall, per category and per l2-category."""
    out = {"Overall": _hallusion(scored)}
    out.update({k: _hallusion(v) for k, v in _by_category(scored).items()})
    return out


def mcq_metrics(scored: list[Scored]) -> dict[str, dict[str, float]]:
    """Accuracy overall, per category and per l2-category; with MMBench's circular copies
    (index = original + k * 1e6) also circular_acc: a question counts when all its copies are right."""
    overall = {"acc": _pct(s.correct for s in scored), "unmatched": _pct(s.extracted is None for s in scored)}
    if any(s.item.index.isdigit() and int(s.item.index) >= 1_000_000 for s in scored):
        circular: dict[int, list[bool]] = defaultdict(list)
        for s in scored:
            key = int(s.item.index) % 1_000_000 if s.item.index.isdigit() else s.item.index
            circular[key].append(s.correct)
        overall["circular_acc"] = _pct(all(v) for v in circular.values())
    out = {"Overall": overall}
    out.update({k: {"acc": _pct(x.correct for x in v)} for k, v in _by_category(scored).items()})
    return out


METRICS = {"mme": mme_metrics, "pope": pope_metrics, "hallusionbench": hallusion_metrics, "mcq": mcq_metrics}
