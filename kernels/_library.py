"""The ``fusedvlm::`` operator library that kernels/*.py register their ops in.

Every op is a real dispatcher operator (schema here in Python, so it exists with or without a
C++ compiler): a CPU kernel (the C++ one of csrc/ through :mod:`fusedvlm.native`, the Triton
interpreter when a test selects it, else a torch fallback), a CUDA kernel (Triton), a fake
kernel for torch.compile and meta tensors, autograd where the op is differentiable, and a FLOP
formula so that ``FlopCounterMode`` counts it wherever it is called.
"""

from __future__ import annotations

import torch

from fusedvlm.backend import requested_backend, use_triton

LIB = torch.library.Library("fusedvlm", "DEF")


def cpu_implementation(*tensors: torch.Tensor) -> str:
    """"triton" (the interpreter), "cpp" or "torch": what a CPU op kernel runs on these tensors."""
    if requested_backend() == "torch":
        return "torch"
    if use_triton(*tensors):
        return "triton"
    from fusedvlm import native

    return "cpp" if native.available() else "torch"
