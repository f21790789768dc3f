"""The C++ CPU kernels of csrc/: built with ninja on first use, cached, or a torch fallback.

``load()`` compiles csrc/ through ``torch.utils.cpp_extension`` the first time a CPU op needs it
(importing fusedvlm never compiles) into a build directory keyed by the content of the sources,
the compiler flags, the torch version and the Python version:

    $TORCH_EXTENSIONS_DIR (else $FUSEDVLM_CACHE/extensions, default ~/.cache/fusedvlm/extensions)
        /torch-<version>-py<major><minor>/fusedvlm_cpu_<content hash>/

The sources are copied into that directory and compiled from there, so two checkouts (or an
install) of the same sources share one build, a second process loads it in milliseconds, and
changed sources build afresh in a new directory. ninja's file lock (the baton in that directory)
makes concurrent first builds wait for one another. The build prints one line when it starts and
one when it is done. When it fails (no C++ compiler, no ninja) every op keeps its torch path and
one warning says why.

One build carries every kernel variant of the CPU's family (csrc/variant.h): baseline, and on
x86-64 AVX2 and AVX-512. The library runs the widest this CPU supports; ``FUSEDVLM_ISA``
(``auto``, ``baseline``, ``avx2``, ``avx512``) or :func:`set_isa` picks another.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from fusedvlm.env import CHOICES, env_choice

_NAME = "fusedvlm_cpu"
# Written into a build directory once its library is linked and loaded.
_COMPLETE = "complete"
_SOURCES = (
    "common.cpp",
    "variant_baseline.cpp",
    "variant_avx2.cpp",
    "variant_avx512.cpp",
    "isa.cpp",
    "ops.cpp",
    "bindings.cpp",
)


def source_dir() -> Path:
    """csrc/ beside the package (a source checkout or an editable install), else package data."""
    here = Path(__file__).resolve().parent.parent / "csrc"
    if (here / _SOURCES[0]).is_file():
        return here
    return Path(str(importlib.resources.files("fusedvlm.csrc")))


def _cflags() -> list[str]:
    # -fopenmp: at::parallel_for is inline OpenMP in the headers (without it every kernel runs
    # on one thread); the library links the libgomp torch itself loads (see _ldflags). No -m
    # flags: the variants choose their ISA in the sources (csrc/variant.h), so one build serves
    # every CPU of the family.
    return ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def _ldflags() -> list[str]:
    # The OpenMP runtime torch ships and has already loaded (one runtime per process), as
    # torch.compile's own C++ kernels link it.
    return [f"-L{Path(torch.__file__).parent / 'lib'}", "-lgomp"]


def _source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.suffix in (".cpp", ".h", ".inc"))


def extensions_root() -> Path:
    return Path(
        os.environ.get("TORCH_EXTENSIONS_DIR")
        or os.path.join(
            os.environ.get("FUSEDVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fusedvlm")), "extensions"
        )
    )


def build_dir(flags: list[str], src: Path | None = None) -> tuple[str, Path]:
    """(library name, directory) for the sources in ``src`` (default: :func:`source_dir`) built
    with ``flags``: keyed by the sources' names and bytes, never by where they are."""
    # Not the -L path of torch's lib folder: it names the venv, and the tag below already pins the
    # torch version, so checkouts with venvs of their own share one build.
    link = [f for f in _ldflags() if not f.startswith("-L")]
    key = hashlib.sha256(" ".join(flags + link).encode())
    for path in _source_files(src or source_dir()):
        key.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        key.update(path.read_bytes())
    name = f"{_NAME}_{key.hexdigest()[:12]}"
    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return name, extensions_root() / tag / name


def _copy_sources(src: Path, dest: Path) -> None:
    """The sources into ``dest`` (their content is the directory's key); a file already there is
    left untouched, so ninja sees nothing new."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in _source_files(src):
        target = dest / path.name
        data = path.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        tmp = target.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)  # atomic: a concurrent build never reads half a file


class NativeUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded here."""


