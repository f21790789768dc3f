"""The step runner of ``make gpu-check`` and ``make cpu-check``: each step a subprocess from the
checkout root with its own time limit and log, each a row of the check's summary."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    needs: tuple[str, ...] = ()  # importable modules without which the step is skipped
    outputs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # set for this step's process only


@dataclass
class Row:
    step: str
    status: str  # ok | failed (rc N) | timed out after N s | skipped: ...
    seconds: float
    log: str | None = None
    outputs: list[str] = field(default_factory=list)


def slug(name: str, fallback: str = "unknown") -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (a results folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or fallback


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_step(step: Step, out: str) -> Row:
    missing = [m for m in step.needs if not installed(m)]
    if missing:
        return Row(step.name, f"skipped: {', '.join(missing)} not installed", 0.0)
    log = os.path.join(out, f"{step.name}.log")
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", FUSEDVLM_ROOT=ROOT, **step.env)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(f"{k}={v}" for k, v in step.env.items()) + " " * bool(step.env))
        fh.write(" ".join(step.argv) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(
                step.argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=step.timeout_s
            ).returncode
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {step.timeout_s} s"
    return Row(step.name, status, round(time.perf_counter() - t0, 1), os.path.relpath(log, out), step.outputs)
