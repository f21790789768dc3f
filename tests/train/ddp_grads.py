"""Run by tests/train/test_distributed.py, alone or under torchrun: one step's gradients on the
tiny preset, saved by rank 0. Usage: ddp_grads.py DATA IMAGE_ROOT OUT BATCH GRAD_ACCUM [STAGE]"""

import os
import sys

import torch

from fusedvlm.config import get_preset
from fusedvlm.train.cli import build_trainer
from fusedvlm.train.distributed import init_distributed
from fusedvlm.train.loop import TrainConfig


def main(data, root, out, batch, accum, stage="2"):
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    cfg = get_preset("tiny", hd_num=1, n_l=4)
    train_cfg = TrainConfig(steps=1, batch_size=int(batch), grad_accum=int(accum), progress=False, seed=1)
    stage1 = {"embed_dim": 32, "text_width": 32} if stage == "1" else None
    trainer, _, _ = build_trainer(int(stage), cfg, data, root, out, train_cfg, ctx, stage1=stage1)
    batches = trainer._loader()
    micro = [next(batches) for _ in range(trainer.cfg.grad_accum)]
    loss = trainer.accumulate_gradients(micro)
    if ctx.is_main:
        grads = {n: p.grad.clone() for n, p in trainer.named_params}
        torch.save({"loss": loss, "grads": grads, "world": ctx.world}, os.path.join(out, "grads.pt"))
    if ctx.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
