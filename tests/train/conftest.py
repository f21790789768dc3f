import os
import subprocess
import sys

import pytest

from fusedvlm.train.synthetic import write_dataset


def run_env():
    """Subprocesses: one thread each, so that runs compare bit for bit and stay polite."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def cli(*args, check=True, **kw):
    cmd = [sys.executable, "-m", "fusedvlm.cli", *map(str, args)]
    return subprocess.run(cmd, env=run_env(), capture_output=True, text=True, check=check, timeout=600, **kw)


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory):
    """24 small images, 2 questions each: enough for cheap multi-step runs."""
    root = tmp_path_factory.mktemp("small_shapes")
    return str(root), write_dataset(str(root), 24, seed=11, size=64)
