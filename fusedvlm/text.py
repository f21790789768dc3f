"""Checks on user text (questions, answers, prompts) before it reaches a tokenizer."""

from __future__ import annotations


def check_text(text, what: str = "text", where: str | None = None) -> str:
    """``text`` if it is a non-empty ``str`` that encodes as UTF-8, else one ValueError naming
    the problem. Lone surrogates are what Python makes of undecodable bytes (command-line
    arguments in another encoding, ``errors='surrogateescape'``); tokenizers fail on them
    deep inside with a traceback. ``where`` names the file the text came from, if any."""
    at = f" in {where}" if where else ""
    if not isinstance(text, str):
        raise ValueError(f"{what}{at} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"empty {what}{at}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        chars = text[e.start : e.end]
        try:
            bad = f"undecodable byte(s) {chars.encode('utf-8', 'surrogateescape')!r}"
        except UnicodeEncodeError:
            bad = f"lone surrogate {chars!r}"
        raise ValueError(f"{what}{at} is not valid UTF-8 text: {bad} at character {e.start}") from None
    return text
