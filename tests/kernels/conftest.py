"""Interpreter tests: ``@pytest.mark.interpreter`` runs the test's ops on the Triton kernels.

On a CPU-only machine tests/conftest.py selects the Triton interpreter for the whole session
before triton is first imported (triton fixes that choice at import) and keeps every other test
on the torch path with ``FUSEDVLM_BACKEND=torch``; this fixture lifts that for marked tests.
Without the interpreter (a GPU machine, or FUSEDVLM_TEST_INTERPRET=0) they are skipped here and
test_interpreter_subprocess.py runs them all in one interpreter subprocess, next to the native
``cuda`` tests.
"""

import pytest

from fusedvlm.backend import interpreter_enabled, triton_available


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    if request.node.get_closest_marker("interpreter") is None:
        return
    if not triton_available():
        pytest.skip("triton is not installed")
    if not interpreter_enabled():
        pytest.skip("Triton runs natively in this session: test_interpreter_subprocess.py runs this test interpreted")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "auto")
