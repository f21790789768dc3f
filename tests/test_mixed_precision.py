"""Whole models under autocast and in half-precision weights, on the CPU, against fp32.

Bounds come from measured errors (2-core EPYC, torch 2.14, ``-s`` prints them) with margin:

    stage-1 loss, bf16 autocast      rel. error 7.3e-4   bound 5e-3   grad cosine 0.99980  bound 0.998
    stage-1 loss, fp16 autocast      rel. error 2.4e-5   bound 1e-3   grad cosine 0.99999  bound 0.999
    stage-2 loss, bf16 autocast      rel. error 5.3e-6   bound 5e-3   grad cosine 0.99998  bound 0.998
    stage-2 loss, fp16 autocast      rel. error 4.2e-6   bound 1e-3   grad cosine 0.99994  bound 0.999
    fused tokens, bf16 autocast      rel. error 4.4e-3   bound 2e-2
    fused tokens, fp16 autocast      rel. error 4.8e-4   bound 3e-3
    fused tokens, bf16 weights       rel. error 6.1e-3   bound 2e-2
    fused tokens, fp16 weights       rel. error 6.8e-4   bound 3e-3
    LLaVA adapter step, bf16 autocast  rel. error 6.3e-5   bound 5e-3   grad cosine 0.99998  bound 0.998

(relative error = |x - x_fp32| / |x_fp32| in the 2-norm; grad cosine over every trainable gradient).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fusedvlm.config import get_preset
from fusedvlm.kernels import local_merge, packed_attention, pairwise_cosine_stats
from fusedvlm.packing import cu_seqlens_from_lengths

LOSS_BOUND = {torch.bfloat16: 5e-3, torch.float16: 1e-3}
GRAD_COSINE = {torch.bfloat16: 0.998, torch.float16: 0.999}
FUSED_BOUND = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


# Whole-model runs on one thread: reproducible reductions and no oversubscription.
pytestmark = pytest.mark.usefixtures("one_thread")


def _stage_step(stage, data, root, tmp_path, autocast_dtype):
    """Loss and flat gradient of one step on ``tiny`` (same seed, same batch) under ``autocast_dtype``."""
    from fusedvlm.train.cli import build_trainer
    from fusedvlm.train.loop import TrainConfig

    torch.manual_seed(0)
    cfg = get_preset("tiny", hd_num=1, n_l=4)
    train_cfg = TrainConfig(steps=1, batch_size=4, lr=1e-3, progress=False, precision="fp32")
    trainer, _, _ = build_trainer(
        stage, cfg, data, root, str(tmp_path), train_cfg, stage1={"embed_dim": 32, "text_width": 32}
    )
    # Set directly, not through ``--precision``: fp16 there adds loss scaling, and the gradients
    # compared here are the unscaled ones.
    trainer.autocast_dtype = autocast_dtype
    loss = trainer.accumulate_gradients([next(trainer._loader())])
    grads = [p.grad for _, p in trainer.named_params]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    return loss, torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_training_step_under_autocast_matches_fp32(stage, dtype, small_shapes, tmp_path):
    root, data = small_shapes
    loss32, grad32 = _stage_step(stage, data, root, tmp_path / "fp32", None)
    loss, grad = _stage_step(stage, data, root, tmp_path / "half", dtype)
    err = abs(loss - loss32) / abs(loss32)
    cos = F.cosine_similarity(grad.double(), grad32.double(), 0).item()
    print(f"stage {stage} {dtype}: loss {loss:.6f} vs fp32 {loss32:.6f} (rel {err:.2g}), grad cosine {cos:.6f}")
    assert err <= LOSS_BOUND[dtype], err
    assert cos >= GRAD_COSINE[dtype], cos


@pytest.fixture(scope="module")
def small_shapes(module_tmp):
    from fusedvlm.train.synthetic import write_dataset

    root = module_tmp("mp_shapes")
    return str(root), write_dataset(str(root), 8, seed=11, size=64)


def _fused(model, photo, autocast_dtype=None):
    import contextlib

    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        vision = model.encode_images([photo])
        questions = [[model.question_ids("What is in the picture?"), model.question_ids("What colour is it?")]]
        return model.fuse(vision, questions).tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["autocast", "weights"])
def test_chat_in_half_precision(mode, dtype, tiny_model, photo):
    """Fused tokens within the bound of fp32, and a two-turn chat runs end to end."""
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.session import ChatSession

    ref = _fused(tiny_model, photo)
    model = tiny_model if mode == "autocast" else copy.deepcopy(tiny_model).to(dtype)
    got = _fused(model, photo, dtype if mode == "autocast" else None)
    assert got.dtype == dtype  # the projection is a Linear: autocast computes it in the half dtype too
    err = rel(got.float(), ref)
    print(f"fused tokens, {dtype} {mode}: rel error {err:.2g}")
    assert err <= FUSED_BOUND[dtype], err
    session = ChatSession(model, photo)
    gen = GenerationConfig(max_new_tokens=4)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=dtype):
            answers = [session.ask(q, gen) for q in ("What is it?", "What colour?")]
    else:
        answers = [session.ask(q, gen) for q in ("What is it?", "What colour?")]
    assert [a.num_fused for a in answers] == [16, 8] and all(len(a.ids) == 4 for a in answers)


def _adapter_step(tmp_path, precision):
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from fusedvlm.adapters.llava import LlavaFusionAdapter
    from fusedvlm.adapters.training import AdapterCollator, AdapterDataset, AdapterStage2Objective
    from fusedvlm.model.llm import byte_tokenizer
    from fusedvlm.train.loop import TrainConfig, Trainer
    from tests.test_adapter_llava import FUSION, N_L, tiny_llava

    rng = np.random.default_rng(0)
    records = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append(
            {"image": str(tmp_path / f"{i}.png"), "turns": [("What is it?", f"Thing {i}."), ("Colour?", "Grey.")]}
        )
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    host = tiny_llava(seed=4)
    torch.manual_seed(1)
    adapter = LlavaFusionAdapter.attach(host, FUSION, n_l=N_L, dtype=torch.float32)
    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    from fusedvlm.train.data import Record

    recs = [Record(index=i, image=r["image"], turns=r["turns"]) for i, r in enumerate(records)]
    trainer = Trainer(
        AdapterStage2Objective(adapter),
        AdapterDataset(recs, adapter, processor),
        AdapterCollator(adapter, tokenizer),
        TrainConfig(steps=1, batch_size=2, lr=1e-3, progress=False, precision=precision),
        str(tmp_path / precision),
    )
    loss = trainer.accumulate_gradients([next(trainer._loader())])
    grads = [p.grad for _, p in trainer.named_params]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    return loss, torch.cat([g.flatten() for g in grads])


def test_llava_adapter_training_step_under_bf16_autocast(tmp_path):
    loss32, grad32 = _adapter_step(tmp_path, "fp32")
    loss, grad = _adapter_step(tmp_path, "bf16")
    err = abs(loss - loss32) / abs(loss32)
    cos = F.cosine_similarity(grad.double(), grad32.double(), 0).item()
    print(f"adapter bf16: loss {loss:.6f} vs fp32 {loss32:.6f} (rel {err:.2g}), grad cosine {cos:.6f}")
    assert err <= LOSS_BOUND[torch.bfloat16], err
    assert cos >= GRAD_COSINE[torch.bfloat16], cos


def test_cli_trains_stage2_in_bf16_with_a_bf16_llm(small_shapes, tmp_path):
    from tests.train.conftest import cli

    root, data = small_shapes
    out = cli(
        "train",
        "stage2",
        "--preset",
        "tiny",
        "--data",
        data,
        "--image-root",
        root,
        "--out",
        tmp_path,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--hd-num",
        "1",
        "--n-l",
        "4",
        "--precision",
        "bf16",
        "--llm-dtype",
        "bf16",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert "step 2, loss" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("flags", [["--dtype", "bf16"], ["--dtype", "fp16", "--llm-dtype", "fp32"]])
def test_cli_chat_in_half_precision(flags, capsys):
    from fusedvlm.cli import main

    argv = [
        "chat",
        "--preset",
        "tiny",
        "--image",
        "sample:coffee",
        "--question",
        "what is it?",
        "--question",
        "and the colour?",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        *flags,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and out.count("A: ") == 2


def test_resolve_device_and_dtype():
    from fusedvlm.device import dtype_name, resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert [resolve_dtype(n, torch.device("cpu")) for n in ("fp32", "bf16", "fp16", "bfloat16")] == [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.bfloat16,
    ]
    assert dtype_name(torch.bfloat16) == "bf16"
    with pytest.raises(ValueError, match="--device must be"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="--dtype must be"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:0")


# --------------------------------------------------------------------------- ops on mixed inputs


def test_packed_attention_takes_mixed_inputs_like_sdpa(op_backend):
    """fp32 q/k (RoPE'd next to fp32 cos/sin) with a bf16 v: the autocast dtype under autocast,
    else the widest; gradients come back in each input's own dtype."""
    from fusedvlm.ref.packed_attention import packed_attention as ref

    g = torch.Generator().manual_seed(0)
    cu = cu_seqlens_from_lengths([5, 9])
    q, k = (torch.randn(14, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(14, 2, 16, generator=g).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_attention(q, k, v, cu)
    assert out.dtype == torch.bfloat16
    want = ref(q.bfloat16().double(), k.bfloat16().double(), v.double(), cu)
    assert (out.double() - want).abs().max() < 2e-2
    out.float().sum().backward()
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    wide = packed_attention(q, k, v, cu)
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide, ref(q, k, v.float(), cu))


def test_local_merge_under_autocast_computes_where_conv2d_does(op_backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 36, 8, generator=g)
    w, lf = torch.randn(8, 8, 3, 3, generator=g, requires_grad=True), torch.randn(8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local_merge(x, w, lf)
        conv = F.conv2d(x.view(2, 6, 6, 8).permute(0, 3, 1, 2), w, stride=2, padding=1)
    assert out.dtype == conv.dtype == torch.bfloat16
    want = conv.float().permute(0, 2, 3, 1).reshape(2, 9, 8) + x.bfloat16().float().view(2, 6, 6, 8)[
        :, ::2, ::2
    ].reshape(2, 9, 8)
    torch.testing.assert_close(out[:, :9].float(), want, atol=5e-2, rtol=2e-2)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32


def test_pairwise_cosine_takes_mixed_branches_in_the_wider_dtype(op_backend):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g).half()
    cu = cu_seqlens_from_lengths([3, 4])
    got, want = pairwise_cosine_stats(a, b, cu), pairwise_cosine_stats(a, b.float(), cu)
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), equal_nan=True)


def test_cli_bench_in_bf16(tmp_path):
    import json

    from fusedvlm.cli import main

    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--preset",
                "tiny",
                "--n-l",
                "4",
                "--images",
                "chelsea",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--max-new-tokens",
                "2",
                "--device",
                "cpu",
                "--dtype",
                "bf16",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    payload = json.loads((out / "results.json").read_text())
    assert json.dumps(payload).count('"bfloat16"') >= 1 and payload["results"][0]["decode_tokens_per_s"] > 0


def test_cli_psi_in_bf16(tmp_path, capsys):
    import json

    from fusedvlm.cli import main

    psi = tmp_path / "psi"
    assert (
        main(
            [
                "psi",
                "--generate",
                "2",
                "--model",
                "random",
                "--max-n",
                "4",
                "--device",
                "cpu",
                "--dtype",
                "bf16",
                "--out",
                str(psi),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "(bf16 on cpu)" in capsys.readouterr().out
    assert json.loads((psi / "psi.json").read_text())["meta"]["dtype"] == "bf16"
