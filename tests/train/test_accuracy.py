"""Stage 2 on the synthetic shapes task (colour and position questions, two per image, 4
answers each: chance 25 %) must reach >= 90 % on held-out images, and the frozen LLM must come
out bit-identical. Accuracy is measured by likelihood: each candidate answer is scored by the
LLM's log-probability of its tokens and closing EOS, the best one is the prediction
(fusedvlm.train.evaluate.answer_accuracy).

The frozen LLM is the tiny preset's shape pretrained as a "reader" (fusedvlm.train.synthetic.
pretrain_reader_llm): a random frozen LLM cannot be steered to spell anything (its logits span
~0.02 * width nats), while the paper's LLM is a pretrained one."""

import dataclasses
import json
import os
import time

import pytest
import torch

from fusedvlm.config import get_preset
from fusedvlm.train import synthetic
from fusedvlm.train.cli import build_trainer
from fusedvlm.train.data import read_records
from fusedvlm.train.evaluate import answer_accuracy
from fusedvlm.train.loop import TrainConfig

STEPS = 1000
SIZE = 64  # 64 px views: a 4 x 4 patch grid, 2 x 2 merged + LF per view; hd_num=1 gives 2 views


@pytest.mark.slow
def test_stage2_learns_colour_and_position_on_held_out_images(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        root = str(tmp_path)
        train = synthetic.write_dataset(root, 1024, seed=1, size=SIZE, name="train.jsonl")
        test = synthetic.write_dataset(root, 64, seed=2, size=SIZE, name="test.jsonl")
        tiny = get_preset("tiny", hd_num=1, n_l=16)
        base = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, image_size=SIZE))
        reader = synthetic.pretrain_reader_llm(
            os.path.join(root, "reader"),
            dataclasses.replace(base.llm, system_prompt=""),
            n_l=16,
            n_s=8,
            steps=150,
        )
        cfg = dataclasses.replace(
            base, llm=dataclasses.replace(base.llm, source="pretrained", path=reader, system_prompt="")
        )
        torch.manual_seed(0)
        train_cfg = TrainConfig(steps=STEPS, batch_size=8, lr=1e-3, warmup_ratio=0.05, min_lr_ratio=0.6, progress=False)
        trainer, model, problems = build_trainer(2, cfg, train, root, os.path.join(root, "run"), train_cfg)
        assert problems == []
        llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
        records, _ = read_records(test, root)
        encoder = trainer.dataset.encoder
        before = answer_accuracy(model, records, encoder, synthetic.candidate_answers)
        rows = trainer.fit()
        after = answer_accuracy(model, records, encoder, synthetic.candidate_answers)
        elapsed = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "before": before,
                    "after": after,
                    "loss_first": rows[0]["loss"],
                    "loss_last": rows[-1]["loss"],
                    "wall_s": round(elapsed, 1),
                }
            )
        )
        assert after["chance"] <= 0.25
        assert after["questions"] == 128
        assert after["accuracy"] >= 0.9, (before, after)
        assert before["accuracy"] < 0.6
        llm_after = model.llm.state_dict()
        assert all(torch.equal(llm_before[k], llm_after[k]) for k in llm_before)
    finally:
        torch.set_num_threads(threads)
