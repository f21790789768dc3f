"""Which implementation runs an op: the one place that decides.

:func:`implementation` answers "triton", "cpp" or "torch" for a call's tensors; every public op
(kernels/*.py) asks it once per call and passes the answer on (design §10): the torch path is
called directly, the other two through the op's ``backend`` argument, which its kernels
(Python, and the C++ autograd kernels of csrc/ops.cpp) obey without deciding again.

Triton runs on CUDA tensors, or on CPU tensors when the Triton interpreter is enabled
(``TRITON_INTERPRET=1`` set before any kernel module is imported). Other CPU calls take the C++
kernels of csrc/ (:mod:`fusedvlm.native`, built on first use), or the torch path where those
cannot be built. ``FUSEDVLM_BACKEND=torch`` forces the torch path everywhere (useful to
compare); ``FUSEDVLM_BACKEND=triton`` makes a missing Triton an error instead of a silent
fallback; ``FUSEDVLM_BACKEND=cpp`` keeps CPU tensors off the Triton interpreter (the C++
kernels, or the torch path with one warning where they cannot be built), CUDA ones on Triton.
Both variables are read on every call, so a change takes effect at the next call; a graph
compiled by torch.compile keeps the choice it was traced with.

Nothing here initialises CUDA: the decision looks at a tensor's ``device`` attribute.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from fusedvlm.env import CHOICES, env_choice, parse_choice

_INTERPRETER_OFF = (None, "", "0", "false", "False")


def interpreter_enabled() -> bool:
    return _text(_ENVIRON.get(_INTERPRET_KEY)) not in _INTERPRETER_OFF


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


_FORCED: list[str] = []


def requested_backend() -> str:
    """``FUSEDVLM_BACKEND`` ("auto", "torch", "triton" or "cpp"), or the innermost :func:`forcing`."""
    return _FORCED[-1] if _FORCED else env_choice("FUSEDVLM_BACKEND", "auto")


@contextlib.contextmanager
def forcing(choice: str):
    """Within the block, ops choose as if ``FUSEDVLM_BACKEND=choice`` (without touching the
    environment, which other threads and child processes share)."""
    allowed = CHOICES["FUSEDVLM_BACKEND"]
    if choice not in allowed:
        raise ValueError(f"unknown backend {choice!r}; choose from {', '.join(allowed)}")
    _FORCED.append(choice)
    try:
        yield
    finally:
        _FORCED.pop()


_CPU, _CUDA = frozenset(("cpu",)), frozenset(("cuda",))

# The store behind os.environ, read directly: os.environ.get raises and catches a KeyError for
# an unset variable (over a microsecond, twice per op call), a lookup here costs tens of
# nanoseconds. os.environ writes through to it (putenv too), so a change is seen at the next call.
_ENVIRON = os.environ._data
_BACKEND_KEY = os.environ.encodekey("FUSEDVLM_BACKEND")
_INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET")


def implementation(*tensors: torch.Tensor | None) -> str:
    """ "triton", "cpp" or "torch": the implementation an op runs on these tensors (None skipped).

    Called on every op call: the public functions pass one tensor, since their check has put
    every tensor on one device; that case names its device without building a device object."""
    if len(tensors) == 1 and tensors[0] is not None:
        t = tensors[0]
        devices = _CPU if t.is_cpu else _CUDA if t.is_cuda else frozenset((t.device.type,))
    else:
        devices = frozenset(t.device.type for t in tensors if t is not None)
    return _decide(devices)


# torch.compile calls this at trace time and keeps the answer as a constant of the graph,
# rather than tracing the environment and the lazy C++ build.
@torch.compiler.assume_constant_result
def _decide(devices: frozenset) -> str:
    backend = _FORCED[-1] if _FORCED else _ENVIRON.get(_BACKEND_KEY)
    return _choose(backend, _ENVIRON.get(_INTERPRET_KEY), devices)


def _text(raw: str | bytes | None) -> str | None:
    return raw if raw is None or isinstance(raw, str) else os.environ.decodevalue(raw)


# Keyed by the variables' raw values, so a change takes effect at the next call while an
# unchanged environment costs two lookups.
@functools.lru_cache(maxsize=64)
def _choose(backend: str | bytes | None, interpret: str | bytes | None, devices: frozenset) -> str:
    backend, interpret = _text(backend), _text(interpret)
    choice = parse_choice("FUSEDVLM_BACKEND", backend, "auto")
    if choice == "torch":
        return "torch"
    on_cpu = devices <= {"cpu"}
    interpreted = interpret not in _INTERPRETER_OFF and choice != "cpp"
    if (devices == {"cuda"} or (on_cpu and interpreted)) and triton_available():
        return "triton"
    if choice == "triton":
        raise RuntimeError(
            "FUSEDVLM_BACKEND=triton but Triton cannot run here "
            f"(devices={sorted(devices)}, triton installed={triton_available()}, TRITON_INTERPRET={interpret or '0'})"
        )
    if on_cpu:
        from fusedvlm import native

        if native.available():
            return "cpp"
    return "torch"


# No arguments to parse: half the cost of asking for one device, and the usual answer.
_any_autocast = torch._C._is_any_autocast_enabled


def autocast_enabled(t: torch.Tensor) -> bool:
    """``torch.is_autocast_enabled`` for ``t``'s device (a CPU tensor's without building a device
    object: the public ops ask on every call)."""
    return _any_autocast() and torch.is_autocast_enabled("cpu" if t.is_cpu else t.device.type)


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
