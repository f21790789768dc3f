import os
import subprocess
import sys

import pytest
import torch

from tests.train.conftest import run_env

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_grads.py")


def test_two_process_gloo_gradients_equal_single_process(small_shapes, tmp_path):
    root, data = small_shapes
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir()
    ddp_out.mkdir()
    # Same global batch of 8: one process, one micro-batch of 8 / two ranks x two micro-batches of 2.
    single = subprocess.Popen(
        [sys.executable, SCRIPT, data, root, str(single_out), "8", "1"],
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            SCRIPT,
            data,
            root,
            str(ddp_out),
            "8",
            "2",
        ],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    single_log = single.communicate(timeout=600)[0]
    assert single.returncode == 0, single_log
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    a = torch.load(single_out / "grads.pt")
    b = torch.load(ddp_out / "grads.pt")
    assert (a["world"], b["world"]) == (1, 2)
    assert abs(a["loss"] - b["loss"]) < 1e-6 * abs(a["loss"])
    assert a["grads"].keys() == b["grads"].keys()
    assert not any(k.startswith("model.llm.") for k in a["grads"])
    for k in a["grads"]:
        torch.testing.assert_close(b["grads"][k], a["grads"][k], rtol=1e-4, atol=1e-7, msg=k)
    assert any(float(g.abs().max()) > 0 for g in a["grads"].values())


@pytest.mark.slow
def test_stage1_negatives_span_ranks_and_micro_batches(small_shapes, tmp_path):
    """Stage 1's contrastive loss over a global batch of 8: one process with one micro-batch of
    8, two gloo ranks of 4, and one process accumulating two micro-batches of 4 must give the
    same loss and gradients (every pair is a negative for all 7 others in all three)."""
    root, data = small_shapes
    runs = {"single": ("8", "1", None), "ddp": ("8", "1", 2), "accum": ("8", "2", None)}
    procs = {}
    for name, (batch, accum, nproc) in runs.items():
        out = tmp_path / name
        out.mkdir()
        launcher = (
            [sys.executable]
            if nproc is None
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        )
        procs[name] = subprocess.Popen(
            [*launcher, SCRIPT, data, root, str(out), batch, accum, "1"],
            env=run_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for name, p in procs.items():
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"{name}: {log}"
    got = {name: torch.load(tmp_path / name / "grads.pt") for name in runs}
    ref = got["single"]
    assert (ref["world"], got["ddp"]["world"]) == (1, 2)
    assert any(float(g.abs().max()) > 0 for g in ref["grads"].values())
    assert "logit_scale" in ref["grads"] and "text.positional_embedding" in ref["grads"]
    for name in ("ddp", "accum"):
        assert abs(got[name]["loss"] - ref["loss"]) < 1e-5 * abs(ref["loss"]), name
        for k in ref["grads"]:
            torch.testing.assert_close(got[name]["grads"][k], ref["grads"][k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")
