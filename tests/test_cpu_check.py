"""tools/cpu_check.py (``make cpu-check``): its plan, its reading of each bench's JSON (the
committed AVX2 results), its summary, its refusals, and a --quick run of two steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from fusedvlm import native
from tests.tool_scripts import ROOT, tool_module

RESULTS = os.path.join(ROOT, "bench", "results")
needs_cpp = pytest.mark.skipif(not native.available(), reason="needs the C++ kernels")


@pytest.fixture(scope="module")
def cpu_check():
    with tool_module("cpu_check") as module:
        yield module


def test_plan_runs_the_issue_commands_under_the_variant(cpu_check, tmp_path):
    steps = cpu_check.plan("avx2", str(tmp_path))
    assert [s.name for s in steps] == ["decode", "attn-long", "attn-short", "overhead"]
    assert all(s.env == {"FUSEDVLM_ISA": "avx2"} for s in steps)
    for step in steps:
        scripts = [a for a in step.argv if a.endswith(".py")]
        assert len(scripts) == 1 and os.path.exists(scripts[0]), step
        assert step.outputs == [f"{step.name}.json"] and f"{tmp_path}/{step.name}.json" in step.argv
    long = " ".join(steps[1].argv)
    assert "--samples 8 --backward-samples 8 --min-len 1500 --max-len 2600 --only fusedvlm sdpa_loop" in long
    assert "--samples 64 --backward-samples 64 --min-len 16 --max-len 300" in " ".join(steps[2].argv)
    assert "--preset" not in steps[0].argv and "--new-tokens 32 --repeats 3" in " ".join(steps[0].argv)
    paper = cpu_check.plan("avx2", str(tmp_path), paper="/ckpt")
    assert paper[-1].name == "int8-paper" and "--checkpoint /ckpt" in " ".join(paper[-1].argv)
    quick = cpu_check.plan("baseline", str(tmp_path), quick=True)
    assert "tiny" in quick[0].argv and "--no-compile" in quick[0].argv


def test_figures_read_each_bench_output_and_the_summary_marks_the_targets(cpu_check, tmp_path):
    """The committed sixth-session AVX2 files stand in for a run: every figure is read from the
    format its bench writes, and compared with its target."""
    amd = os.path.join(RESULTS, "amd-epyc-2core-avx2")
    copies = {
        "decode": os.path.join(amd, "decode_s6.json"),
        "attn-long": os.path.join(amd, "packed_attention_long_avx2_s6.json"),
        "attn-short": os.path.join(amd, "packed_attention_short_avx2.json"),
        "overhead": os.path.join(amd, "op_overhead_s6.json"),
        "int8-paper": os.path.join(RESULTS, "cpu-2core-epyc", "int8_paper_rounds_s6.json"),
    }
    vdir = tmp_path / "avx2"
    vdir.mkdir()
    for step, src in copies.items():
        shutil.copy(src, vdir / f"{step}.json")
    rows = [cpu_check.Row(step, "ok", 1.0, f"{step}.log") for step in copies]
    got = cpu_check.figures(str(vdir), rows)
    value = {name: round(f["value"], 2) for name, f in got.items()}
    assert value == {
        "decode, smol fp32, best lean path: fraction of the read-bandwidth limit": 0.66,
        "decode vs HF generate, same run": 2.64,
        "attention, 8 long samples, forward vs per-segment SDPA": 1.4,
        "attention, 8 long samples, fwd+bwd vs SDPA loop": 1.82,
        "attention, 64 short segments, forward": 3.28,
        "per-call overhead with gradients, attention": 9.46,
        "per-call overhead with gradients, local merge": 8.5,
        "LLM prefill, smol n_l=768: fraction of the FMA peak": 0.62,
        "int8 vs bf16 decode, paper-size LLM (issue 22)": 1.61,
    }
    assert got["decode vs HF generate, same run"]["text"] == "2.64x (lean-fused)"
    met = {name for name, f in got.items() if f["met"]}
    assert met == set(value) - {
        "decode, smol fp32, best lean path: fraction of the read-bandwidth limit",
        "attention, 8 long samples, fwd+bwd vs SDPA loop",
        "int8 vs bf16 decode, paper-size LLM (issue 22)",
    }
    # A failed step and one that was not run say so in place of their figures.
    partial = cpu_check.figures(str(vdir), [cpu_check.Row("decode", "timed out after 9 s", 9.0)])
    assert partial["decode vs HF generate, same run"] == dict(value=None, text="decode: timed out after 9 s", met=None)
    assert partial["attention, 64 short segments, forward"]["text"] == "not run"

    header = dict(cpu="AMD EPYC", cores=2, threads=2, torch="t", git="g", date="d", load_before="1", load_after="2")
    header.update(total_s=1.0, quick=False)
    cpu_check.write_summary(str(tmp_path), header, {"avx2": got}, {"avx2": rows})
    md = (tmp_path / "summary.md").read_text()
    assert "| attention, 8 long samples, fwd+bwd vs SDPA loop | >= 2x | 1.82x (2292 vs 4165 ms) **short** |" in md
    assert "| per-call overhead with gradients, attention | <= 10 us | 9.5 us (floor 5.3) met |" in md
    assert "| avx2 | decode | ok | 1.0 | avx2/decode.log |" in md
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["figures"]["avx2"]["decode vs HF generate, same run"]["met"] is True


@needs_cpp
def test_refuses_what_it_cannot_run(cpu_check, tmp_path, capsys):
    missing = [v for v in native.ISAS if v not in native.supported_isas()]
    if missing:
        assert cpu_check.main(["--variants", missing[0], "--out", str(tmp_path)]) == 2
        assert f"cannot run the ISA variant(s) ['{missing[0]}']" in capsys.readouterr().err
    assert cpu_check.main(["--paper", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "is not a folder; nothing was run" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
    with pytest.raises(SystemExit):
        cpu_check.main(["--only", "no-such-step"])


@needs_cpp
def test_quick_run_writes_the_summary(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "cpu_check.py"), "--quick", "--variants", "baseline"]
        + ["--only", "attn-short", "overhead", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    md = (tmp_path / "summary.md").read_text()
    assert "--quick: small shapes" in md and "ISA variants run: baseline" in md
    assert (
        "| attention, 64 short segments, forward | >= 2x | " in md
        and "| decode vs HF generate, same run | >= 1.5x | not run |" in md
    )
    short = json.loads((tmp_path / "baseline" / "attn-short.json").read_text())
    assert short["env"]["cpp_isa"] == "baseline"
    assert sorted(os.listdir(tmp_path / "baseline")) == [
        "attn-short.json",
        "attn-short.log",
        "overhead.json",
        "overhead.log",
    ]
