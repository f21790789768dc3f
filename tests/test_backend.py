import pytest
import torch

from fusedvlm import backend


def test_cpu_without_interpreter_takes_cpp_or_torch(monkeypatch):
    from fusedvlm import native

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FUSEDVLM_BACKEND", raising=False)
    assert backend.backend_name(torch.zeros(1)) == ("cpp" if native.available() else "torch")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    assert backend.backend_name(torch.zeros(1)) == "torch"


def test_cpp_choice_keeps_cpu_off_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "cpp")
    assert not backend.use_triton(torch.zeros(1))


def test_interpreter_selects_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FUSEDVLM_BACKEND", raising=False)
    assert backend.use_triton(torch.zeros(1)) == backend.triton_available()


def test_forced_torch_and_bad_choice(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    assert not backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("FUSEDVLM_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FUSEDVLM_BACKEND"):
        backend.use_triton(torch.zeros(1))


def test_forced_triton_without_support_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FUSEDVLM_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="Triton cannot run here"):
        backend.use_triton(torch.zeros(1))


def test_import_does_not_initialise_cuda():
    import subprocess
    import sys

    code = (
        "import torch, fusedvlm, fusedvlm.kernels, fusedvlm.model, fusedvlm.session, fusedvlm.cli;"
        "fusedvlm.cli.build_parser();"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
