"""Which implementation runs an op: the Triton kernel or the torch path.

Triton runs on CUDA tensors, or on CPU tensors when the Triton interpreter is enabled
(``TRITON_INTERPRET=1`` set before any kernel module is imported). Everything else takes
the C++ CPU kernels of csrc/ (:mod:`fusedvlm.native`, built on first use), or the torch path
where those cannot be built. ``FUSEDVLM_BACKEND=torch`` forces the torch path everywhere
(useful to compare); ``FUSEDVLM_BACKEND=triton`` makes a missing Triton an error instead of a
silent fallback; ``FUSEDVLM_BACKEND=cpp`` keeps CPU tensors off the Triton interpreter (the C++
kernels, or the torch path with one warning where they cannot be built), CUDA ones on Triton.

Nothing here initialises CUDA: the decision looks at a tensor's ``device`` attribute.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_CHOICES = ("auto", "torch", "triton", "cpp")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    choice = os.environ.get("FUSEDVLM_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FUSEDVLM_BACKEND={choice!r}: expected one of {_CHOICES}")
    return choice


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel on these tensors."""
    choice = requested_backend()
    if choice == "torch":
        return False
    devices = {t.device.type for t in tensors if t is not None}
    interpret = interpreter_enabled() and choice != "cpp"
    supported = devices == {"cuda"} or (devices <= {"cpu"} and interpret)
    ok = supported and triton_available()
    if choice == "triton" and not ok:
        raise RuntimeError(
            "FUSEDVLM_BACKEND=triton but Triton cannot run here "
            f"(devices={sorted(devices)}, triton installed={triton_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
        )
    return ok


def backend_name(*tensors: torch.Tensor) -> str:
    """"triton", "cpp" or "torch": the implementation an op runs on these tensors."""
    if use_triton(*tensors):
        return "triton"
    if requested_backend() != "torch" and all(t.device.type == "cpu" for t in tensors if t is not None):
        from fusedvlm import native

        if native.available():
            return "cpp"
    return "torch"
