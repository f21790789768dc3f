"""The command line under bad input: every case is one line on stderr that names the problem
(and the file, where there is one), exit status 2, and it comes before any slow work."""

import os

import pytest

from fusedvlm.cli import main

BENCH_FAST = [
    "bench",
    "--preset",
    "tiny",
    "--n-l",
    "4",
    "--images",
    "astronaut",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--quiet",
]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(capsys, *argv) -> str:
    rc, _, err = _run(capsys, *argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def _chat(*extra):
    return ["chat", "--image", "sample:coffee", "--question", "What is this?", "--max-new-tokens", "2", *extra]


@pytest.mark.parametrize("questions", [0, -3])
def test_info_refuses_a_question_count_below_one(capsys, questions):
    line = _one_line_error(capsys, "info", "--preset", "tiny", "--questions", questions)
    assert f"--questions must be >= 1, got {questions}" in line


@pytest.mark.parametrize(
    "question, match",
    [
        ("caf\udce9?", r"question is not valid UTF-8 text: undecodable byte(s) b'\xe9'"),  # argv in Latin-1
        ("  ", "empty question"),
    ],
)
def test_chat_refuses_bad_question_text(capsys, question, match):
    line = _one_line_error(capsys, "chat", "--preset", "tiny", "--image", "sample:coffee", "--question", question)
    assert match in line


def test_chat_nan_temperature_is_refused_before_the_model_loads(capsys, monkeypatch):
    import fusedvlm.model

    def no_model(*a, **k):
        raise AssertionError("the model was built before the settings were checked")

    monkeypatch.setattr(fusedvlm.model, "FusedVLM", no_model)
    line = _one_line_error(capsys, *_chat("--preset", "tiny", "--sample", "--temperature", "nan"))
    assert "temperature must be a finite number > 0 when sampling, got nan" in line


@pytest.fixture(scope="module")
def stage1_run(module_tmp):
    from fusedvlm.train.synthetic import write_dataset

    root = module_tmp("stage1")
    data = write_dataset(str(root), 4, seed=5, size=48)
    out = root / "run"
    rc = main(
        [
            "train",
            "stage1",
            "--preset",
            "tiny",
            "--hd-num",
            "1",
            "--n-l",
            "4",
            "--data",
            data,
            "--image-root",
            str(root),
            "--out",
            str(out),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--embed-dim",
            "32",
            "--text-width",
            "32",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_chat_refuses_a_stage1_output(capsys, stage1_run):
    weights = stage1_run / "model.safetensors"
    line = _one_line_error(capsys, *_chat("--checkpoint", weights))
    assert f"{weights} is a stage-1 output" in line and "stage 2 with --init" in line


def test_chat_refuses_a_training_checkpoint(capsys, stage1_run):
    step = stage1_run / "checkpoints" / "step-00000001.safetensors"
    line = _one_line_error(capsys, *_chat("--checkpoint", step))
    assert f"{step} is a training checkpoint (for --resume)" in line


def test_chat_refuses_a_save_pretrained_directory(capsys, tmp_path, tiny_model):
    path = tmp_path / "fm"
    tiny_model.fuser.save_pretrained(path)
    line = _one_line_error(capsys, *_chat("--checkpoint", path))
    assert f"{path} is a save_pretrained directory" in line


@pytest.fixture
def trained(tmp_path, tiny_model):
    from fusedvlm.checkpoint import save_trainable

    path = tmp_path / "w.safetensors"
    save_trainable(tiny_model, str(path))
    return path


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-header", "garbage"])
def test_chat_names_a_damaged_checkpoint(capsys, trained, damage):
    data = trained.read_bytes()
    trained.write_bytes(
        {"truncate-data": data[: len(data) - 1000], "truncate-header": data[:20], "garbage": os.urandom(2048)}[damage]
    )
    line = _one_line_error(capsys, *_chat("--checkpoint", trained))
    assert f"{trained} is not a readable safetensors file" in line


def test_chat_refuses_preset_beside_checkpoint(capsys, trained):
    line = _one_line_error(capsys, *_chat("--preset", "smol", "--checkpoint", trained))
    assert "--preset smol and --checkpoint both given" in line


def test_chat_with_checkpoint_alone_still_works(capsys, trained):
    rc, out, err = _run(capsys, *_chat("--checkpoint", trained))
    assert rc == 0, err
    assert "\nQ: What is this?\nA:" in "\n" + out


def test_bench_out_that_is_a_file_is_refused_up_front(capsys, tmp_path, monkeypatch):
    import fusedvlm.benchmark.sweep as sweep

    def no_sweep(*a, **k):
        raise AssertionError("the sweep ran although its results could not be written")

    monkeypatch.setattr(sweep, "run_sweep", no_sweep)
    target = tmp_path / "results.json"
    target.write_text("{}")
    line = _one_line_error(capsys, *BENCH_FAST, "--max-new-tokens", 1, "--out", target)
    assert f"--out {target} is a file" in line
    assert target.read_text() == "{}"


@pytest.mark.parametrize(
    "flag, value", [("--max-new-tokens", 0), ("--repeats", 0), ("--questions", 0), ("--warmup", -1)]
)
def test_bench_refuses_values_it_would_silently_replace(capsys, tmp_path, flag, value):
    line = _one_line_error(capsys, *BENCH_FAST, "--out", tmp_path / "b", flag, value)
    assert f"{flag} must be >= " in line and f"got {value}" in line


def test_every_model_command_names_a_missing_checkpoint_alike(capsys, tmp_path):
    missing = tmp_path / "nope.safetensors"
    pope = os.path.join(os.path.dirname(__file__), "..", "fixtures", "eval", "POPE.tsv")
    for argv in (
        _chat("--checkpoint", missing),
        ["bench", "--checkpoint", missing, "--out", tmp_path / "b"],
        ["eval", "--checkpoint", missing, "--benchmark", pope, "--out", tmp_path / "e"],
    ):
        line = _one_line_error(capsys, *argv)
        assert line == f"fusedvlm {argv[0]}: error: checkpoint not found: {missing}", line
