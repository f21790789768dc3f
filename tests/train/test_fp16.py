"""fp16 mixed-precision training: autocast(float16) + dynamic loss scaling (train/loop.py)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fusedvlm.config import get_preset
from fusedvlm.train.cli import build_trainer
from fusedvlm.train.config import TrainConfig
from tests.train.conftest import run_env

FSDP_SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp_fp16.py")

# Measured on CPU (torch 2.14), tiny preset, 6 steps at lr 1e-3: the largest per-step
# |fp16 - fp32| / fp32 was 6.1e-6 for the stage-2 loss and 2.7e-4 for the logged gradient norm;
# the bounds leave > 15x margin.
FP16_LOSS_RTOL = 1e-4
FP16_GRAD_NORM_RTOL = 5e-3


class Killed(Exception):
    """Stops a run right after a checkpoint, as a kill would."""


def trainer_for(small_shapes, out, precision, steps=6, **kw):
    root, data = small_shapes
    torch.manual_seed(0)
    cfg = get_preset("tiny", hd_num=1, n_l=4)
    train_cfg = TrainConfig(
        steps=steps, batch_size=4, grad_accum=2, lr=1e-3, warmup_ratio=0.2, precision=precision, progress=False, **kw
    )
    return build_trainer(2, cfg, data, root, str(out), train_cfg)[0]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def inject_overflow_at(trainer, step):
    """Puts an inf into one gradient of the optimiser step that starts at ``step``."""
    accumulate = trainer.accumulate_gradients

    def poisoned(micro_batches):
        loss = accumulate(micro_batches)
        if trainer.step == step:
            next(p for _, p in trainer.named_params if p.grad is not None).grad.view(-1)[0] = math.inf
        return loss

    trainer.accumulate_gradients = poisoned


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.named_params}


def test_fp16_stage2_losses_stay_near_fp32(small_shapes, tmp_path):
    ref = trainer_for(small_shapes, tmp_path / "fp32", "fp32").fit()
    half = trainer_for(small_shapes, tmp_path / "fp16", "fp16").fit()
    want, got = [r["loss"] for r in ref], [r["loss"] for r in half]
    worst = max(abs(g - w) / w for g, w in zip(got, want))
    assert worst < FP16_LOSS_RTOL, (worst, want, got)
    assert got != want  # autocast was on
    assert all(r["loss_scale"] == 2.0**16 and r["overflow"] is False and r["overflow_skips"] == 0 for r in half)
    assert all(math.isfinite(r["grad_norm"]) for r in half)
    # The logged norm is the unscaled one: the scale (65536) would dwarf fp32's norm otherwise.
    assert max(abs(h["grad_norm"] / r["grad_norm"] - 1) for h, r in zip(half, ref)) < FP16_GRAD_NORM_RTOL
    assert "loss_scale" not in ref[0]


def test_an_overflowing_step_is_skipped_logged_and_leaves_the_weights(small_shapes, tmp_path, capsys):
    trainer = trainer_for(small_shapes, tmp_path, "fp16", steps=4)
    inject_overflow_at(trainer, 1)
    after = {}
    trainer.fit(on_step=lambda t, row: after.__setitem__(t.step, (weights(t), t.scaler.get_scale())))
    rows = metrics(str(tmp_path))
    assert [r["overflow"] for r in rows] == [False, True, False, False]
    assert [r["overflow_skips"] for r in rows] == [0, 1, 1, 1]
    assert rows[1]["grad_norm"] is None and rows[1]["loss"] is not None
    assert rows[1]["loss_scale"] == 2.0**16 and rows[2]["loss_scale"] == 2.0**15
    for n, w in after[1][0].items():
        assert torch.equal(after[2][0][n], w), n
    assert not all(torch.equal(after[3][0][n], w) for n, w in after[2][0].items())
    # The schedule did not move on: step 3 runs at the learning rate step 2 would have had.
    assert rows[2]["lr"] == rows[1]["lr"] and rows[3]["lr"] != rows[2]["lr"]
    assert (
        "step 2: inf/NaN gradient at loss scale 65536; update skipped, loss scale now 32768" in capsys.readouterr().out
    )


def test_fp16_resume_restores_the_scaler_and_the_schedule(small_shapes, tmp_path):
    """A run stopped after its step-3 checkpoint (an overflow at step 2 halved the loss scale and
    held the schedule back) and resumed gives the uninterrupted run's losses bit for bit."""
    whole = trainer_for(small_shapes, tmp_path / "whole", "fp16", steps=6)
    inject_overflow_at(whole, 1)
    whole.fit()

    def kill(trainer, row):
        if trainer.step == 3:
            raise Killed

    broken = trainer_for(small_shapes, tmp_path / "broken", "fp16", steps=6, save_every=1)
    inject_overflow_at(broken, 1)
    with pytest.raises(Killed):
        broken.fit(on_step=kill)
    resumed = trainer_for(small_shapes, tmp_path / "broken", "fp16", steps=6, save_every=1)
    assert resumed.resume() == 3
    assert (resumed.scaler.get_scale(), resumed.overflow_skips) == (2.0**15, 1)
    resumed.fit()
    want, got = metrics(str(tmp_path / "whole")), metrics(str(tmp_path / "broken"))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [(r["lr"], r["loss_scale"], r["overflow_skips"]) for r in got] == [
        (r["lr"], r["loss_scale"], r["overflow_skips"]) for r in want
    ]


@pytest.mark.slow
def test_fsdp_fp16_ranks_agree_to_skip_an_overflow_on_one_shard(small_shapes, tmp_path):
    """Under FSDP each rank sees only its gradient shard: the scaler (ShardedGradScaler) must
    all-reduce its overflow check, or only the rank holding the inf would skip the step. Two gloo
    ranks, an inf in rank 1's shard at step 2: both skip it, and the losses match one process
    given the same overflow."""
    root, data = small_shapes
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            FSDP_SCRIPT,
            data,
            root,
            str(tmp_path),
        ],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = [torch.load(tmp_path / f"rows-{r}.pt") for r in (0, 1)]
    for rows in ranks:
        assert [(r["overflow"], r["overflow_skips"], r["loss_scale"]) for r in rows] == [
            (False, 0, 2.0**16),
            (True, 1, 2.0**16),
            (False, 1, 2.0**15),
        ]
    weights = torch.load(tmp_path / "weights.pt")
    for n, w in weights[0].items():
        assert torch.equal(weights[1][n], w), n
    single = trainer_for(small_shapes, tmp_path / "single", "fp16", steps=3)
    inject_overflow_at(single, 1)
    want = [r["loss"] for r in single.fit()]
    torch.testing.assert_close([r["loss"] for r in ranks[0]], want, rtol=5e-5, atol=0)
