"""The interpreter tests where this session runs Triton natively (a GPU machine).

Triton fixes interpreter or compiler when it is first imported, so a session that runs the
kernels natively skips the ``interpreter`` tests (tests/kernels/conftest.py). They are the ones
that run every GPU tile configuration on tile-boundary shapes, which native runs do not cover
(a GPU picks one configuration per shape), so here they run in one subprocess that selects the
interpreter before importing triton and hides the GPU from it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from fusedvlm.backend import interpreter_enabled, triton_available

KERNEL_TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(interpreter_enabled(), reason="this session runs the interpreter tests itself")
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_interpreter_tests_pass_in_a_subprocess():
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "FUSEDVLM_TEST_INTERPRET": "1",
        "FUSEDVLM_BACKEND": "torch",
        "CUDA_VISIBLE_DEVICES": "",
    }
    # A GPU host has the cores to spread the interpreter's numpy programs over (pytest-xdist).
    workers = ["-n", "4"] if importlib.util.find_spec("xdist") and (os.cpu_count() or 1) >= 8 else []
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, "-m", "interpreter", KERNEL_TESTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1], tail
