import json
import os
import signal
import subprocess
import sys
import time

from tests.train.conftest import cli, run_env


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_kill_and_resume_reproduces_the_uninterrupted_loss_curve(small_shapes, tmp_path):
    root, data = small_shapes
    steps = 12
    args = [
        "train",
        "stage2",
        "--preset",
        "tiny",
        "--hd-num",
        "1",
        "--n-l",
        "4",
        "--data",
        data,
        "--image-root",
        root,
        "--steps",
        steps,
        "--batch-size",
        4,
        "--grad-accum",
        2,
        "--lr",
        "1e-3",
        "--warmup-ratio",
        "0.2",
        "--save-every",
        1,
        "--no-progress",
    ]
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    reference = subprocess.Popen(
        [sys.executable, "-m", "fusedvlm.cli", *map(str, args), "--out", whole],
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    victim = subprocess.Popen(
        [sys.executable, "-m", "fusedvlm.cli", *map(str, args), "--out", broken],
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = os.path.join(broken, "checkpoints", "step-00000003.safetensors")
    deadline = time.time() + 300
    while not os.path.exists(marker) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = len(losses(broken))
    assert 3 <= done_before < steps

    resumed = cli(*args, "--out", broken, "--resume")
    assert "step 12" in resumed.stdout
    out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, out
    want = losses(whole)
    assert len(want) == steps
    assert losses(broken) == want  # bit-identical, step by step
    assert want[-1] < want[0]
