import math
import os

import pytest
import torch

from fusedvlm.config import get_preset
from fusedvlm.train.cli import build_trainer
from fusedvlm.train.loop import TrainConfig, lr_at
from fusedvlm.train.objectives import build_text_tower, extend_positions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_positions_extend_to_512_from_the_old_rows_statistics():
    text = build_text_tower(embed_dim=32, width=32, layers=1, heads=4)
    assert text.positional_embedding.shape == (512, 32) and text.context_length == 512
    assert text.attn_mask.shape == (512, 512)
    from open_clip.model import CLIPTextCfg, _build_text_tower

    torch.manual_seed(0)
    small = _build_text_tower(8, CLIPTextCfg(context_length=77, vocab_size=1000, width=64, layers=1, heads=4))
    with torch.no_grad():
        small.positional_embedding.mul_(torch.linspace(0.5, 3, 64)).add_(torch.linspace(-1, 1, 64))
    old = small.positional_embedding.detach().clone()
    extend_positions(small, 512, torch.Generator().manual_seed(1))
    new = small.positional_embedding.detach()
    assert torch.equal(new[:77], old)
    torch.testing.assert_close(new[77:].mean(0), old.mean(0), atol=0.3, rtol=0)
    torch.testing.assert_close(new[77:].std(0), old.std(0), atol=0.0, rtol=0.2)
    with pytest.raises(ValueError, match="shrink"):
        extend_positions(small, 100)
    # A text longer than CLIP's 77 positions runs, and padding it to the full context
    # (open_clip's own convention) gives the same embedding.
    tower = build_text_tower(16, 32, 1, 4).eval()
    ids = torch.zeros(2, 300, dtype=torch.long)
    ids[:, 0], ids[:, 1:299], ids[:, 299] = 49406, 320, 49407
    ids[1, 5], ids[1, 6:] = 49407, 0
    full = torch.zeros(2, 512, dtype=torch.long)
    full[:, :300] = ids
    short = tower(ids)
    tower.use_pad_mask = False
    torch.testing.assert_close(short, tower(full), rtol=1e-5, atol=1e-6)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_ratio=0.1, batch_size=1)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        TrainConfig(steps=1, batch_size=3, grad_accum=2)


def test_stage1_lowers_its_loss(small_shapes, tmp_path):
    root, data = small_shapes
    torch.manual_seed(0)
    cfg = get_preset("tiny", hd_num=1, n_l=4)
    train_cfg = TrainConfig(steps=16, batch_size=8, lr=1e-3, warmup_ratio=0.1, progress=False)
    trainer, model, _ = build_trainer(
        1, cfg, data, root, str(tmp_path), train_cfg, stage1={"embed_dim": 32, "text_width": 32}
    )
    assert model.llm is None
    names = {n for n, _ in trainer.named_params}
    assert "text.positional_embedding" in names and "logit_scale" in names and "head.weight" in names
    assert not any(n.startswith("model.fuser.projection") for n in names)  # the LLM projection is stage 2's
    rows = trainer.fit()
    losses = [r["loss"] for r in rows]
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses


def test_stage2_keeps_the_llm_frozen_and_out_of_the_optimizer(small_shapes, tmp_path):
    root, data = small_shapes
    torch.manual_seed(0)
    cfg = get_preset("tiny", hd_num=1, n_l=4)
    train_cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, progress=False)
    trainer, model, _ = build_trainer(2, cfg, data, root, str(tmp_path), train_cfg, freeze_vision=True)
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    clip_before = {k: v.clone() for k, v in model.vision.clip.state_dict().items()}
    ln_before = model.vision.ln.weight.detach().clone()
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in model.llm.parameters())
    trainer.fit()
    assert all(p.grad is None for p in model.llm.parameters())
    after = model.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(clip_before[k], v) for k, v in model.vision.clip.state_dict().items())  # --freeze-vision
    assert not torch.equal(ln_before, model.vision.ln.weight)  # the new LayerNorm still trains
    import os

    assert os.path.exists(os.path.join(str(tmp_path), "checkpoints", "step-00000003.safetensors"))
    from safetensors import safe_open

    with safe_open(os.path.join(str(tmp_path), "checkpoints", "step-00000003.safetensors"), "pt") as f:
        assert not any(k.startswith("model/model.llm.") for k in f.keys())


def test_gradient_checkpointing_gives_the_same_gradients(small_shapes, tmp_path):
    root, data = small_shapes
    cfg = get_preset("tiny", hd_num=1, n_l=4)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        train_cfg = TrainConfig(steps=1, batch_size=4, gradient_checkpointing=checkpointing, progress=False)
        trainer, model, _ = build_trainer(2, cfg, data, root, str(tmp_path / str(checkpointing)), train_cfg)
        assert model.fuser.decoder.gradient_checkpointing is checkpointing
        trainer.accumulate_gradients([next(trainer._loader())])
        grads.append({n: p.grad for n, p in trainer.named_params})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_tiny_stage2_trains_on_a_small_data_set_with_the_default_batch(tmp_path):
    # The paper's global batch (2560) would not fill one micro-batch of these 8 records.
    from fusedvlm.cli import main
    from fusedvlm.train.synthetic import write_dataset

    data = write_dataset(str(tmp_path / "data"), 8, seed=3, size=48, num_questions=1)
    out = tmp_path / "run"
    argv = [
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
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--steps",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    import json

    run = json.loads((out / "run.json").read_text())
    assert run["args"]["batch_size"] == 8 and (out / "model.safetensors").exists()


def _tiny_hf_llm(path, hidden: int) -> str:
    """A random Llama of width ``hidden`` with the byte tokenizer, as a local HF directory."""
    import dataclasses

    from fusedvlm.model.llm import byte_tokenizer, random_llama

    llm_cfg = dataclasses.replace(get_preset("tiny").llm, hidden_size=hidden, intermediate_size=2 * hidden)
    random_llama(llm_cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _stage1_then_stage2(tmp_path, root, data, *model_args):
    from fusedvlm.cli import main

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = [
        "--data",
        data,
        "--image-root",
        root,
        "--steps",
        1,
        "--batch-size",
        2,
        "--hd-num",
        1,
        "--n-l",
        4,
        "--no-progress",
        *model_args,
    ]
    assert (
        main(["train", "stage1", *map(str, common), "--out", str(s1), "--embed-dim", "32", "--text-width", "32"]) == 0
    )
    assert main(["train", "stage2", *map(str, common), "--out", str(s2), "--init", str(s1 / "model.safetensors")]) == 0
    assert os.path.exists(s2 / "model.safetensors")
    return s1 / "model.safetensors"


def test_stage1_output_initialises_stage2_with_another_llm_width(small_shapes, tmp_path):
    # The README's flow with --llm-path: stage 1 must build the projection with the width of
    # that LLM (48 here, the tiny preset's own is 64), or stage 2's strict --init load fails.
    root, data = small_shapes
    llm = _tiny_hf_llm(tmp_path / "llm", 48)
    weights = _stage1_then_stage2(tmp_path, root, data, "--preset", "tiny", "--llm-path", llm)
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert f.get_slice("fuser.projection.weight").get_shape()[0] == 48


@pytest.mark.slow
def test_stage1_to_stage2_on_smol(small_shapes, tmp_path):
    """The README's stage 1 -> stage 2 flow on the real SmolLM2 (width 576)."""
    root, data = small_shapes
    weights = _stage1_then_stage2(tmp_path, root, data, "--preset", "smol")
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert f.get_slice("fuser.projection.weight").get_shape()[0] == 576
