"""bench/bench_dropin.py end to end on a tiny host (the committed figures use the released shapes)."""

import json


def test_dropin_bench_reports_every_row_at_each_budget(tmp_path, capsys):
    from bench.bench_dropin import main

    out = tmp_path / "r.json"
    args = ["--host", "qwen2_5_vl", "--scale", "tiny", "--budgets", "4", "8", "--fastv-k", "1"]
    assert main([*args, "--rounds", "1", "--decode-steps", "2", "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["native", "fusion 4", "fusion 8", "fastv 4", "fastv 8", "visionzip 4", "visionzip 8"]
    native = rows.pop("native")
    assert native["visual"] == 64 and native["vs_native"] == 1.0  # tiny: 224 px, 14-px patches, 2x2 merge
    for name, row in rows.items():
        # n visual tokens reach the LLM in place of the native 64; the text around them is the same.
        assert row["visual"] == int(name.split()[1])
        assert row["llm_tokens"] - row["visual"] == native["llm_tokens"] - native["visual"]
        assert row["ttft_ms"] > 0 and row["decode_tps"] > 0
    assert "fastv 8" in capsys.readouterr().out
