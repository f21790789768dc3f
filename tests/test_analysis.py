"""psi / divergence toolkit: formulas, aggregation, pair I/O, hidden states, pipeline, CLI."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

from fusedvlm.analysis import (
    Pair,
    PsiAccumulator,
    alpha_from_bound,
    balance_point,
    fit_lambda,
    fit_scaling_law,
    generate_pairs,
    load_pairs,
    load_prompts,
    save_pairs,
    upsilon,
)
from fusedvlm.analysis.cli import register
from fusedvlm.analysis.hidden import branch_hidden_states, encode_pair, iter_hidden_states
from fusedvlm.analysis.pipeline import run_psi
from fusedvlm.kernels import pairwise_cosine_stats
from fusedvlm.kernels.common import unit_rows
from fusedvlm.packing import cu_seqlens_from_lengths
from fusedvlm.ref.pairwise_cosine import pairwise_cosine_stats as ref_stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- formulas


def test_scaling_fit_recovers_exact_law():
    n = np.array([16, 32, 64, 144, 256, 576])
    fit = fit_scaling_law(n, 3.0 / n**-0.4)
    assert fit.c == pytest.approx(3.0, rel=1e-5) and fit.alpha == pytest.approx(-0.4, abs=1e-6)
    assert fit.loss < 1e-10
    np.testing.assert_allclose(fit.predict(n), 3.0 * n**0.4, rtol=1e-5)


def test_scaling_fit_is_the_log_space_least_squares():
    # With noise, the minimiser of mean (log S - log c + alpha log n)^2 is ordinary least squares
    # of log S on log n with slope -alpha.
    rng = np.random.default_rng(0)
    n = np.array([4, 8, 16, 32, 64, 128, 256.0])
    score = 0.5 * n**0.07 * np.exp(rng.normal(0, 0.05, n.size))
    slope, intercept = np.polyfit(np.log(n), np.log(score), 1)
    fit = fit_scaling_law(n, score)
    assert fit.alpha == pytest.approx(-slope, abs=1e-5)
    assert math.log(fit.c) == pytest.approx(intercept, abs=1e-5)
    assert fit.loss == pytest.approx(np.mean((np.log(score) - intercept - slope * np.log(n)) ** 2), rel=1e-4)


@pytest.mark.parametrize(
    "n,score,match",
    [
        ([1, 2], [1.0], "one length"),
        ([4, 4, 4], [1, 2, 3.0], "two distinct n"),
        ([0, 2], [1, 2.0], "> 0"),
        ([1, 2], [1, -2.0], "> 0"),
        ([1, np.nan], [1, 2.0], "finite"),
    ],
)
def test_scaling_fit_rejects_bad_input(n, score, match):
    with pytest.raises(ValueError, match=match):
        fit_scaling_law(n, score)


def test_bound_formulas_by_hand():
    # psi_eq 0.5, psi_cross 0.3, psi_AB 0.2 -> n_b = 0.5 / 0.1 - 1 = 4.
    assert balance_point(0.5, 0.3, 0.2) == pytest.approx(4.0)
    assert balance_point(0.5, 0.2, 0.2) == math.inf
    n = np.array([1, 2, 4, 10])
    u = upsilon(n, [0.5] * 4, [np.nan, 0.3, 0.3, 0.3], [np.nan, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(u, [0.5, 1 + 0.2, 2 + 1.2, 5 + 9.0])
    a = alpha_from_bound(n, 4.0, beta=2.0)
    assert math.isnan(a[0])
    assert a[2] == pytest.approx(math.log(5 / 8) / math.log(4) - 1)
    np.testing.assert_array_equal(alpha_from_bound(n, math.inf, beta=0.6), [-0.3] * 4)
    # sqrt(n) growth (alpha -> -beta/2) well below n_b, linear (alpha -> -beta) far above it.
    assert alpha_from_bound(np.array([2.0]), 1e9, 1.0)[0] == pytest.approx(-0.5, abs=1e-6)
    assert alpha_from_bound(np.array([1e12]), 1.0, 1.0)[0] == pytest.approx(-1.0, abs=0.03)


def test_signed_unit_rows_give_divergence_sqrt_two_upsilon():
    # For unit vectors and f = identity, D(n)^2 = 2 Upsilon(n) exactly, pair by pair: the kernel's
    # statistics, upsilon() and fit_lambda() must agree on lambda = sqrt(2).
    g = torch.Generator().manual_seed(0)
    a = unit_rows(torch.randn(40, 16, generator=g, dtype=torch.float64)).float()
    b = unit_rows(a.double() + 0.8 * torch.randn(40, 16, generator=g, dtype=torch.float64)).float()
    s = pairwise_cosine_stats(a, b, cu_seqlens_from_lengths([40]), positive=False)
    n = np.arange(1, 41)
    u = upsilon(n, s.eq.numpy(), ((s.aa + s.bb) / 2).numpy(), s.ab.numpy())
    np.testing.assert_allclose(s.div.numpy(), np.sqrt(2 * u), rtol=1e-4, atol=1e-5)
    assert fit_lambda(s.div.numpy(), u) == pytest.approx(math.sqrt(2), rel=1e-4)


def test_fit_lambda_is_least_squares_and_skips_unusable_n():
    u = np.array([1.0, 4.0, 9.0, -1.0, np.nan])
    d = np.array([2.0, 4.1, 5.9, 1.0, 3.0])
    lam = fit_lambda(d, u)
    grid = np.linspace(1.5, 2.5, 10001)
    sse = [((d[:3] - g * np.sqrt(u[:3])) ** 2).sum() for g in grid]
    assert lam == pytest.approx(grid[int(np.argmin(sse))], abs=1e-4)
    with pytest.raises(ValueError, match="no prefix length"):
        fit_lambda([1.0], [-2.0])


def test_accumulator_matches_direct_statistics():
    g = torch.Generator().manual_seed(1)
    packs = [[5, 1, 3], [4]]
    acc = PsiAccumulator(max_n=6)
    per_pair = []
    for lengths in packs:
        a, b = torch.randn(sum(lengths), 8, generator=g), torch.randn(sum(lengths), 8, generator=g)
        cu = cu_seqlens_from_lengths(lengths)
        s = ref_stats(a, b, cu)
        acc.update(s, cu)
        per_pair += [
            {k: getattr(s, k)[lo:hi].double().numpy() for k in ("eq", "ab", "div")}
            for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    c = acc.curves()
    assert c.num_pairs == 4
    np.testing.assert_array_equal(c.count["eq"], [4, 3, 3, 2, 1, 0])
    np.testing.assert_array_equal(c.count["ab"], [0, 3, 3, 2, 1, 0])
    for k in ("eq", "ab", "div"):
        for i in range(5):
            vals = [p[k][i] for p in per_pair if len(p[k]) > i and np.isfinite(p[k][i])]
            if vals:
                assert c.mean[k][i] == pytest.approx(np.mean(vals), rel=1e-9)
            if len(vals) > 1:
                assert c.std[k][i] == pytest.approx(np.std(vals, ddof=1), rel=1e-6, abs=1e-12)
    assert np.isnan(c.mean["eq"][5]) and np.isnan(c.std["eq"][4])
    with pytest.raises(ValueError, match="more than max_n"):
        PsiAccumulator(2).update(
            ref_stats(torch.ones(3, 2), torch.ones(3, 2), cu_seqlens_from_lengths([3])), cu_seqlens_from_lengths([3])
        )


# --------------------------------------------------------------------------- pairs


def test_pairs_roundtrip_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [Pair("q1", "a1", "b1", system="sys"), Pair("q2", "a2", "b2")]
    save_pairs(pairs, str(tmp_path / "p.jsonl"))
    assert load_pairs(str(tmp_path / "p.jsonl")) == pairs
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"system": "sys", "question": "q1", "chosen": "a1", "rejected": "b1"},
                {"system": None, "question": "q2", "chosen": "a2", "rejected": "b2"},
            ]
        ),
        tmp_path / "p.parquet",
    )
    assert load_pairs(str(tmp_path / "p.parquet")) == pairs
    assert load_pairs(str(tmp_path / "p.parquet"), limit=1) == pairs[:1]


def test_pairs_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) rejected"):
        load_pairs(str(bad))
    bad.write_text("{nope\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pairs(str(bad))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="use .jsonl or .parquet"):
        load_pairs(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError):
        load_pairs(str(tmp_path / "missing.jsonl"))


def test_builtin_prompts_ship_with_the_package():
    prompts = load_prompts()
    assert len(prompts) >= 32 and all(p["question"] for p in prompts)
    assert any(p["system"] for p in prompts)


# --------------------------------------------------------------------------- model side


@pytest.fixture(scope="module")
def tiny_llm():
    from fusedvlm.config import PRESETS
    from fusedvlm.model.llm import load_llm

    torch.manual_seed(0)
    model, tok = load_llm(PRESETS["tiny"].llm)
    # The analysis builds prefixes with the tokenizer's own chat template; the byte
    # tokenizer has none, so give it a plain one.
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}Answer: {{ m['content'] + eos_token }}"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Answer: {% endif %}"
    )
    return model, tok


def test_cached_prefix_branches_match_full_forward(tiny_llm):
    # The prefix runs once, its cache serves both branches, several pairs share a padded batch:
    # every hidden state must equal a plain forward of prefix + branch.
    model, tok = tiny_llm
    pairs = [
        Pair("What is up?", "Nothing much, you?", "The sky!"),
        Pair("A much longer question here", "ab", "abcdef", system="s"),
        Pair("x", "hello world", "goodbye world"),
    ]
    enc = [encode_pair(tok, p, max_n=8) for p in pairs]
    assert [e.n for e in enc] == [8, 2, 8]
    got = branch_hidden_states(model, enc, tok.pad_token_id)
    for e, (h_a, h_b) in zip(enc, got):
        for ids, h in ((e.a, h_a), (e.b, h_b)):
            full = model.base_model(input_ids=torch.tensor([e.prefix + ids])).last_hidden_state[0, len(e.prefix) :]
            torch.testing.assert_close(h, full, atol=2e-5, rtol=1e-4)


def test_pipeline_end_to_end_on_a_tiny_llm(tiny_llm, tmp_path):
    model, tok = tiny_llm
    prompts = load_prompts()[:5]
    pairs = generate_pairs(
        model, tok, prompts, max_new_tokens=14, min_new_tokens=14, batch_size=2, seed=0, progress=False
    )
    assert len(pairs) == 5 and all(p.chosen and p.rejected for p in pairs)
    result = run_psi(model, tok, pairs, max_n=10, batch_size=3, out_dir=str(tmp_path), progress=False)
    # The curves equal the reference statistics of the same hidden states, averaged by hand.
    per_pair = []
    for _, h_a, h_b, cu in iter_hidden_states(model, tok, pairs, max_n=10, batch_size=5, progress=False):
        s = ref_stats(h_a, h_b, cu)
        per_pair += [(s.ab[lo:hi].numpy(), s.div[lo:hi].numpy()) for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist())]
    c = result.curves
    assert c.num_pairs == 5 and c.n[-1] <= 10
    for i in range(1, int(c.n[-1])):
        assert c.mean["ab"][i] == pytest.approx(np.mean([p[0][i] for p in per_pair if len(p[0]) > i]), abs=1e-5)
        assert c.mean["div"][i] == pytest.approx(np.mean([p[1][i] for p in per_pair if len(p[1]) > i]), rel=1e-5)
    out = json.loads((tmp_path / "psi.json").read_text())
    assert out["lambda"] == pytest.approx(result.lam) and out["lambda"] > 0
    assert set(out["mean"]) == {"eq", "ab", "aa", "bb", "cross", "div"}
    assert out["mean"]["ab"][0] is None and len(out["alpha"]) == len(out["n"])
    for name in ("psi_curves.png", "divergence.png"):
        assert (tmp_path / name).stat().st_size > 1000


def _cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_psi_on_pairs_file(tmp_path, capsys):
    save_pairs(
        [
            Pair("Hi?", "Hello there, friend.", "Go away now, please."),
            Pair("Why?", "Because it is so.", "No idea, sorry."),
        ],
        str(tmp_path / "pairs.jsonl"),
    )
    assert (
        _cli(
            [
                "psi",
                "--model",
                "random",
                "--data",
                str(tmp_path / "pairs.jsonl"),
                "--max-n",
                "12",
                "--signed",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "lambda =" in text and "psi_eq" in text
    out = json.loads((tmp_path / "o" / "psi.json").read_text())
    assert out["meta"]["positive"] is False and out["num_pairs"] == 2 and out["n"][-1] == 12


def test_cli_fit_scaling(tmp_path, capsys):
    n = [16, 64, 256, 576]
    rows = ["n,score,group"] + [f"{x},{2.0 * x**0.1},a" for x in n] + [f"{x},{5.0 * x**-0.2},b" for x in n]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    assert _cli(["fit-scaling", str(tmp_path / "s.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    got = {ln.split()[0]: ln.split() for ln in lines[1:3]}
    assert float(got["a"][2]) == pytest.approx(2.0, rel=1e-4) and float(got["a"][3]) == pytest.approx(-0.1, abs=1e-4)
    assert float(got["b"][2]) == pytest.approx(5.0, rel=1e-4) and float(got["b"][3]) == pytest.approx(0.2, abs=1e-4)
    assert (tmp_path / "s_fit.png").stat().st_size > 1000
    (tmp_path / "bad.csv").write_text("x,score\n1,2\n")
    with pytest.raises(ValueError, match="needs columns 'n' and 'score'"):
        _cli(["fit-scaling", str(tmp_path / "bad.csv")])


@pytest.mark.slow
def test_real_smollm2_pipeline(tmp_path):
    # The real SmolLM2-135M-Instruct (offline GGUF): generate 2 pairs, psi up to n = 16.
    pytest.importorskip("gguf")
    from fusedvlm.model.llm import load_smollm2, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = load_smollm2()
    pairs = generate_pairs(model, tok, load_prompts()[:2], max_new_tokens=24, min_new_tokens=24, seed=0, progress=False)
    result = run_psi(model, tok, pairs, max_n=16, out_dir=str(tmp_path), progress=False)
    c = result.curves
    assert c.num_pairs == 2 and c.n[-1] == 16 and model.config.hidden_size == 576
    # A trained LM's final hidden states are strongly aligned: all psi well above 0.
    assert (c.mean["eq"] > 0.2).all() and (c.mean["cross"][1:] > 0.2).all() and result.lam > 0
