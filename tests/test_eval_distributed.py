"""``torchrun --nproc-per-node 2 -m fusedvlm.cli eval``: two gloo ranks give exactly the
predictions and scores of one process, and a rank resumes from its own file after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusedvlm.cli import main

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def _records(path: str) -> dict:
    with open(path) as f:
        return {(r["index"], r["n_l"]): r["prediction"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_and_resume(tmp_path, capsys):
    pope = os.path.join(FIXTURES, "POPE.tsv")
    common = ["eval", "--preset", "tiny", "--n-l", "4,1", "--benchmark", pope, "--no-progress", "--no-plot"]
    one = str(tmp_path / "one")
    assert main([*common, "--out", one]) == 0
    single = _records(os.path.join(one, "POPE", "predictions.jsonl"))
    assert len(single) == 12

    # A rank-0 file as a killed run leaves it: three predictions, then a line torn mid-write.
    two = str(tmp_path / "two")
    os.makedirs(os.path.join(two, "POPE"))
    with open(os.path.join(one, "POPE", "predictions.jsonl")) as f:
        kept = f.readlines()[:3]
    with open(os.path.join(two, "POPE", "predictions.rank0.jsonl"), "w") as f:
        f.writelines(kept)
        f.write('{"index": "1", "n_l"')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*cmd, "-m", "fusedvlm.cli", *common, "--out", two], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{12 - 3} (item, n_l) predictions" in out.stdout  # both ranks' work, the kept three not redone
    assert _records(os.path.join(two, "POPE", "predictions.jsonl")) == single
    assert sorted(os.listdir(os.path.join(two, "POPE"))) == ["predictions.jsonl", "scored.jsonl"]
    with open(os.path.join(one, "metrics.json")) as a, open(os.path.join(two, "metrics.json")) as b:
        assert json.load(a)["benchmarks"] == json.load(b)["benchmarks"]
    with open(os.path.join(one, "scores.csv")) as a, open(os.path.join(two, "scores.csv")) as b:
        assert a.read() == b.read()
