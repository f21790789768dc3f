import os

import pytest
import torch

from fusedvlm.checkpoint import load_trainable, read_config, save_trainable
from fusedvlm.model import FusedVLM


def test_roundtrip_restores_every_trainable_tensor_and_the_config(tmp_path, tiny_model):
    path = str(tmp_path / "ckpt" / "model.safetensors")
    save_trainable(tiny_model, path)
    assert read_config(path) == tiny_model.cfg
    torch.manual_seed(123)
    other = FusedVLM(read_config(path), llm=tiny_model.llm, tokenizer=tiny_model.tokenizer)
    assert not torch.equal(other.fuser.merge.weight, tiny_model.fuser.merge.weight)
    load_trainable(other, path)
    for (k, a), b in zip(tiny_model.trainable_state_dict().items(), other.trainable_state_dict().values()):
        assert torch.equal(a, b), k
    assert [f for f in os.listdir(tmp_path / "ckpt")] == ["model.safetensors"]  # no temp files left


def test_mismatch_names_the_offending_keys(tmp_path, tiny_model):
    from fusedvlm.checkpoint import atomic_save_safetensors

    state = dict(tiny_model.trainable_state_dict())
    state.pop("fuser.merge.lf_token")
    state["fuser.extra"] = torch.zeros(1)
    state["fuser.projection.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "bad.safetensors")
    atomic_save_safetensors(state, path)
    with pytest.raises(ValueError) as err:
        load_trainable(tiny_model, path)
    msg = str(err.value)
    assert "missing: fuser.merge.lf_token" in msg and "unexpected: fuser.extra" in msg
    assert "fuser.projection.weight: checkpoint (3, 3)" in msg


def test_missing_and_corrupt_files(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError):
        load_trainable(tiny_model, str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_trainable(tiny_model, str(bad))
