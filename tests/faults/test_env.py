"""Environment variables (issue 26): one parser; an empty or unknown value is refused with the
allowed ones named, and false/no/off/0 all mean off (``FUSEDVLM_COMPILE=false`` compiled on
29b7c74, and an empty ``FUSEDVLM_BACKEND`` only failed inside the first op)."""

from __future__ import annotations

import pytest

from fusedvlm.cli import main
from fusedvlm.decode.engine import compile_default


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "OFF"])
def test_compile_off_spellings(monkeypatch, value):
    monkeypatch.setenv("FUSEDVLM_COMPILE", value)
    assert compile_default() is False


@pytest.mark.parametrize("value", ["1", "true", "Yes", "on"])
def test_compile_on_spellings(monkeypatch, value):
    monkeypatch.setenv("FUSEDVLM_COMPILE", value)
    assert compile_default() is True


@pytest.mark.parametrize("value", ["", "maybe", "2"])
def test_compile_bad_values_are_refused(monkeypatch, value):
    monkeypatch.setenv("FUSEDVLM_COMPILE", value)
    with pytest.raises(ValueError, match=r"FUSEDVLM_COMPILE=.*expected one of 1, true, yes, on \(on\) or 0, false"):
        compile_default()


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("FUSEDVLM_BACKEND", "", "FUSEDVLM_BACKEND='': expected one of auto, torch, triton, cpp"),
        ("FUSEDVLM_BACKEND", "cuda", "FUSEDVLM_BACKEND='cuda': expected one of auto, torch, triton, cpp"),
        ("FUSEDVLM_COMPILE", "", "FUSEDVLM_COMPILE='': expected one of"),
        ("FUSEDVLM_MERGE_FORM", "fast", "FUSEDVLM_MERGE_FORM='fast': expected one of direct, winograd"),
        ("FUSEDVLM_CACHE", "", "FUSEDVLM_CACHE is set but empty"),
    ],
)
def test_cli_refuses_bad_environment_up_front(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    assert main(["info", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_backend_is_case_insensitive(monkeypatch):
    from fusedvlm.backend import requested_backend

    monkeypatch.setenv("FUSEDVLM_BACKEND", "Torch")
    assert requested_backend() == "torch"


class _ClosedPipe:
    """A stdout whose reader went away (``fusedvlm info | head``)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_exits_quietly(monkeypatch, capsys):
    # On 29b7c74 a BrokenPipeError traceback.
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["info", "--preset", "tiny"]) == 141
    assert capsys.readouterr().err == ""
