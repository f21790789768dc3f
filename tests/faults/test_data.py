"""Training data and training runs under faults: records that are all bad, runs killed before
their first checkpoint, damaged checkpoints and a torn metrics file, badly encoded data."""

import json
import os

import pytest

from fusedvlm.cli import main
from fusedvlm.train.data import read_records
from fusedvlm.train.synthetic import write_dataset

TINY = ["--preset", "tiny", "--hd-num", "1", "--n-l", "4", "--lr", "1e-3", "--no-progress"]


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train(capsys, *args):
    rc = main(["train", "stage2", *TINY, *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.fixture(scope="module")
def shapes(module_tmp):
    root = module_tmp("shapes")
    return str(root), write_dataset(str(root), 6, seed=3, size=48)


@pytest.fixture
def mostly_broken(tmp_path, shapes):
    """2 good records, then 6 whose image files exist but are not images."""
    root, data = shapes
    with open(data) as f:
        good = [json.loads(line) for line in f][:2]
    records = list(good)
    for i in range(6):
        bad = os.path.join(root, "images", f"broken-{i}.png")
        with open(bad, "wb") as f:
            f.write(b"this is not a png")
        records.append({**good[0], "image": os.path.relpath(bad, root)})
    path = tmp_path / "mostly_broken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, str(path)


@pytest.mark.parametrize("accum", [1, 2])
def test_skip_a_micro_batch_made_only_of_bad_records(tmp_path, capsys, mostly_broken, accum):
    root, data = mostly_broken
    out = str(tmp_path / "run")
    rc, log = _train(
        capsys,
        "--data",
        data,
        "--image-root",
        root,
        "--out",
        out,
        "--steps",
        4,
        "--batch-size",
        2,
        "--grad-accum",
        accum,
        "--on-error",
        "skip",
    )
    assert rc == 0, log
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert any(r.get("no_update") for r in rows) or accum == 2, "the data should give an all-bad micro-batch"
    assert any(r["loss"] is not None for r in rows)
    assert sum(r["skipped"] for r in rows) == 8 - sum(r["samples"] for r in rows)
    assert "skipped record" in log and "record(s) skipped" in log
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-00000004.safetensors"]


def test_run_killed_before_its_first_checkpoint_is_not_stuck(tmp_path, capsys, shapes):
    root, data = shapes
    out = tmp_path / "run"
    out.mkdir()
    # What a run killed at step 2 of 3, before any checkpoint, leaves behind.
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    common = ["--data", data, "--image-root", root, "--out", str(out), "--steps", 2, "--batch-size", 2]
    rc, log = _train(capsys, *common)
    assert rc == 2 and "pass --resume to continue it" in log and "from step 0 if it has none" in log
    rc, log = _train(capsys, *common, "--resume")
    assert rc == 0, log
    assert "no intact checkpoint" in log and "starting from step 0" in log
    assert [r["step"] for r in _rows(out)] == [1, 2] and _rows(out)[0]["loss"] != 5.0


@pytest.fixture
def finished_run(tmp_path, capsys, shapes):
    root, data = shapes
    out = str(tmp_path / "run")
    common = [
        "--data",
        data,
        "--image-root",
        root,
        "--out",
        out,
        "--steps",
        3,
        "--batch-size",
        2,
        "--save-every",
        1,
        "--keep-checkpoints",
        3,
    ]
    rc, log = _train(capsys, *common)
    assert rc == 0, log
    return out, common


def test_run_outputs_follow_the_umask(finished_run):
    import stat

    out, _ = finished_run
    mask = os.umask(0)
    os.umask(mask)
    for path in ("model.safetensors", "metrics.jsonl", "run.json", "checkpoints/step-00000003.safetensors"):
        assert stat.S_IMODE(os.stat(os.path.join(out, path)).st_mode) == 0o666 & ~mask, path
    assert stat.S_IMODE(os.stat(os.path.join(out, "checkpoints")).st_mode) == 0o777 & ~mask


def test_resume_falls_back_to_the_newest_intact_checkpoint(capsys, finished_run):
    out, common = finished_run
    want = _rows(out)
    newest = os.path.join(out, "checkpoints", "step-00000003.safetensors")
    data = open(newest, "rb").read()
    with open(newest, "wb") as f:
        f.write(data[: len(data) // 2])  # a save cut short by a full disk
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # torn by the kill
    rc, log = _train(capsys, *common, "--resume")
    assert rc == 0, log
    assert "skipping unreadable checkpoint" in log and "step-00000003.safetensors" in log
    assert "dropping the torn last line" in log
    got = _rows(out)  # every line parses again
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # step 3 redone bit for bit


def test_truncated_checkpoint_given_to_resume_is_named(capsys, finished_run):
    out, common = finished_run
    newest = os.path.join(out, "checkpoints", "step-00000003.safetensors")
    with open(newest, "r+b") as f:
        f.truncate(100)
    rc, log = _train(capsys, *common, "--resume", newest)
    assert rc == 2
    assert log.strip().splitlines()[-1].startswith("fusedvlm train: error: training checkpoint")
    assert "step-00000003.safetensors is not a readable safetensors file" in log


def test_damaged_metrics_line_in_the_middle_is_named(capsys, finished_run):
    out, common = finished_run
    path = os.path.join(out, "metrics.jsonl")
    lines = open(path).read().splitlines()
    lines[1] = lines[1][:10]
    open(path, "w").write("\n".join(lines) + "\n")
    rc, log = _train(capsys, *common, "--resume")
    assert rc == 2 and "metrics.jsonl: line 2 is not a metrics row" in log


# ------------------------------------------------------------------ badly encoded data
def test_non_utf8_jsonl_line_skips_that_record(tmp_path, shapes):
    root, data = shapes
    lines = open(data, "rb").read().splitlines()
    lines[1] = lines[1].replace(b"What", b"Wh\xe9t", 1) if b"What" in lines[1] else lines[1][:-2] + b'\xff"}'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, problems = read_records(str(path), root)
    assert len(records) == len(lines) - 1
    assert (
        len(problems) == 1
        and "record 1: line 2 is not UTF-8 text" in str(problems[0])
        and str(path) in str(problems[0])
    )


def test_non_utf8_json_list_names_the_file(tmp_path, shapes):
    root, _ = shapes
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"image": "x.png", "conversations": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"bad.json: record -1: not UTF-8 text"):
        read_records(str(path), root)


def test_lone_surrogate_in_a_record_skips_it(tmp_path, shapes):
    root, data = shapes
    recs = [json.loads(line) for line in open(data)]
    recs[0]["conversations"][0]["value"] = "half \\ud83d an emoji?"
    path = tmp_path / "surrogate.jsonl"
    path.write_text("".join(json.dumps(r).replace("\\\\ud83d", "\\ud83d") + "\n" for r in recs))
    records, problems = read_records(str(path), root)
    assert len(records) == len(recs) - 1
    assert "record 0: turn 0 is not valid UTF-8 text: lone surrogate" in str(problems[0])


def test_a_run_whose_records_all_fail_to_encode_fails_and_says_so(tmp_path, capsys, mostly_broken):
    # Issue 26: it used to exit 0 with the untrained weights saved as model.safetensors.
    root, data = mostly_broken
    lines = open(data).read().splitlines()[2:]  # only the records whose images are not images
    path = tmp_path / "all_broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "run")
    rc, log = _train(capsys, "--data", path, "--image-root", root, "--out", out, "--steps", 2, "--batch-size", 3)
    assert rc == 2, log
    assert all(r["no_update"] and r["loss"] is None for r in _rows(out))
    assert "every record was skipped; no update" in log
    assert "no usable record: 6 record(s) skipped" in log and "no model written" in log
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_ddp_rank_with_only_bad_records_matches_one_process(tmp_path, mostly_broken, stage):
    """Two gloo ranks of one sample each: when one rank's sample is bad and the other's is
    not, the step bypasses DDP (whose collectives need both ranks) and averages by hand;
    losses and skip counts must equal one process running the same global batches."""
    import subprocess
    import sys

    from tests.train.conftest import run_env

    root, data = mostly_broken
    extra = ["--embed-dim", "32", "--text-width", "32"] if stage == "stage1" else []
    args = ["train", stage, *TINY, "--data", data, "--image-root", root, "--steps", "4", "--batch-size", "2", *extra]
    single = subprocess.run(
        [sys.executable, "-m", "fusedvlm.cli", *args, "--out", str(tmp_path / "one")],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fusedvlm.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert any(r["samples"] == 1 for r in one), "no step with one good and one bad sample"
    for a, b in zip(one, two, strict=True):
        assert (a["samples"], a["skipped"], a.get("no_update")) == (b["samples"], b["skipped"], b.get("no_update"))
        if a["loss"] is None:
            assert b["loss"] is None
        else:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
