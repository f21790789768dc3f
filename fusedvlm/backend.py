"""Which implementation runs an op: the Triton kernel or the torch path.

Triton runs on CUDA tensors, or on CPU tensors when the Triton interpreter is enabled
(``TRITON_INTERPRET=1`` set before any kernel module is imported). Everything else takes
the C++ CPU kernels of csrc/ (:mod:`fusedvlm.native`, built on first use), or the torch path
where those cannot be built. ``FUSEDVLM_BACKEND=torch`` forces the torch path everywhere
(useful to compare); ``FUSEDVLM_BACKEND=triton`` makes a missing Triton an error instead of a
silent fallback; ``FUSEDVLM_BACKEND=cpp`` keeps CPU tensors off the Triton interpreter (the C++
kernels, or the torch path with one warning where they cannot be built), CUDA ones on Triton.
The C++ autograd kernels of csrc/ops.cpp read the same two variables on every CPU call
(``cpp_selected`` there), so a change of either takes effect at the next call on every path.

Nothing here initialises CUDA: the decision looks at a tensor's ``device`` attribute.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from fusedvlm.env import env_choice


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    return env_choice("FUSEDVLM_BACKEND", "auto")


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


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype a fused op computes in when its floating inputs may differ in dtype.

    Where autocast is on for the inputs' device, its dtype (what ``F.scaled_dot_product_attention``
    and ``F.conv2d`` compute in there, e.g. fp32 master weights with bf16 activations); else the
    widest input dtype, so nothing is rounded that the caller did not round. Inputs outside
    fp32/fp16/bf16 are never cast down: the op's own check names them.
    """
    present = [t for t in tensors if t is not None]
    floats = [t for t in present if t.is_floating_point()]
    if not floats:
        return present[0].dtype  # nothing to reconcile; the op's dtype check names the problem
    widest = floats[0].dtype
    for t in floats[1:]:
        widest = torch.promote_types(widest, t.dtype)
    device = floats[0].device.type
    if widest in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return widest


def backend_name(*tensors: torch.Tensor) -> str:
    """ "triton", "cpp" or "torch": the implementation an op runs on these tensors."""
    if use_triton(*tensors):
        return "triton"
    if requested_backend() != "torch" and all(t.device.type == "cpu" for t in tensors if t is not None):
        from fusedvlm import native

        if native.available():
            return "cpp"
    return "torch"


# Tile configurations forced by name (tests): each kernel module lists the configurations its
# GPU launches can choose in ``TILE_CONFIGS`` and asks :func:`forced_tiles` before choosing.
_FORCED_TILES: dict[str, tuple] = {}


@contextlib.contextmanager
def force_tiles(**configs: tuple):
    """Within the block, the named launches (``TILE_CONFIGS`` keys of a kernel module, e.g.
    ``packed_attention_fwd=(128, 64, 8, 3)``) run with these tiles whatever the device, so the
    interpreter can run exactly the tiles a GPU compiles."""
    saved = dict(_FORCED_TILES)
    _FORCED_TILES.update(configs)
    try:
        yield
    finally:
        _FORCED_TILES.clear()
        _FORCED_TILES.update(saved)


def forced_tiles(name: str) -> tuple | None:
    return _FORCED_TILES.get(name)
