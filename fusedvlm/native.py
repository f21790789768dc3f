"""The C++ CPU kernels of csrc/: built with ninja on first use, cached, or a torch fallback.

``load()`` compiles csrc/*.cpp through ``torch.utils.cpp_extension`` the first time a CPU op
needs it (importing fusedvlm never compiles) into a build directory keyed by the torch version,
the Python version and the compiler flags:

    $TORCH_EXTENSIONS_DIR (else $FUSEDVLM_CACHE/extensions, default ~/.cache/fusedvlm/extensions)
        /torch-<version>-py<major><minor>/fusedvlm_cpu_<flags hash>/

where torch keeps a hash of the sources beside the library, so a second process, a second
test or a second run loads the cached library in milliseconds, and a new torch or a changed source builds afresh. ninja's file lock (the baton in that
directory) makes concurrent first builds wait for one another. When the build fails (no C++
compiler, no ninja) every op keeps its torch path and one warning says why.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

_NAME = "fusedvlm_cpu"
_SOURCES = ("common.cpp", "packed_attention.cpp", "pairwise_cosine.cpp", "local_merge.cpp", "ops.cpp", "bindings.cpp")
_HEADERS = ("common.h",)


def source_dir() -> Path:
    """csrc/ beside the package (a source checkout or an editable install), else package data."""
    here = Path(__file__).resolve().parent.parent / "csrc"
    if (here / _SOURCES[0]).is_file():
        return here
    return Path(str(importlib.resources.files("fusedvlm.csrc")))


def _cflags() -> list[str]:
    # -fopenmp: at::parallel_for is inline OpenMP in the headers (without it every kernel runs
    # on one thread); the library links the libgomp torch itself loads (see _ldflags).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            cpu = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpu = ""
        # AVX2/FMA, and AVX-512 (16-lane register tiles and exp), only where this CPU has them;
        # they are part of the cache key below.
        if " avx2" in cpu and " fma" in cpu:
            flags += ["-mavx2", "-mfma"]
            if all(f" {f}" in cpu for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl")):
                flags += ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
    return flags


def _ldflags() -> list[str]:
    # The OpenMP runtime torch ships and has already loaded (one runtime per process), as
    # torch.compile's own C++ kernels link it.
    return [f"-L{Path(torch.__file__).parent / 'lib'}", "-lgomp"]


def build_dir(flags: list[str]) -> tuple[str, Path]:
    # torch's JIT loader keeps its own hash of the sources and rebuilds (incrementally, through
    # ninja) when one changes; the directory separates what it cannot see: torch, Python, flags.
    name = f"{_NAME}_{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:8]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("FUSEDVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fusedvlm")), "extensions"
    )
    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return name, Path(root) / tag / name


class NativeUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded here."""


@functools.cache
def _load():
    """The extension module, or the exception that kept it from loading (cached either way)."""
    try:
        import logging

        # Its import logs "No CUDA runtime is found" on CPU machines: noise for a CPU build.
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            log.setLevel(level)

        src = source_dir()
        flags = _cflags()
        name, directory = build_dir(flags)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / f"{name}.so").exists():
            print(f"fusedvlm: building the C++ CPU kernels once into {directory} (about a minute)", file=sys.stderr)
        cpp_extension.load(
            name=name,
            sources=[str(src / f) for f in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=_ldflags(),
            extra_include_paths=[str(src)],
            build_directory=str(directory),
            verbose=False,
            is_python_module=False,
        )
        return torch.ops.fusedvlm_cpu
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [repr(exc)]
        first_error = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
        return NativeUnavailable(f"{type(exc).__name__}: {first_error}")


def load():
    """``torch.ops.fusedvlm_cpu``, the compiled kernels; raises :class:`NativeUnavailable` naming why it is missing."""
    mod = _load()
    if isinstance(mod, Exception):
        raise mod
    return mod


@functools.cache
def available() -> bool:
    """True when the C++ kernels are built (building them now if needed); warns once if not."""
    mod = _load()
    if isinstance(mod, Exception):
        warnings.warn(
            f"fusedvlm: the C++ CPU kernels could not be built ({mod}); CPU ops use the slower torch paths. "
            "Install a C++ compiler and ninja (pip install ninja) to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def status() -> str:
    """One line for ``fusedvlm info``: built, or why not (builds on first call)."""
    mod = _load()
    if isinstance(mod, Exception):
        return f"unavailable ({mod})"
    blas = "MKL/OpenBLAS sgemm" if mod.have_blas() else "at::addmm tiles"
    return f"built ({build_dir(_cflags())[1]}; GEMM tiles via {blas})"
