"""The standalone FusionModule: packed forward, input projection, grids, checkpoints, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fusedvlm.config import FusionConfig
from fusedvlm.model.fusion_module import CONFIG_NAME, WEIGHTS_NAME, FusionModule, FusionModuleConfig
from fusedvlm.packing import cu_seqlens_from_lengths

FUSION = FusionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_queries=31)


def make(seed=0, **kw) -> FusionModule:
    torch.manual_seed(seed)
    cfg = dict(fusion=FUSION, output_size=24, n_l=8)
    cfg.update(kw)
    return FusionModule(FusionModuleConfig(**cfg)).eval()


def packed_questions(qs):
    return torch.tensor([t for q in qs for t in q], dtype=torch.long), cu_seqlens_from_lengths([len(q) for q in qs])


QS = [[320, 1125, 269], [4341, 286], [1929]]  # sample 0: two questions, sample 1: one


def test_forward_counts_order_and_packing_independence():
    m = make(input_size=20, grid=(4, 6))
    torch.manual_seed(1)
    vision = torch.randn(3 * 24, 20)  # sample 0: one 4x6 view, sample 1: two views
    cu_v = cu_seqlens_from_lengths([24, 48])
    q, cu_q = packed_questions(QS)
    with torch.no_grad():
        out = m(vision, cu_v, q, cu_q, [2, 1])
        alone = [
            m(vision[:24], cu_seqlens_from_lengths([24]), *packed_questions(QS[:2]), [2]),
            m(vision[24:], cu_seqlens_from_lengths([48]), *packed_questions(QS[2:])),
        ]
    n_s = 8
    assert out.group_sizes == [[8, n_s], [8]]
    assert out.cu_seqlens.tolist() == [0, 16, 24]
    assert out.tokens.shape == (24, 24) and out.hidden.shape == (24, 32)
    assert out.is_eos.nonzero().flatten().tolist() == [7, 15, 23]
    torch.testing.assert_close(out.tokens, torch.cat([a.tokens for a in alone]), rtol=1e-5, atol=1e-5)


def test_forward_equals_merge_views_then_fuse():
    m = make()
    torch.manual_seed(2)
    views = torch.randn(2, 36, 32)  # two samples, one 6x6 view each
    q, cu_q = packed_questions(QS[:2])
    with torch.no_grad():
        out = m(views.reshape(-1, 32), cu_seqlens_from_lengths([36, 36]), q, cu_q)
        ref = m.fuse(m.merge_views(views, [1, 1]), [[QS[0]], [QS[1]]])
    assert m.merge_views(views, [1, 1]).tokens.shape[0] == 2 * (9 + 1)  # 3x3 merged + LF per view
    torch.testing.assert_close(out.tokens, ref.tokens, rtol=0, atol=0)


def test_questions_change_the_output_unless_dropped():
    vision = torch.randn(16, 32)
    cu_v = cu_seqlens_from_lengths([16])
    for drop, same in ((False, False), (True, True)):
        m = make(drop_question=drop)
        with torch.no_grad():
            a = m(vision, cu_v, *packed_questions([[320, 1125]])).tokens
            b = m(vision, cu_v, *packed_questions([[4341, 286, 9]])).tokens
        assert torch.equal(a, b) is same


def test_no_merge_takes_any_lengths_and_n_l_override():
    m = make(merge=False, input_size=12)
    assert m.merge is None
    vision = torch.randn(7 + 0 + 5, 12)  # includes an empty vision segment
    q, cu_q = packed_questions(QS)
    with torch.no_grad():
        out = m(vision, cu_seqlens_from_lengths([7, 0, 5]), q, cu_q, n_l=4, n_s=2)
    assert out.group_sizes == [[4], [4], [4]]
    assert out.tokens.shape == (12, 24)


def test_gradients_reach_every_parameter():
    m = make(input_size=20).train()
    vision = torch.randn(2 * 16, 20)
    q, cu_q = packed_questions(QS)
    out = m(vision, cu_seqlens_from_lengths([16, 16]), q, cu_q, [1, 2])
    out.tokens.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, v, cu, q, cq: m(v[:, :5], cu, q, cq, [2, 1]), "width 5"),
        (lambda m, v, cu, q, cq: m(v, cu, q, cq, [1, 1]), "sums to 2 but"),
        (lambda m, v, cu, q, cq: m(v, cu, q, cq, [3, 0]), "at least one question"),
        (lambda m, v, cu, q, cq: m(v, cu, q, cq), "questions_per_sample sums to 2"),
        (lambda m, v, cu, q, cq: m(v, cu, q, cq, [1, 1, 1]), "3 entries for 2 samples"),
        (lambda m, v, cu, q, cq: m(v, cu, q + 49408, cq, [2, 1]), "CLIP BPE ids"),
        (lambda m, v, cu, q, cq: m(v, cu, q.float(), cq, [2, 1]), "integer token ids"),
        (lambda m, v, cu, q, cq: m(v, cu_seqlens_from_lengths([16, 15]), q, cq, [2, 1]), "cu_seqlens_vision"),
        (lambda m, v, cu, q, cq: m(v[:31], cu_seqlens_from_lengths([16, 15]), q, cq, [2, 1]), "square view"),
        (lambda m, v, cu, q, cq: m(v, cu, q, cq, [2, 1], grid=(3, 3)), "whole number of 3x3 views"),
        (lambda m, v, cu, q, cq: m(v, cu, q, cq.long(), [2, 1]), "int32"),
    ],
)
def test_bad_inputs_name_the_problem(call, match):
    m = make()
    q, cu_q = packed_questions(QS)
    with pytest.raises(ValueError, match=match):
        call(m, torch.randn(32, 32), cu_seqlens_from_lengths([16, 16]), q, cu_q)


def test_bad_configs():
    with pytest.raises(ValueError, match="needs merge=True"):
        FusionModuleConfig(fusion=FUSION, n_l=8, merge=False, grid=(2, 2))
    with pytest.raises(ValueError, match="grid must be"):
        FusionModuleConfig(fusion=FUSION, n_l=8, grid=(0, 2))
    with pytest.raises(ValueError, match="input_size"):
        FusionModuleConfig(fusion=FUSION, n_l=8, input_size=0)


def test_save_reload_identical_and_overwrite(tmp_path):
    m = make(input_size=20, grid=(4, 4), n_l=16, n_s=4).to(torch.bfloat16)
    vision = torch.randn(32, 20, dtype=torch.bfloat16)
    args = (vision, cu_seqlens_from_lengths([16, 16]), *packed_questions(QS), [2, 1])
    path = tmp_path / "fm"
    m.save_pretrained(path)
    assert sorted(os.listdir(tmp_path)) == ["fm"]
    r = FusionModule.from_pretrained(path)
    assert r.cfg == m.cfg and r.cfg.grid == (4, 4)
    assert r.projection.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(r(*args).tokens, m(*args).tokens)
    # Overwriting an existing checkpoint replaces both files and leaves no temporary behind.
    m2 = make(seed=5, input_size=20, grid=(4, 4), n_l=16, n_s=4)
    m2.save_pretrained(path)
    assert sorted(os.listdir(tmp_path)) == ["fm"] and sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]
    r2 = FusionModule.from_pretrained(path, dtype=torch.float64)
    assert r2.projection.weight.dtype == torch.float64
    torch.testing.assert_close(r2.projection.weight, m2.projection.weight.double())


def test_checkpoint_errors_name_the_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(FileNotFoundError, match="not found"):
        FusionModule.from_pretrained(tmp_path / "nope")
    m = make()
    path = tmp_path / "fm"
    m.save_pretrained(path)
    state = load_file(path / WEIGHTS_NAME)
    state.pop("projection.weight")
    state["extra.bias"] = torch.zeros(3)
    state["merge.lf_token"] = torch.zeros(5)
    save_file(state, path / WEIGHTS_NAME)
    with pytest.raises(
        ValueError,
        match=r"missing: projection.weight; unexpected: extra.bias; "
        r"shape mismatch: merge.lf_token: checkpoint \(5,\) vs model \(32,\)",
    ):
        FusionModule.from_pretrained(path)
    os.remove(path / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        FusionModule.from_pretrained(path)
    (path / CONFIG_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a fusedvlm.FusionModule config"):
        FusionModule.from_pretrained(path)


def test_lazy_top_level_export_keeps_import_cheap():
    code = (
        "import sys, fusedvlm; assert 'torch' not in sys.modules; "
        "from fusedvlm.model.fusion_module import FusionModule; assert fusedvlm.FusionModule is FusionModule"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
