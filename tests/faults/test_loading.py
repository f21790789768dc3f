"""Loading a model directory under damage (issue 26): a truncated file is named, a config or a
count of the wrong type is one clear error."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from fusedvlm.cli import main

CKPT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "upstream", "tiny-llama2", "checkpoint")


@pytest.fixture(scope="module")
def converted(module_tmp):
    root = module_tmp("loading")
    src = str(root / "ckpt-llama-2")
    shutil.copytree(CKPT, src)
    out = str(root / "model")
    assert main(["convert-upstream", src, out]) == 0
    return out


@pytest.fixture()
def model_dir(converted, tmp_path):
    path = str(tmp_path / "model")
    shutil.copytree(converted, path)
    return path


def _chat_error(capsys, path) -> str:
    capsys.readouterr()
    assert main(["chat", "--checkpoint", path, "--image", "sample:coffee", "--question", "hi"]) == 2
    # Hugging Face's own loading progress bar may come first; ours is the last line.
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("fusedvlm chat: error: "), line
    return line


def _truncate(path: str, by: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - by)


def test_truncated_llm_shard_is_named(model_dir, capsys):
    # On 29b7c74: a safetensors "incomplete metadata" traceback without the file.
    shard = next(n for n in os.listdir(os.path.join(model_dir, "llm")) if n.endswith(".safetensors"))
    _truncate(os.path.join(model_dir, "llm", shard))
    line = _chat_error(capsys, model_dir)
    assert f"LLM weights {os.path.join(model_dir, 'llm', shard)} are truncated or corrupt" in line


def test_truncated_model_weights_are_named(model_dir, capsys):
    _truncate(os.path.join(model_dir, "model.safetensors"))
    line = _chat_error(capsys, model_dir)
    assert f"{os.path.join(model_dir, 'model.safetensors')}: tensor" in line and "truncated or corrupt" in line


def test_int_weights_are_refused(model_dir):
    from safetensors.torch import load_file, save_file

    from fusedvlm.model import FusedVLM

    p = os.path.join(model_dir, "model.safetensors")
    state = load_file(p)
    state["fuser.projection.weight"] = state["fuser.projection.weight"].int()
    save_file(state, p)
    with pytest.raises(ValueError, match=r"fuser.projection.weight is torch.int32; model weights must be floating"):
        FusedVLM.from_pretrained(model_dir)


def test_config_without_config_object(model_dir):
    from fusedvlm.model import FusedVLM

    p = os.path.join(model_dir, "config.json")
    meta = json.load(open(p))
    del meta["config"]
    json.dump(meta, open(p, "w"))
    with pytest.raises(ValueError, match=r"config.json has no 'config' object"):
        FusedVLM.from_pretrained(model_dir)


def test_bool_query_count_is_refused(tiny_model, photo):
    # On 29b7c74 ChatSession(n_l=True) was taken as n_l = 1.
    from fusedvlm.session import ChatSession

    with pytest.raises(ValueError, match="n_l and n_s must be integers"):
        ChatSession(tiny_model, photo, n_l=True)


def test_directory_parked_by_a_killed_fallback_switch_is_restored_on_load(model_dir):
    # On 29b7c74 the directory stayed missing until the next save.
    import subprocess
    import sys

    from fusedvlm.model import FusedVLM

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    folder, base = os.path.split(model_dir)
    os.rename(model_dir, os.path.join(folder, f".{base}.old-{pid}-0123abcd"))
    model = FusedVLM.from_pretrained(model_dir)
    assert model.cfg.n_l == 6 and os.path.isdir(model_dir)
    assert not [n for n in os.listdir(folder) if n.startswith(".")]
