"""Command-line options generated from typed config dataclasses, so that every default lives
once, in its dataclass, and a new field is a new option with nothing else to write.

A field ``max_grad_norm: float = 1.0`` becomes ``--max-grad-norm`` (type float, default 1.0);
its ``metadata`` may carry ``help``, ``choices`` and ``aliases`` (more spellings of the flag). ``X | None`` takes an X; a ``Literal``
gives the choices; ``bool`` fields are switches (``--name`` when the default is False,
``--no-name`` when it is True); a field without a default is a required option.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

_SCALARS = (int, float, str)


def _option_type(cls: type, f: dataclasses.Field, hint: Any) -> tuple[type, tuple | None]:
    """(scalar type, choices or None) of a field's annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            hint, args = rest[0], typing.get_args(rest[0])
    if typing.get_origin(hint) is Literal:
        return type(args[0]), tuple(args)
    if hint in (*_SCALARS, bool):
        return hint, f.metadata.get("choices")
    raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {hint!r}")


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
) -> list[str]:
    """Add one option per init field of dataclass ``cls`` (except ``exclude``; of ``only``,
    where given); returns the field names added. ``defaults`` replaces a field's default on
    this command line only (a per-command value such as a stage's warm-up, or None for "decided
    later from other options"); ``helps`` replaces the default's description in the help text."""
    defaults, helps = defaults or {}, helps or {}
    unknown = (set(defaults) | set(helps) | set(exclude) | set(only or ())) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude or (only is not None and f.name not in only):
            continue
        typ, choices = _option_type(cls, f, hints[f.name])
        default = defaults.get(f.name, field_default(f))
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        if default is dataclasses.MISSING:
            kw = {"required": True, "type": typ}
        elif typ is bool:
            if default:
                flag = "--no-" + f.name.replace("_", "-")
                text = f"turn off: {text}" if text else text
            kw = {"action": "store_false" if default else "store_true", "default": default}
        else:
            shown = helps.get(f.name, "%(default)s")
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
            kw = {"type": typ, "default": default}
        if choices is not None:
            kw["choices"] = choices
        parser.add_argument(flag, *f.metadata.get("aliases", ()), dest=f.name, help=text or None, **kw)
        added.append(f.name)
    return added


def from_options(cls: type, args: argparse.Namespace, **overrides: Any):
    """An instance of ``cls`` from the parsed options :func:`add_options` added (fields it
    did not add keep their defaults); ``overrides`` win over the command line."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**values, **overrides})
