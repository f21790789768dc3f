"""Benchmarks in the VLMEvalKit TSV layout.

One row per question: ``index``, ``image`` (base64 of the encoded image, or the ``index`` of
another row whose image it shares, or a file path), ``question``, ``answer``, ``category``
and per-benchmark columns:

* MME (yes/no): ``image_path`` names the image; its two questions form the pair of acc+.
* POPE (yes/no): ``split`` (or a comma-separated ``category``): random / popular / adversarial.
* HallusionBench (yes/no): ``l2-category`` and ``set_id`` / ``figure_id`` / ``question_id``
  (as columns, or as fields 3, 4, 5 of an ``index`` such as ``VD_figure_0_0_0_1``).
* multiple choice (MMBench, SEED-Bench): option columns ``A``, ``B``, ... , an optional ``hint``;
  the answer is an option letter. MMBench's circular copies have ``index`` = original + k * 1e6.

A file's kind is given as ``KIND=FILE`` or guessed from its name (``MME.tsv``, ``POPE.tsv``,
``HallusionBench.tsv``, ``MMBench_DEV_EN.tsv``, ``SEEDBench_IMG.tsv``). Rows that cannot be
evaluated (no image, bad base64, an answer outside the benchmark's set, an empty question ...)
are reported by index; :func:`load_benchmark` collects them all instead of stopping at the first.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import os
import re
import string
import sys
from dataclasses import dataclass, field

from fusedvlm.preprocess import DEFAULT_MAX_PIXELS

KINDS = ("mme", "pope", "hallusionbench", "mcq")
YES_NO_KINDS = ("mme", "pope", "hallusionbench")
_ALIASES = {"mmbench": "mcq", "seedbench": "mcq", "seed": "mcq", "hallusion": "hallusionbench"}
# File-name fragments, tried in order.
_NAME_HINTS = (("hallusion", "hallusionbench"), ("pope", "pope"), ("mmbench", "mcq"), ("seed", "mcq"), ("mme", "mme"))
OPTION_LETTERS = string.ascii_uppercase
YES_NO_SUFFIX = " Please answer yes or no."
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
# VLMEvalKit stores a shared image once; other rows hold that row's index (always short).
_MAX_REFERENCE_LEN = 64


class BenchmarkError(ValueError):
    """A benchmark file that cannot be evaluated as a whole (one line, names the file)."""


@dataclass(frozen=True)
class Item:
    index: str
    image_key: str  # items with one key share one image (and its vision prefix)
    question: str  # as in the file
    prompt: str  # what the model is asked
    answer: str  # 'Yes' / 'No', or an option letter
    category: str
    fields: dict = field(default_factory=dict, hash=False, compare=False)  # per-benchmark metric keys
    options: dict = field(default_factory=dict, hash=False, compare=False)  # letter -> text (multiple choice)

    @property
    def digest(self) -> str:
        """What the model is shown for this row (its image and prompt): a resumed run predicts a
        row again when this changed, so an edited row is never scored with an old answer."""
        return hashlib.sha1(f"{self.image_key}\0{self.prompt}".encode()).hexdigest()[:16]


@dataclass
class Problem:
    """A row that cannot be evaluated."""

    index: str
    row: int  # 1-based line number in the file (the header is line 1)
    message: str

    def describe(self, path: str) -> str:
        return f"{path}:{self.row}: index {self.index}: {self.message}"


@dataclass
class Benchmark:
    name: str
    kind: str
    path: str
    items: list[Item]
    images: dict[str, tuple[str, str]]  # image_key -> ('base64', data) or ('path', file)
    problems: list[Problem]
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded-size limit of its images (fusedvlm.preprocess)

    @property
    def yes_no(self) -> bool:
        return self.kind in YES_NO_KINDS

    def open_image(self, key: str):
        """The decoded PIL image of ``key``."""
        from fusedvlm.preprocess import load_image

        how, value = self.images[key]
        if how == "path":
            return load_image(value, max_pixels=self.max_pixels)
        return load_image(io.BytesIO(base64.b64decode(value)), max_pixels=self.max_pixels, name=f"'image' of {key}")


def parse_spec(spec: str) -> tuple[str | None, str]:
    """``KIND=FILE`` or ``FILE`` -> (kind or None, file)."""
    head, sep, tail = spec.partition("=")
    if sep and not os.path.exists(spec):
        kind = _ALIASES.get(head.lower(), head.lower())
        if kind not in KINDS:
            raise BenchmarkError(
                f"--benchmark {spec!r}: unknown kind {head!r}; choose from {', '.join(KINDS)} (or mmbench, seedbench)"
            )
        return kind, tail
    return None, spec


def guess_kind(path: str, columns: list[str]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    for hint, kind in _NAME_HINTS:
        if hint in stem:
            return kind
    if "A" in columns and "B" in columns:
        return "mcq"
    raise BenchmarkError(
        f"{path}: cannot tell the benchmark kind from its name or columns; "
        f"pass it as KIND=FILE with KIND one of {', '.join(KINDS)}"
    )


def _read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file not found: {path}")
    # Base64 images are far longer than csv's default field limit.
    csv.field_size_limit(sys.maxsize)
    try:
        # utf-8-sig: Excel starts its UTF-8 exports with a byte-order mark, which would otherwise
        # stick to the first column's name ("\ufeffindex").
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t")  # pandas-written: quoted where needed
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e})") from None
    if not columns:
        raise BenchmarkError(f"{path}: empty file (expected a TSV header)")
    return columns, rows


def _cell(row: dict, name: str) -> str:
    v = row.get(name)
    # A row with fewer cells than the header gives None; a surplus cell lands under key ''.
    return "" if v is None else v.strip()


def _check_base64(data: str) -> str | None:
    """None if ``data`` is base64 of an image PIL can identify, else why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        return f"bad base64 in 'image' ({e})"
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"'image' is base64 but not a readable image ({e})"
    return None


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def _short_image_cell(image: str, idx: str, by_index: dict[str, int], base: str, error: str) -> str:
    """Why a short 'image' cell is unusable (``error``: its base64 check's): too short for an
    encoded image, a path or an index-like word was meant as a file or a row reference."""
    if image == idx:
        return f"'image' is {image!r}, the row's own index: a row cannot share its own image"
    if "/" in image or os.sep in image or image.lower().endswith(_IMAGE_SUFFIXES):
        return f"image file not found: {image if os.path.isabs(image) else os.path.join(base, image)}"
    if image in by_index:
        return f"'image' refers to row {image!r}, whose own 'image' is not an image"
    if error.startswith("bad base64") and re.fullmatch(r"[\w-]+", image):
        return f"'image' {image!r} is neither base64 of an image nor the index of a row in the file"
    return error


