"""Interpreter tests: ``@pytest.mark.interpreter`` runs the test's ops on the Triton kernels.

On a CPU-only machine tests/conftest.py selects the Triton interpreter for the whole session
before triton is first imported (triton fixes that choice at import) and keeps every other test
on the torch path with ``FUSEDVLM_BACKEND=torch``; this fixture lifts that for marked tests.
Without the interpreter (a GPU machine, or FUSEDVLM_TEST_INTERPRET=0) they are skipped: the
``cuda`` tests cover the same kernels natively there.
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
        pytest.skip("the Triton interpreter was not selected at session start (TRITON_INTERPRET=1)")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "auto")
