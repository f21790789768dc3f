"""``fusedvlm psi`` inputs (issue 26): a line that is not UTF-8 is named by file and line."""

from __future__ import annotations

import json

import pytest

from fusedvlm.analysis.pairs import load_pairs, load_prompts


def test_non_utf8_pair_line_is_named(tmp_path):
    # On 29b7c74: a UnicodeDecodeError naming neither the file nor the line.
    good = json.dumps({"question": "q", "chosen": "a", "rejected": "b"}).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(good + b"\n" + good.replace(b'"a"', b'"caf\xe9"') + b"\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not UTF-8 text \(byte b'\\xe9' at column \d+\)"):
        load_pairs(str(path))


def test_non_utf8_prompt_line_is_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"question": "ok"}\n{"question": "\xff"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: not UTF-8 text"):
        load_prompts(str(path))


def test_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import fusedvlm.analysis.cli as psi_cli
    from fusedvlm.cli import main

    def never(*_a, **_k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(psi_cli, "_load_model", never)
    out = tmp_path / "psi"
    out.write_text("keep me")
    assert main(["psi", "--model", "random", "--generate", "2", "--out", str(out)]) == 2
    assert f"output {out} exists and is not a directory" in capsys.readouterr().err
    assert out.read_text() == "keep me"
