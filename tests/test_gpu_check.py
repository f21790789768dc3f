"""tools/gpu_check.py (``make gpu-check``): the parts that run without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tool_scripts import tool_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_check():
    with tool_module("gpu_check") as module:
        yield module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_clearly_without_cuda(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "needs a CUDA GPU" in r.stderr and "nothing was run" in r.stderr
    assert not os.listdir(tmp_path)


def test_plan_fits_the_time_budget_and_names_real_files(gpu_check, tmp_path):
    steps = gpu_check.plan(str(tmp_path))
    assert [s.name for s in steps] == [
        "cuda-tests",
        "local-merge",
        "packed-attn",
        "pairwise",
        "paper-bench",
        "decode",
        "fusion-train",
    ]
    assert sum(s.timeout_s for s in steps) < 8 * 60
    for step in steps:
        scripts = [a for a in step.argv if a.endswith(".py") and not a.startswith("tests/")]
        assert all(os.path.exists(a) for a in scripts), step
    paper = next(s for s in steps if s.name == "paper-bench")
    assert paper.needs == ("open_clip",) and "768,256,64,1" in paper.argv
    assert gpu_check.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_missing_packages_give_skipped_rows(gpu_check, tmp_path):
    row = gpu_check.run_step(gpu_check.Step("x", ["false"], 5, needs=("no_such_module_xyz",)), str(tmp_path))
    assert row.status == "skipped: no_such_module_xyz not installed"
    rows = [row, gpu_check.Row("y", "ok", 1.0, "y.log", ["y.json"])]
    gpu_check.write_summary(rows, str(tmp_path), dict(gpu="G", torch="t", triton="tr", cuda="c", git="g", total_s=1.0))
    md = (tmp_path / "summary.md").read_text()
    assert "| x | skipped: no_such_module_xyz not installed |" in md and "| y | ok | 1.0 | y.log | y.json |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["steps"][1]["outputs"] == ["y.json"]


def test_fusion_training_runs_without_open_clip_or_fvcore():
    """What the GPU image lacks must not be needed by the fusion-training step or the kernel benchmarks."""
    code = (
        "import sys; sys.modules['open_clip'] = None; sys.modules['fvcore'] = None\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'tools')!r}); sys.path.insert(0, {ROOT!r})\n"
        "import bench.bench_local_merge, bench.bench_packed_attention, bench.bench_pairwise_cosine\n"
        "import gpu_check, torch\n"
        "torch.set_num_threads(1)\n"
        "r = gpu_check.fusion_training(steps=3, device='cpu', preset='tiny', images=2, views=2, n_l=4, lr=1e-3)\n"
        "assert r['losses'][-1] < r['losses'][0] and r['tokens_per_s'] > 0, r\n"
        "print('ok', r['losses'])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]
