"""Interpreter tests: ``@pytest.mark.interpreter`` runs the test with TRITON_INTERPRET=1.

The variable is set per test (not at import) so that it never leaks into the rest of the
suite, where it would send every CPU op through the slow interpreter. Kernel modules therefore
decorate their ``@triton.jit`` functions lazily, at first launch, keyed on
``fusedvlm.backend.interpreter_enabled()``.
"""

import pytest

from fusedvlm.backend import triton_available


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    if request.node.get_closest_marker("interpreter") is None:
        return
    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDVLM_BACKEND", "auto")
