"""Session setup and shared fixtures: offline everywhere, small random models built once.

Triton picks the interpreter when it is first imported (it decorates its own library, e.g.
``tl.zeros``, at import), so switching ``TRITON_INTERPRET`` per test breaks as soon as any
earlier test imported triton natively. On a machine without CUDA the whole session therefore
starts with the interpreter selected, and ``FUSEDVLM_BACKEND=torch`` keeps every op on the torch
path except in tests marked ``interpreter`` (tests/kernels/conftest.py switches those to the
kernels). ``FUSEDVLM_TEST_INTERPRET=0`` opts out (native Triton, e.g. compile-only tests).
"""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Chat sessions decode through the lean static-cache step uncompiled: a cold inductor compile
# costs 20-80 s on 2 cores; tests/test_decoding.py compiles it once on purpose.
os.environ.setdefault("FUSEDVLM_COMPILE", "0")


def _select_interpreter() -> None:
    if os.environ.get("FUSEDVLM_TEST_INTERPRET", "1") == "0":
        return
    import torch

    if torch.cuda.is_available():
        return  # kernel tests run natively on a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FUSEDVLM_BACKEND", "cpp")


_select_interpreter()

import pytest
import torch


def _pinned_threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["torch", "cpp", "triton"])
def op_backend(request, monkeypatch):
    """Each implementation of the fusedvlm ops in turn (FUSEDVLM_BACKEND): the torch path, the C++
    CPU kernels and the Triton kernels (under the interpreter on a CPU, see above)."""
    from fusedvlm import native
    from fusedvlm.backend import interpreter_enabled, triton_available

    if request.param == "cpp" and not native.available():
        pytest.skip(f"the C++ kernels are not built here: {native.status()}")
    if request.param == "triton" and not (triton_available() and interpreter_enabled()):
        pytest.skip("the Triton interpreter was not selected at session start")
    monkeypatch.setenv("FUSEDVLM_BACKEND", request.param)
    return request.param


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    yield from _pinned_threads(1)


@pytest.fixture
def two_threads():
    """Two torch threads: the C++ kernels' work splits that only exist with several threads."""
    yield from _pinned_threads(2)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """``tmp_path_factory.mktemp`` for module-scoped fixtures; the folders go when the module's
    tests end. CI runs on the developer's disk, and the checkpoints written here reach 2 GB."""
    made = []

    def mktemp(name: str):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model():
    from fusedvlm.model import FusedVLM

    torch.manual_seed(0)
    return FusedVLM.from_preset("tiny").eval()


@pytest.fixture(scope="session")
def photo():
    from fusedvlm.samples import sample_image

    return sample_image("coffee")
