"""The one parser of fusedvlm's environment variables.

Every ``FUSEDVLM_*`` switch is read here: a flag takes 1/true/yes/on or 0/false/no/off (any
case), a choice one of its listed values; an empty or unknown value is refused with the allowed
ones named, never read as a default (``FUSEDVLM_COMPILE=false`` compiled, an empty
``FUSEDVLM_BACKEND`` made every op raise). The command line checks them all before it starts
(:func:`check_environment`), so a typo is one line at once. Reading never touches CUDA.
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# name -> allowed values (a flag: None), the default first. FUSEDVLM_MERGE_FORM is read by
# csrc/local_merge.cpp; FUSEDVLM_ISA (the C++ kernels' variant) by fusedvlm/native.py.
CHOICES: dict[str, tuple[str, ...] | None] = {
    "FUSEDVLM_BACKEND": ("auto", "torch", "triton", "cpp"),
    "FUSEDVLM_COMPILE": None,
    "FUSEDVLM_MATVEC": None,
    "FUSEDVLM_MERGE_FORM": ("direct", "winograd"),
    "FUSEDVLM_ISA": ("auto", "baseline", "avx2", "avx512"),
}
# Paths: any non-empty value.
PATHS = ("FUSEDVLM_CACHE",)


def env_flag(name: str, default: bool) -> bool:
    """``name`` as a boolean switch, ``default`` when unset."""
    value = os.environ.get(name)
    if value is None:
        return default
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected one of {', '.join(_TRUE)} (on) or {', '.join(_FALSE)} (off)")


def env_choice(name: str, default: str) -> str:
    """``name`` as one of ``CHOICES[name]`` (case-insensitive), ``default`` when unset."""
    return parse_choice(name, os.environ.get(name), default)


def parse_choice(name: str, value: str | None, default: str) -> str:
    """``value`` of variable ``name`` (None: unset) as :func:`env_choice` reads it."""
    if value is None:
        return default
    allowed = CHOICES[name]
    low = value.strip().lower()
    if low not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return low


def check_environment() -> None:
    """Raise a one-line ValueError for the first set ``FUSEDVLM_*`` variable with a bad value."""
    for name, allowed in CHOICES.items():
        if allowed is None:
            env_flag(name, True)
        else:
            env_choice(name, allowed[0])
    for name in PATHS:
        if name in os.environ and not os.environ[name].strip():
            raise ValueError(f"{name} is set but empty: give a directory, or unset it")
