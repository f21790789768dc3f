"""``fusedvlm convert-upstream``: weight formats, variants and one-line errors; model
directories (save_pretrained / from_pretrained); the CLIP question tokenizer (issue 11)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusedvlm.cli import main
from fusedvlm.upstream import FUSION, VISION, UpstreamError, convert

CKPT = os.path.join(os.path.dirname(__file__), "fixtures", "upstream", "tiny-llama2", "checkpoint")


def _quiet(*_) -> None:
    """Swallows the converter's progress lines."""


@pytest.fixture()
def src(tmp_path):
    """A writable copy of the authors' tiny checkpoint."""
    path = str(tmp_path / "tensorfusionvlm-v_img_multi_que_clip_fusion_linear-6_3_hd_llama-2_eye-ft-finetune")
    shutil.copytree(CKPT, path)
    return path


@pytest.fixture(scope="module")
def reference(module_tmp):
    out = str(module_tmp("ref") / "model")
    convert(CKPT, out, template="llama-2-vision", log=_quiet)
    return out


def _edit_config(path: str, **changes) -> None:
    p = os.path.join(path, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


def test_template_and_variant_come_from_the_directory_name(src, tmp_path):
    out = str(tmp_path / "out")
    convert(src, out, log=_quiet)  # "llama-2" in the name
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)["config"]
    assert cfg["llm"]["chat_template"] == "llama2" and cfg["drop_question"] is False
    assert (cfg["n_l"], cfg["n_s"], cfg["hd_num"], cfg["vision"]["quick_gelu"]) == (6, 3, 2, True)
    drop = src.replace("eye-ft", "drop-query-ft")
    os.rename(src, drop)
    convert(drop, out, log=_quiet)  # replaces the earlier output
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["config"]["drop_question"] is True
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary left behind


