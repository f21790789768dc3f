"""``convert-upstream`` under bad input: everything checkable is checked before a byte is
written, the source is never an output, and interruptions, full disks and unwritable outputs
are one line with nothing half-written (issue 26)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

import fusedvlm.upstream as upstream
from fusedvlm.cli import main
from fusedvlm.outputs import locked_output
from fusedvlm.upstream import FUSION, LLM

CKPT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "upstream", "tiny-llama2", "checkpoint")
NAME = "tensorfusionvlm-v_img_multi_que_clip_fusion_linear-6_3_hd_llama-2_eye-ft-finetune"


@pytest.fixture()
def src(tmp_path):
    path = str(tmp_path / "in" / NAME)
    shutil.copytree(CKPT, path)
    return path


@pytest.fixture()
def streamed(monkeypatch):
    """The weight files the conversion started to write (the preflight reads only headers)."""
    import fusedvlm.weights

    seen = []
    real = fusedvlm.weights.write_safetensors

    def spy(path, *args, **kwargs):
        seen.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fusedvlm.weights, "write_safetensors", spy)
    return seen


def _digest(folder: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _one_line(capsys, *argv) -> str:
    rc = main(["convert-upstream", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fusedvlm convert-upstream: error:"), err
    return err


def _nothing_written(out: str) -> None:
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    if os.path.isdir(parent):
        assert not [n for n in os.listdir(parent) if n.startswith(".")], os.listdir(parent)


def _drop_keys(src: str, prefix: str) -> None:
    p = os.path.join(src, "model.safetensors")
    state = load_file(p)
    save_file({k: v for k, v in state.items() if not k.startswith(prefix)}, p)


def _edit(src: str, name: str, **changes) -> None:
    p = os.path.join(src, name)
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize(
    "prefix, message",
    [
        (FUSION + "layers.1.", r"missing key imgque_backbone.imgque_model.layers.1.\*: .*declares 2 layers"),
        (LLM + "model.layers.1.", r"missing key llm_backbone.model.layers.1.\*: .*llm_config declares 2 layers"),
    ],
    ids=["fusion", "llm"],
)
def test_missing_last_layer_is_refused(src, tmp_path, capsys, streamed, prefix, message):
    # On 29b7c74 a checkpoint without its last fusion layer built a 1-layer decoder silently.
    _drop_keys(src, prefix)
    out = str(tmp_path / "out")
    import re

    assert re.search(message, _one_line(capsys, src, out))
    _nothing_written(out)
    assert streamed == []


@pytest.mark.parametrize("where", ["same", "inside", "link"])
def test_output_cannot_be_or_sit_in_the_source(src, tmp_path, capsys, where):
    # On 29b7c74 `convert-upstream SRC SRC` replaced the authors' config.json and weights.
    before = _digest(src)
    if where == "link":
        out = str(tmp_path / "alias")
        os.symlink(src, out)
    else:
        out = src if where == "same" else os.path.join(src, "converted")
    line = _one_line(capsys, src, out)
    assert "is the source checkpoint" in line or "is inside the source checkpoint" in line
    assert _digest(src) == before
    assert not [n for n in os.listdir(src) if n.startswith(".")]


def test_output_containing_the_source_is_refused(src, capsys):
    parent = os.path.dirname(src)
    before = _digest(src)
    assert "contains the source checkpoint" in _one_line(capsys, src, parent)
    assert _digest(src) == before


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: _edit(s, "config.json", fusion_name="other"), "fusion_name 'other' is not supported"),
        (lambda s: shutil.rmtree(os.path.join(s, "clip")), "missing CLIP tokenizer folder"),
        (lambda s: os.remove(os.path.join(s, "preprocessor_config.json")), "missing file .*preprocessor_config.json"),
        (lambda s: os.rename(s, s.replace("llama-2", "model")), "cannot tell the chat template"),
    ],
    ids=["fusion_name", "clip", "preprocessor", "template"],
)
def test_config_problems_are_found_before_any_shard_is_read(src, tmp_path, capsys, streamed, damage, message):
    # On 29b7c74 these were reported after every LLM shard had been rewritten.
    damage(src)
    if not os.path.isdir(src):
        src = src.replace("llama-2", "model")
    out = str(tmp_path / "out")
    import re

    assert re.search(message, _one_line(capsys, src, out))
    assert streamed == []
    _nothing_written(out)


def test_converted_directory_as_source_says_so(src, tmp_path, capsys):
    first = str(tmp_path / "first")
    assert main(["convert-upstream", src, first]) == 0
    capsys.readouterr()
    line = _one_line(capsys, first, str(tmp_path / "second"))
    assert "is already a fusedvlm model directory" in line


def test_output_that_is_a_file_is_one_line(src, tmp_path, capsys, streamed):
    out = tmp_path / "out"
    out.write_text("keep me")
    assert "exists and is not a directory" in _one_line(capsys, src, out)
    assert out.read_text() == "keep me" and streamed == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(src, tmp_path, capsys, streamed):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "permission denied" in _one_line(capsys, src, folder / "out")
    finally:
        folder.chmod(0o755)
    assert streamed == []


def test_too_little_space_is_found_up_front(src, tmp_path, capsys, streamed, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = str(tmp_path / "out")
    assert "not enough space" in _one_line(capsys, src, out)
    assert streamed == []
    _nothing_written(out)


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    import fusedvlm.weights

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", "model-00001-of-00001.safetensors")

    monkeypatch.setattr(fusedvlm.weights, "write_safetensors", full)
    out = str(tmp_path / "out")
    assert "No space left on device" in _one_line(capsys, src, out)
    _nothing_written(out)


def test_ctrl_c_exits_quietly_and_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(upstream, "shard_tensors", interrupted)
    out = str(tmp_path / "out")
    assert main(["convert-upstream", src, out]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "fusedvlm convert-upstream: interrupted"
    _nothing_written(out)


def test_second_writer_is_refused(src, tmp_path, capsys, streamed):
    out = str(tmp_path / "out")
    with locked_output(out):
        assert "is in use by another fusedvlm run" in _one_line(capsys, src, out)
    assert streamed == []
    _nothing_written(out)
