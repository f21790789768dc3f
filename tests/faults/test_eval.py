"""``fusedvlm eval`` under reruns and bad rows (issue 26): resumable predictions are bound to
what produced them (weights, dtype, device, decode settings; each row's image and prompt), so a
rerun never mixes two models or scores an old answer to an edited question; bad rows are
reported per row and honour ``--on-error skip``; outputs are checked, locked and atomic."""

from __future__ import annotations

import base64
import csv
import errno
import io
import json
import os

import pytest
import torch

from fusedvlm.cli import main

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "eval")


def _rows(name="POPE.tsv", limit=4):
    with open(os.path.join(FIXTURES, name), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))[:limit]


def _write(path, rows, bom=False):
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]), delimiter="\t")
    w.writeheader()
    w.writerows(rows)
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        f.write(text.getvalue())
    return str(path)


def _eval(out, bench, *extra):
    return main(
        [
            "eval",
            "--n-l",
            "4",
            "--out",
            str(out),
            "--benchmark",
            str(bench),
            "--no-progress",
            "--no-plot",
            *map(str, extra),
        ]
    )


def _predictions(out, name="POPE"):
    with open(os.path.join(out, name, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def _done_count(capsys) -> int:
    return int(capsys.readouterr().out.split(" (item, n_l)")[0])


@pytest.fixture()
def bench(tmp_path):
    return _write(tmp_path / "POPE.tsv", _rows())


def _checkpoint(path, seed):
    from fusedvlm.checkpoint import save_trainable
    from fusedvlm.model import FusedVLM

    torch.manual_seed(seed)
    save_trainable(FusedVLM.from_preset("tiny"), str(path))


def test_weights_overwritten_in_place_are_not_mixed(tmp_path, bench, capsys):
    # On 29b7c74 the rerun kept the old predictions and scores.csv mixed two models.
    weights, out = tmp_path / "w.safetensors", tmp_path / "out"
    _checkpoint(weights, seed=1)
    assert _eval(out, bench, "--checkpoint", weights) == 0
    run = json.load(open(out / "run.json"))
    assert run["weights"] and run["dtype"] == "float32" and run["device"] == "cpu" and run["decode"] == "greedy"
    _checkpoint(weights, seed=2)
    capsys.readouterr()
    assert _eval(out, bench, "--checkpoint", weights) == 2
    err = capsys.readouterr().err
    assert "holds predictions of another run (weights:" in err and "--fresh" in err and len(err.splitlines()) == 1
    assert _eval(out, bench, "--checkpoint", weights, "--fresh") == 0
    assert _done_count(capsys) == 4  # every row again
    assert len(_predictions(out)) == 4


def test_another_dtype_is_not_mixed(tmp_path, bench, capsys):
    out = tmp_path / "out"
    assert _eval(out, bench, "--preset", "tiny") == 0
    capsys.readouterr()
    assert _eval(out, bench, "--preset", "tiny", "--dtype", "bf16") == 2
    assert "dtype: 'float32' -> 'bfloat16'" in capsys.readouterr().err


def test_edited_row_is_predicted_again(tmp_path, capsys):
    rows = _rows()
    path = _write(tmp_path / "POPE.tsv", rows)
    out = tmp_path / "out"
    assert _eval(out, path, "--preset", "tiny") == 0
    capsys.readouterr()
    rows[2]["question"] = "Is there a dog in the image?"
    rows[3]["answer"] = "Yes" if rows[3]["answer"] == "No" else "No"  # scoring only: no new prediction
    _write(path, rows)
    assert _eval(out, path, "--preset", "tiny") == 0
    assert _done_count(capsys) == 1
    lines = _predictions(out)
    assert [p["index"] for p in lines] == ["0", "1", "2", "3", "2"] and lines[2]["digest"] != lines[4]["digest"]
    with open(out / "POPE" / "scored.jsonl") as f:
        scored = {s["index"]: s for s in map(json.loads, f)}
    assert scored["2"]["prediction"] == lines[4]["prediction"]
    assert scored["3"]["answer"] == rows[3]["answer"]


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_over_long_question_is_a_row_problem(tmp_path, capsys, on_error):
    # On 29b7c74 it stopped the whole run with no index, and --on-error skip did not skip it.
    rows = _rows()
    rows[1]["question"] = "is there a cat " * 3000
    path = _write(tmp_path / "POPE.tsv", rows)
    out = tmp_path / "out"
    rc = _eval(out, path, "--preset", "tiny", "--on-error", on_error)
    if on_error == "fail":
        assert rc == 2
        err = capsys.readouterr().err
        assert "index 1: question too long" in err and len(err.strip().splitlines()) == 1
        return
    assert rc == 0
    skipped = [json.loads(line) for line in open(out / "skipped.jsonl")]
    assert [s["index"] for s in skipped] == ["1"] and "question too long" in skipped[0]["error"]
    assert sorted(p["index"] for p in _predictions(out)) == ["0", "2", "3"]


@pytest.mark.parametrize(
    "cell, message",
    [
        ("pictures/missing.jpg", "image file not found: .*pictures/missing.jpg"),
        ("77", "'image' '77' is neither base64 of an image nor the index of a row"),
        ("1", "'image' is '1', the row's own index"),
    ],
    ids=["missing_path", "missing_row", "self_reference"],
)
def test_bad_image_cells_say_what_is_wrong(tmp_path, cell, message):
    # On 29b7c74 all three were reported as "bad base64".
    from fusedvlm.eval.data import load_benchmark

    rows = _rows()
    rows[1]["image"] = cell
    b = load_benchmark(_write(tmp_path / "POPE.tsv", rows))
    import re

    assert len(b.problems) == 1 and b.problems[0].index == "1"
    assert re.search(message, b.problems[0].message), b.problems[0].message


def test_excel_byte_order_mark_is_read(tmp_path):
    # On 29b7c74: "missing column(s) index".
    from fusedvlm.eval.data import load_benchmark

    b = load_benchmark(_write(tmp_path / "POPE.tsv", _rows(), bom=True))
    assert [it.index for it in b.items] == ["0", "1", "2", "3"] and not b.problems


def _png(size, exif_orientation=None) -> bytes:
    from PIL import Image

    image = Image.new("RGB", size, (200, 30, 30))
    buf = io.BytesIO()
    if exif_orientation is None:
        image.save(buf, "PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_exif_orientation_applies_to_base64_images(tmp_path):
    # On 29b7c74 path images were turned upright and base64 ones were not.
    from fusedvlm.eval.data import load_benchmark

    rows = _rows(limit=1)
    rows[0]["image"] = base64.b64encode(_png((40, 20), exif_orientation=6)).decode()
    b = load_benchmark(_write(tmp_path / "POPE.tsv", rows))
    assert b.open_image(b.items[0].image_key).size == (20, 40)


def test_pixel_limit_is_checked_before_decoding(tmp_path, capsys):
    from fusedvlm.preprocess import DEFAULT_MAX_PIXELS, load_image

    big = tmp_path / "big.png"
    from PIL import Image

    Image.new("1", (8000, 6000)).save(big)  # 48 MP in 6 MB: a bilevel image
    with pytest.raises(ValueError, match=r"8000x6000 \(WxH\), 48.0 MP, above the 40 MP limit"):
        load_image(big)
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert load_image(big, max_pixels=48_000_000).size == (8000, 6000)
    rows = _rows(limit=1)
    rows[0]["image"] = base64.b64encode(_png((100, 100))).decode()
    path = _write(tmp_path / "POPE.tsv", rows)
    assert _eval(tmp_path / "out", path, "--preset", "tiny", "--max-image-pixels", "5000") == 2
    assert "above the 0.005 MP limit" in capsys.readouterr().err


def test_output_that_is_a_file_is_one_line(tmp_path, bench, capsys):
    out = tmp_path / "out"
    out.write_text("keep")
    assert _eval(out, bench, "--preset", "tiny") == 2
    err = capsys.readouterr().err
    assert "exists and is not a directory" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "keep"


def test_second_writer_is_refused(tmp_path, bench, capsys):
    from fusedvlm.outputs import locked_output

    out = tmp_path / "out"
    with locked_output(str(out)):
        assert _eval(out, bench, "--preset", "tiny") == 2
    assert "in use by another fusedvlm run" in capsys.readouterr().err
    assert not out.exists()


def test_disk_full_keeps_the_previous_reports(tmp_path, bench, capsys, monkeypatch):
    # On 29b7c74 a full disk left 0-byte scored.jsonl / metrics.json behind.
    out = tmp_path / "out"
    assert _eval(out, bench, "--preset", "tiny") == 0
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "scores.csv")}
    scored = (out / "POPE" / "scored.jsonl").read_bytes()
    real_fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith("."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    assert _eval(out, bench, "--preset", "tiny") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / "POPE" / "scored.jsonl").read_bytes() == scored
    leftovers = [n for root, _, names in os.walk(tmp_path) for n in names if n.startswith(".")]
    assert leftovers == []


def test_unwritable_output_folder_is_one_line(tmp_path, bench, capsys, monkeypatch):
    # Root writes into read-only folders, so the permission is simulated where it is asked.
    real = os.access
    folder = str(tmp_path / "ro")
    os.mkdir(folder)
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == folder else real(p, mode))
    assert _eval(os.path.join(folder, "out"), bench, "--preset", "tiny") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write in {folder} (permission denied)" in err
