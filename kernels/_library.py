"""The ``fusedvlm::`` operator library that kernels/*.py register their ops in.

Every op is a real dispatcher operator (schema here in Python, so it exists with or without a
C++ compiler): a CPU kernel (the C++ one of csrc/ through :mod:`fusedvlm.native`, the Triton
interpreter when a test selects it, else a torch fallback), a CUDA kernel (Triton), a fake
kernel for torch.compile and meta tensors, autograd where the op is differentiable, and a FLOP
formula so that ``FlopCounterMode`` counts it wherever it is called.
"""

from __future__ import annotations

import torch

from fusedvlm import native
from fusedvlm.backend import interpreter_enabled, requested_backend, use_triton

LIB = torch.library.Library("fusedvlm", "DEF")


def cpu_implementation(*tensors: torch.Tensor) -> str:
    """"triton" (the interpreter), "cpp" or "torch": what a CPU op kernel runs on these tensors.

    Called on every op call, so it reads the environment twice and nothing else on the common
    path (the C++ build is looked up once, then cached)."""
    choice = requested_backend()
    if choice == "torch":
        return "torch"
    if choice != "cpp" and interpreter_enabled() and use_triton(*tensors):
        return "triton"
    return "cpp" if native.available() else "torch"