def test_sharded_pytorch_bin_converts_to_the_same_model(src, tmp_path, reference):
    state = load_file(os.path.join(src, "model.safetensors"))
    os.remove(os.path.join(src, "model.safetensors"))
    names = sorted(state)
    halves = [names[0::2], names[1::2]]  # both shards hold LLM and other tensors
    weight_map = {}
    for i, part in enumerate(halves):
        shard = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, os.path.join(src, shard))
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(src, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    out = str(tmp_path / "out")
    convert(src, out, log=_quiet)
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(reference, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(out, "llm", "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) == 2  # one LLM shard out per shard in: never the whole LLM at once


def test_query_rows_follow_the_placeholder_ids(reference):
    state = load_file(os.path.join(CKPT, "model.safetensors"))
    ours = load_file(os.path.join(reference, "model.safetensors"))["fuser.decoder.embed_tokens.weight"]
    theirs = state[FUSION + "embed_tokens.weight"]
    ids = [49408, 49409, 49411, 49412, 49413]  # not contiguous: 49410 is another added token
    assert torch.equal(ours[:49408], theirs[:49408])
    assert torch.equal(ours[49408:], theirs[ids])


def test_without_special_padding_every_query_is_the_pad_token(src, tmp_path):
    _edit_config(src, append_special_padding=False)
    out = str(tmp_path / "out")
    convert(src, out, log=_quiet)
    theirs = load_file(os.path.join(src, "model.safetensors"))[FUSION + "embed_tokens.weight"]
    ours = load_file(os.path.join(out, "model.safetensors"))["fuser.decoder.embed_tokens.weight"]
    assert torch.equal(ours[49408:], theirs[49407].expand(5, -1))  # pad = eos = <|endoftext|>


def _drop_key(src: str, key: str) -> None:
    p = os.path.join(src, "model.safetensors")
    state = load_file(p)
    del state[key]
    save_file(state, p)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: shutil.rmtree(os.path.join(s, "clip")), "missing CLIP tokenizer folder .*/clip"),
        (lambda s: os.remove(os.path.join(s, "model.safetensors")), "missing weights in .*: no model.safetensors"),
        (lambda s: os.remove(os.path.join(s, "config.json")), "missing file .*/config.json"),
        (lambda s: os.remove(os.path.join(s, "preprocessor_config.json")), "missing file .*/preprocessor_config.json"),
        (lambda s: os.remove(os.path.join(s, "tokenizer_config.json")), "missing file .*/tokenizer_config.json"),
        (lambda s: _drop_key(s, VISION + "pre_layrnorm.weight"), f"missing key {VISION}pre_layrnorm.weight"),
        (
            lambda s: _drop_key(s, VISION + "encoder.layers.1.self_attn.k_proj.bias"),
            "missing key .*layers.1.self_attn.k_proj.bias",
        ),
        (
            lambda s: _drop_key(s, "fusion_backbone.imgque_proj.weight"),
            "missing key fusion_backbone.imgque_proj.weight",
        ),
        (lambda s: _edit_config(s, model_type="llava"), "model_type 'llava' is not the authors'"),
        (lambda s: _edit_config(s, length_que_end=None), "has no 'length_que_end'"),
        (lambda s: _edit_config(s, length_que_end=4, length_que_end_short=6), "are not usable"),
        (
            lambda s: open(os.path.join(s, "model.safetensors"), "wb").write(b"garbage"),
            "cannot read .*model.safetensors",
        ),
    ],
)
def test_unreadable_directories_get_one_line_errors(src, tmp_path, capsys, damage, message):
    damage(src)
    out = str(tmp_path / "out")
    assert main(["convert-upstream", src, out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fusedvlm convert-upstream: error:"), err
    import re

    assert re.search(message, err), err
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_template_cannot_be_guessed(tmp_path):
    src = str(tmp_path / "ckpt")
    shutil.copytree(CKPT, src)
    with pytest.raises(UpstreamError, match="cannot tell the chat template .*pass --template"):
        convert(src, str(tmp_path / "out"), log=_quiet)


def test_chat_on_an_authors_directory_says_how_to_convert(capsys):
    assert main(["chat", "--checkpoint", CKPT, "--image", "sample:astronaut", "--question", "hi"]) == 2
    err = capsys.readouterr().err
    assert "convert it first: fusedvlm convert-upstream" in err and len(err.strip().splitlines()) == 1


def test_save_pretrained_round_trip(tmp_path, photo):
    from fusedvlm.config import get_preset
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.model import FusedVLM
    from fusedvlm.session import ChatSession

    torch.manual_seed(0)
    model = FusedVLM(get_preset("tiny")).eval()
    path = str(tmp_path / "m")
    model.save_pretrained(path)
    model.save_pretrained(path)  # overwriting an existing directory
    loaded = FusedVLM.from_pretrained(path)
    gen = GenerationConfig(max_new_tokens=4)
    a = ChatSession(model, photo).ask("what is this?", gen)
    b = ChatSession(loaded, photo).ask("what is this?", gen)
    assert a.ids == b.ids
    torch.testing.assert_close(a.first_logits, b.first_logits)


def test_clip_question_tokens_as_the_authors():
    from open_clip.tokenizer import SimpleTokenizer

    from fusedvlm.clip_text import clip_tokenizer

    tok, openclip = clip_tokenizer(), SimpleTokenizer()
    assert tok.encode("What is on the table?") == openclip.encode("What is on the table?")
    # No ftfy / HTML clean-up: curly quotes and &amp; keep their own byte-level pieces.
    assert tok.encode("it’s") != openclip.encode("it’s") and tok.encode("&amp;") != openclip.encode("&amp;")
    assert tok.encode("&amp;") == tok.encode("& amp ;")
    # A typed end-of-text is text, not the EOS that closes a fusion group.
    assert 49407 not in tok.encode("stop <|endoftext|> here")


def test_paper_tower_uses_quick_gelu():
    import open_clip

    from fusedvlm.config import VisionConfig, get_preset
    from fusedvlm.model.vision import build_clip_vision_tower

    # OpenAI's CLIP-L/336 (what the authors fine-tune) was trained with QuickGELU.
    assert open_clip.get_model_config(get_preset("paper").vision.model_name)["quick_gelu"] is True
    tower = build_clip_vision_tower(
        VisionConfig(image_size=28, patch_size=14, width=32, layers=1, heads=2, quick_gelu=True)
    )
    assert type(tower.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    tower = build_clip_vision_tower(VisionConfig(image_size=28, patch_size=14, width=32, layers=1, heads=2))
    assert isinstance(tower.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
