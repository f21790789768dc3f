"""Run by tests/train/test_fp16.py under torchrun: 3 fp16 steps of the tiny preset sharded with
FSDP2, an inf put into rank 1's gradient shard only at step 2. Each rank saves its metrics rows;
rank 0 also the full trainable weights after every step.
Usage: fsdp_fp16.py DATA IMAGE_ROOT OUT"""

import os
import sys

import torch

from fusedvlm.config import get_preset
from fusedvlm.train.cli import build_trainer
from fusedvlm.train.distributed import init_distributed
from fusedvlm.train.loop import TrainConfig


def main(data, root, out):
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    cfg = get_preset("tiny", hd_num=1, n_l=4)
    train_cfg = TrainConfig(
        steps=3, batch_size=4, grad_accum=2, lr=1e-3, warmup_ratio=0.2, precision="fp16", fsdp=True, progress=False
    )
    trainer, _, _ = build_trainer(2, cfg, data, root, os.path.join(out, "run"), train_cfg, ctx)
    accumulate = trainer.accumulate_gradients

    def poisoned(micro_batches):
        loss = accumulate(micro_batches)
        if trainer.step == 1 and ctx.rank == 1:
            grad = next(
                p.grad.to_local() for _, p in trainer.named_params if p.grad is not None and p.grad.to_local().numel()
            )
            grad.view(-1)[0] = float("inf")
        return loss

    trainer.accumulate_gradients = poisoned
    weights = []
    rows = trainer.fit(on_step=lambda t, row: weights.append(t.full_model_state()))
    torch.save(rows, os.path.join(out, f"rows-{ctx.rank}.pt"))
    if ctx.is_main:
        torch.save(weights, os.path.join(out, "weights.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
