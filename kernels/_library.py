"""The ``fusedvlm::`` operator library that kernels/*.py register their ops in.

Every op is a real dispatcher operator (schema here in Python, so it exists with or without a
C++ compiler): a CPU kernel (the C++ one of csrc/ through :mod:`fusedvlm.native`, or the Triton
interpreter), a CUDA kernel (Triton), a fake kernel for torch.compile and meta tensors, autograd
where the op is differentiable, and a FLOP formula so that ``FlopCounterMode`` counts it
wherever it is called. The compiled C++ library adds its kernels to the same namespace
(``*_cpu``, ``linear``) and, for CPU tensors, C++ autograd kernels (csrc/ops.cpp).

Each op's last argument, ``str backend``, is the implementation the caller chose with
:func:`fusedvlm.backend.implementation`: "cpp" or "triton" (the torch path never reaches an op).
The kernels obey it; :func:`kernel_backend` only refuses a value they cannot run.
"""

from __future__ import annotations

import torch

LIB = torch.library.Library("fusedvlm", "DEF")

_RUNS = {"cpu": ("cpp", "triton"), "cuda": ("triton",)}


def kernel_backend(backend: str, device: torch.device) -> str:
    """``backend`` if an op kernel on ``device`` can run it, else ValueError naming what can."""
    allowed = _RUNS.get(device.type, ())
    if backend not in allowed:
        raise ValueError(
            f"fusedvlm op: backend {backend!r} cannot run on {device.type} tensors; "
            f"choose from {', '.join(allowed) or 'none'} (fusedvlm.backend.implementation picks one)"
        )
    return backend