# The kernel variants, narrowest first: FUSEDVLM_ISA's values less "auto" (one list, in env.py).
ISAS = CHOICES["FUSEDVLM_ISA"][1:]


def requested_isa() -> str | None:
    """The variant ``FUSEDVLM_ISA`` asks for, or None for the widest this CPU runs (unset/auto)."""
    value = env_choice("FUSEDVLM_ISA", "auto")
    return None if value == "auto" else value


@functools.cache
def _load():
    """The extension module, or the exception that kept it from loading (cached either way)."""
    requested = requested_isa()  # a bad value is an error, not a reason to fall back to torch
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

        flags = _cflags()
        name, directory = build_dir(flags)
        library, complete = directory / f"{name}.so", directory / _COMPLETE
        if library.exists() and complete.is_file():
            # The directory's key (sources, flags, torch version) says the library is current.
            # Running ninja again would rebuild it whenever another checkout's venv loads it:
            # its commands name that venv's torch headers.
            torch.ops.load_library(str(library))
        else:
            built = library.exists()
            if not built:
                earlier = (
                    [p.name for p in directory.parent.glob(f"{_NAME}_*") if p != directory]
                    if directory.parent.is_dir()
                    else []
                )
                why = "csrc/ differs from the cached builds" if earlier else "first use"
                print(
                    f"fusedvlm: building the C++ CPU kernels ({why}; every ISA variant, about 2 minutes on 2 cores) "
                    f"into {directory}",
                    file=sys.stderr,
                    flush=True,
                )
            start = time.perf_counter()
            _copy_sources(source_dir(), directory / "src")
            src = directory / "src"
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
            complete.write_text(f"built by {sys.executable}\n")
            if not built:
                print(
                    f"fusedvlm: built the C++ CPU kernels in {time.perf_counter() - start:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        mod = torch.ops.fusedvlm
        _register_fakes()
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [repr(exc)]
        first_error = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
        return NativeUnavailable(f"{type(exc).__name__}: {first_error}")
    if requested is not None:
        set_isa(requested, mod)
    return mod


def _register_fakes() -> None:
    # Shapes for torch.compile's tracing of the ops the lean decode step calls.
    @torch.library.register_fake("fusedvlm::linear")
    def _(x, weights, biases, scales=None):
        return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))

    @torch.library.register_fake("fusedvlm::decode_attention")
    def _(q, k_cache, v_cache, pos, scale):
        return q.new_empty(q.shape)


def load():
    """``torch.ops.fusedvlm`` with the compiled kernels loaded into it (``*_cpu``, ``linear``, ...);
    raises :class:`NativeUnavailable` naming why they are missing."""
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


def isa() -> str:
    """The kernel variant the C++ ops run (building them if needed); raises NativeUnavailable."""
    return load().isa()


def supported_isas() -> list[str]:
    """The variants this CPU can run, narrowest first."""
    return list(load().supported_isas())


def set_isa(name: str, mod=None) -> None:
    """Run the C++ ops with variant ``name`` from now on (process-wide); ValueError naming the
    allowed ones for an unknown name, or the ones this CPU runs for a variant it cannot."""
    if name not in ISAS:
        raise ValueError(f"unknown kernel variant {name!r}; choose from {', '.join(ISAS)}")
    (mod or load()).set_isa(name)


def status() -> str:
    """One line for ``fusedvlm info``: built, or why not (builds on first call)."""
    mod = _load()
    if isinstance(mod, Exception):
        return f"unavailable ({mod})"
    blas = "MKL/OpenBLAS sgemm" if mod.have_blas() else "at::addmm tiles"
    how = "FUSEDVLM_ISA" if requested_isa() else "widest this CPU runs"
    return (
        f"built ({build_dir(_cflags())[1]}; ISA variant {mod.isa()} ({how}; this CPU runs "
        f"{', '.join(mod.supported_isas())}); GEMM tiles via {blas})"
    )
