"""The ``fusedvlm::`` operator library that kernels/*.py register their ops in.

Every op is a real dispatcher operator (schema here in Python, so it exists with or without a
C++ compiler): a CPU kernel (the C++ one of csrc/ through :mod:`fusedvlm.native`, the Triton
interpreter when a test selects it, else a torch fallback), a CUDA kernel (Triton), a fake
kernel for torch.compile and meta tensors, autograd where the op is differentiable, and a FLOP
formula so that ``FlopCounterMode`` counts it wherever it is called.

Once the C++ library is loaded it adds, for CPU tensors, C++ autograd kernels (csrc/ops.cpp)
that check the arguments, run the C++ kernel directly when nothing but the CPU backend would see
the call, and otherwise hand it to the Python kernels here: an eager CPU call then costs one
dispatcher hop rather than two Python kernels (see :func:`cpu_op_ready`).
"""

from __future__ import annotations

import torch

from fusedvlm import native
from fusedvlm.backend import interpreter_enabled, requested_backend, use_triton

LIB = torch.library.Library("fusedvlm", "DEF")


def cpu_implementation(*tensors: torch.Tensor) -> str:
    """ "triton" (the interpreter), "cpp" or "torch": what a CPU op kernel runs on these tensors.

    Called on every op call, so it reads the environment twice and nothing else on the common
    path (the C++ build is looked up once, then cached)."""
    choice = requested_backend()
    if choice == "torch":
        return "torch"
    if choice != "cpp" and interpreter_enabled() and use_triton(*tensors):
        return "triton"
    return "cpp" if native.available() else "torch"


def cpu_op_ready() -> bool:
    """True when a public function can hand CPU tensors straight to its ``fusedvlm::`` op.

    That is whenever the C++ library is loaded (building it on the first call) and the torch path
    is not forced: the op's C++ autograd kernel then checks the arguments with the public
    function's messages and picks the implementation (C++, or the Triton interpreter / torch
    kernels above when the environment asks for them), so the caller skips both steps."""
    return requested_backend() != "torch" and native.available()
