"""``fusedvlm train`` under bad input (issue 26): no usable record fails with the count and
writes no model; the run directory is checked up front and locked against a second writer."""

from __future__ import annotations

import os

import pytest

from fusedvlm.cli import main
from fusedvlm.outputs import locked_output
from fusedvlm.train.synthetic import write_dataset


@pytest.fixture()
def data(tmp_path):
    root = str(tmp_path / "data")
    return root, write_dataset(root, 4, seed=3, size=48)


def _train(root, path, out, *extra):
    args = ["train", "stage2", "--preset", "tiny", "--hd-num", "1", "--n-l", "4", "--data", path]
    args += ["--image-root", root, "--steps", "2", "--batch-size", "2", "--no-progress", "--out", out, *extra]
    return main([str(a) for a in args])


def test_no_usable_record_fails_and_writes_no_model(data, tmp_path, capsys):
    # On 29b7c74 the run exited 0 and saved the untrained weights.
    root, path = data
    for name in os.listdir(os.path.join(root, "images")):
        with open(os.path.join(root, "images", name), "wb") as f:
            f.write(b"not a png")
    out = tmp_path / "run"
    assert _train(root, path, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no usable record: 4 record(s) skipped" in err[-1] and "no model written" in err[-1]
    assert not (out / "model.safetensors").exists()


def test_out_that_is_a_file_is_one_line(data, tmp_path, capsys):
    root, path = data
    out = tmp_path / "run"
    out.write_text("keep")
    assert _train(root, path, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not a directory" in err
    assert out.read_text() == "keep"


def test_second_writer_is_refused(data, tmp_path, capsys):
    # On 29b7c74 two trainings into one --out both ran and interleaved metrics.jsonl.
    root, path = data
    out = tmp_path / "run"
    with locked_output(str(out)):
        assert _train(root, path, out) == 2
    assert "in use by another fusedvlm run" in capsys.readouterr().err
    assert not out.exists()


def test_disk_full_at_the_final_save_is_one_line(data, tmp_path, capsys, monkeypatch):
    import errno

    import fusedvlm.checkpoint as checkpoint

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", full)
    root, path = data
    out = tmp_path / "run"
    assert _train(root, path, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in err[-1] and err[-1].startswith("fusedvlm train: error:")
    assert not (out / "model.safetensors").exists()
