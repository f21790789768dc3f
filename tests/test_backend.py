import pytest
import torch

from fusedvlm import backend


def test_cpu_without_interpreter_takes_cpp_or_torch(monkeypatch):
    from fusedvlm import native

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FUSEDVLM_BACKEND", raising=False)
    assert backend.implementation(torch.zeros(1)) == ("cpp" if native.available() else "torch")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    assert backend.implementation(torch.zeros(1)) == "torch"


def test_cpp_choice_keeps_cpu_off_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "cpp")
    assert backend.implementation(torch.zeros(1)) != "triton"


def test_interpreter_selects_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FUSEDVLM_BACKEND", raising=False)
    assert (backend.implementation(torch.zeros(1)) == "triton") == backend.triton_available()


def test_none_is_skipped_and_other_devices_take_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FUSEDVLM_BACKEND", raising=False)
    assert backend.implementation(torch.zeros(1), None) == backend.implementation(torch.zeros(1))
    assert backend.implementation(torch.zeros(1, device="meta")) == "torch"


def test_forced_torch_and_bad_choice(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "torch")
    assert backend.implementation(torch.zeros(1)) == "torch"
    monkeypatch.setenv("FUSEDVLM_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FUSEDVLM_BACKEND"):
        backend.implementation(torch.zeros(1))


def test_forced_triton_without_support_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FUSEDVLM_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="Triton cannot run here"):
        backend.implementation(torch.zeros(1))


def test_decided_in_one_place():
    """Only fusedvlm/backend.py reads FUSEDVLM_BACKEND / TRITON_INTERPRET to pick an
    implementation: the op kernels (Python and csrc/) obey the ``backend`` argument."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readers = sorted(
        str(path.relative_to(root))
        for folder in ("fusedvlm", "kernels", "csrc")
        for path in (root / folder).rglob("*")
        if path.suffix in (".py", ".cpp", ".inc", ".h")
        and any(name in path.read_text() for name in ('"FUSEDVLM_BACKEND"', '"TRITON_INTERPRET"'))
    )
    assert readers == ["fusedvlm/backend.py", "fusedvlm/env.py"], readers


def test_import_does_not_initialise_cuda():
    import subprocess
    import sys

    code = (
        "import torch, fusedvlm, fusedvlm.kernels, fusedvlm.model, fusedvlm.session, fusedvlm.cli;"
        "fusedvlm.cli.build_parser();"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