def _mcq_prompt(question: str, hint: str, options: dict[str, str]) -> str:
    parts = [f"Hint: {hint}"] if hint else []
    parts.append(f"Question: {question}")
    parts.append("Options:")
    parts += [f"{k}. {v}" for k, v in options.items()]
    parts.append(MCQ_SUFFIX)
    return "\n".join(parts)


def _yes_no_prompt(question: str) -> str:
    # MME's questions already end with the instruction; POPE's and HallusionBench's do not.
    return question if "yes or no" in question.lower() else question + YES_NO_SUFFIX


def _hallusion_keys(index: str, row: dict) -> dict[str, str] | str:
    keys = {k: _cell(row, k) for k in ("set_id", "figure_id", "question_id")}
    if all(keys.values()):
        return keys
    parts = index.split("_")
    if len(parts) < 6:
        return (
            f"needs set_id/figure_id/question_id columns or an index with them as fields 3-5 "
            f"(like VD_figure_0_0_0_1), got index {index!r}"
        )
    return {"set_id": parts[3], "figure_id": parts[4], "question_id": parts[5]}


def load_benchmark(spec: str, name: str | None = None) -> Benchmark:
    """Read one benchmark file (``KIND=FILE`` or ``FILE``); malformed rows land in ``problems``."""
    kind, path = parse_spec(spec)
    columns, rows = _read_rows(path)
    kind = kind or guess_kind(path, columns)
    required = ["index", "question", "answer"]
    if kind == "mme":
        required.append("category")
    missing = [c for c in required if c not in columns]
    if "image" not in columns and "image_path" not in columns:
        missing.append("image (or image_path)")
    if kind == "mcq" and not {"A", "B"} <= set(columns):
        missing.append("option columns A, B")
    if missing:
        raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)} for a {kind} benchmark; has {columns}")
    base = os.path.dirname(os.path.abspath(path))
    indices = [_cell(r, "index") for r in rows]
    by_index: dict[str, int] = {}
    for i, idx in enumerate(indices):
        by_index.setdefault(idx, i)

    items: list[Item] = []
    images: dict[str, tuple[str, str]] = {}
    problems: list[Problem] = []
    checked: dict[str, str | None] = {}  # image digest -> problem
    for i, row in enumerate(rows):
        line = i + 2
        idx = indices[i]
        if not idx:
            problems.append(Problem("?", line, "empty 'index'"))
            continue
        if by_index[idx] != i:
            problems.append(Problem(idx, line, f"duplicate index (first on line {by_index[idx] + 2})"))
            continue
        if "" in row and _cell(row, ""):
            problems.append(Problem(idx, line, f"more cells than the {len(columns)} header columns"))
            continue
        question = _cell(row, "question")
        if not question:
            problems.append(Problem(idx, line, "empty 'question'"))
            continue

        # Image: a base64 string, the index of the row holding it, or a file path.
        image = _cell(row, "image")
        source: tuple[str, str] | None = None
        error = None
        if image and len(image) <= _MAX_REFERENCE_LEN and image in by_index and image != idx:
            image = _cell(rows[by_index[image]], "image")
        if image:
            candidate = image if os.path.isabs(image) else os.path.join(base, image)
            if len(image) < 4096 and os.path.isfile(candidate):
                source = ("path", candidate)
            else:
                source = ("base64", image)
        elif _cell(row, "image_path"):
            # MME's image_path names the image; it is a file only in some copies of the data.
            p = _cell(row, "image_path")
            p = p if os.path.isabs(p) else os.path.join(base, p)
            if os.path.isfile(p):
                source = ("path", p)
            else:
                error = (
                    f"no image: 'image' is empty and image_path {p} is not a file"
                    if "image" in columns
                    else f"image file not found: {p}"
                )
        else:
            error = "no image ('image' is empty)"
        if error is None:
            # A file's key changes with its contents' size and time, so an image replaced under
            # the same name is a new image to a resumed run (Item.digest).
            stamp = ""
            if source[0] == "path":
                st = os.stat(source[1])
                stamp = f":{st.st_size}:{st.st_mtime_ns}"
            key = hashlib.sha1(f"{source[0]}:{source[1]}{stamp}".encode()).hexdigest()[:16]
            if key not in checked:
                checked[key] = _check_base64(source[1]) if source[0] == "base64" else None
            error = checked[key]
            if error is not None and len(image) <= _MAX_REFERENCE_LEN:
                error = _short_image_cell(image, idx, by_index, base, error)
        if error is not None:
            problems.append(Problem(idx, line, error))
            continue

        answer = _cell(row, "answer")
        category = _cell(row, "category")
        fields: dict[str, str] = {}
        options: dict[str, str] = {}
        if kind in YES_NO_KINDS:
            norm = answer.lower()
            if norm not in ("yes", "no"):
                problems.append(Problem(idx, line, f"answer {answer!r} is not Yes or No"))
                continue
            answer = norm.capitalize()
            prompt = _yes_no_prompt(question)
            if kind == "mme":
                if not category:
                    problems.append(Problem(idx, line, "empty 'category' (MME scores are per category)"))
                    continue
                # acc+ pairs the questions of one image; without image_path the image itself pairs them.
                fields["image_path"] = _cell(row, "image_path") or key
            elif kind == "pope":
                split = _cell(row, "split") or category
                fields["split"] = split
            else:
                keys = _hallusion_keys(idx, row)
                if isinstance(keys, str):
                    problems.append(Problem(idx, line, keys))
                    continue
                fields.update(keys)
                fields["l2-category"] = _cell(row, "l2-category")
        else:
            options = {c: _cell(row, c) for c in OPTION_LETTERS if c in columns and _cell(row, c)}
            if len(options) < 2:
                problems.append(Problem(idx, line, f"needs at least two options, has {sorted(options)}"))
                continue
            if answer.upper() not in options:
                problems.append(Problem(idx, line, f"answer {answer!r} is not one of the options {', '.join(options)}"))
                continue
            answer = answer.upper()
            hint = _cell(row, "hint")
            prompt = _mcq_prompt(question, "" if hint.lower() == "nan" else hint, options)
            fields["l2-category"] = _cell(row, "l2-category")
        images.setdefault(key, source)
        items.append(Item(idx, key, question, prompt, answer, category, fields, options))
    if not items and not problems:
        raise BenchmarkError(f"{path}: no rows")
    stem = os.path.splitext(os.path.basename(path))[0]
    return Benchmark(name or stem, kind, path, items, images, problems)
