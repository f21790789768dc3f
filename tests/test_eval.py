"""``fusedvlm eval``: reading VLMEvalKit TSVs, shared prefix == recompute, resume, the CLI."""

import csv
import json
import os

import pytest
import torch

from fusedvlm.cli import main
from fusedvlm.eval.data import BenchmarkError, load_benchmark
from fusedvlm.eval.runner import EvalConfig, Evaluator, PredictionStore

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
ALL = ["MME.tsv", "POPE.tsv", "HallusionBench.tsv", "MMBench_DEV_EN.tsv", "SEEDBench_IMG.tsv"]


def fx(name):
    return os.path.join(FIX, name)


# ---------------------------------------------------------------------- reading
@pytest.mark.parametrize(
    "name, kind, items, images",
    [
        ("MME.tsv", "mme", 8, 4),
        ("POPE.tsv", "pope", 6, 3),
        ("HallusionBench.tsv", "hallusionbench", 5, 4),
        ("MMBench_DEV_EN.tsv", "mcq", 4, 3),
        ("SEEDBench_IMG.tsv", "mcq", 2, 2),
    ],
)
def test_fixtures_load(name, kind, items, images):
    b = load_benchmark(fx(name))
    assert (b.kind, len(b.items), len(b.images), b.problems) == (kind, items, images, [])
    assert b.open_image(b.items[0].image_key).size[0] == 64


def test_shared_images_and_prompts():
    mme = load_benchmark(fx("MME.tsv"))
    # The pair's second row names the first row's index as its image: one image, one prefix.
    assert mme.items[0].image_key == mme.items[1].image_key != mme.items[2].image_key
    assert mme.items[0].prompt == mme.items[0].question  # already asks for yes or no
    pope = load_benchmark(fx("POPE.tsv"))
    assert pope.items[0].prompt == "Is there a cat in the image? Please answer yes or no."
    assert pope.items[2].fields["split"] == "popular"
    mmb = load_benchmark(fx("MMBench_DEV_EN.tsv"))
    assert mmb.items[1].prompt.startswith(
        "Hint: The drink is hot.\nQuestion: What is in the cup?\nOptions:\nA. juice\nB. coffee"
    )
    assert "Hint" not in mmb.items[0].prompt and mmb.items[3].answer == "D"
    hb = load_benchmark(fx("HallusionBench.tsv"))
    assert hb.items[1].fields == {"set_id": "0", "figure_id": "1", "question_id": "0", "l2-category": "illusion"}


def test_malformed_rows_reported_by_index():
    b = load_benchmark(fx("POPE_malformed.tsv"))
    assert [it.index for it in b.items] == ["0", "6"]
    msgs = {p.index: p.message for p in b.problems}
    assert sorted(msgs) == ["1", "2", "3", "4", "5"]
    assert "no image" in msgs["1"]
    assert "bad base64" in msgs["2"]
    assert "'Maybe' is not Yes or No" in msgs["3"]
    assert "empty 'question'" in msgs["4"]
    assert "not a readable image" in msgs["5"]
    assert b.problems[0].describe(b.path).endswith("POPE_malformed.tsv:3: index 1: no image ('image' is empty)")


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_file_level_errors(tmp_path):
    pope = load_benchmark(fx("POPE.tsv"))
    img = pope.images[pope.items[0].image_key][1]
    no_answer = _write(tmp_path / "POPE.tsv", ["index", "question", "label", "image"], [["0", "Is it?", "Yes", img]])
    with pytest.raises(BenchmarkError, match=r"POPE.tsv: missing column\(s\) answer"):
        load_benchmark(no_answer)
    odd = _write(tmp_path / "mystery.tsv", ["index", "question", "answer", "image"], [["0", "Is it?", "Yes", img]])
    with pytest.raises(BenchmarkError, match="cannot tell the benchmark kind"):
        load_benchmark(odd)
    assert load_benchmark(f"pope={odd}").kind == "pope"
    with pytest.raises(BenchmarkError, match="unknown kind 'vqa'"):
        load_benchmark(f"vqa={odd}")
    with pytest.raises(FileNotFoundError):
        load_benchmark(str(tmp_path / "absent.tsv"))


def test_hallusion_keys_from_index_and_image_paths(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    path = _write(
        tmp_path / "HallusionBench.tsv",
        ["index", "question", "answer", "category", "l2-category", "image_path"],
        [
            ["VD_figure_0_3_1_2", "Is it red?", "yes", "VD", "figure", "red.png"],
            ["VD_figure_7", "Is it blue?", "No", "VD", "figure", "red.png"],
            ["VD_figure_0_3_1_3", "Is it blue?", "No", "VD", "figure", "missing.png"],
        ],
    )
    b = load_benchmark(path)
    assert b.items[0].fields == {"set_id": "3", "figure_id": "1", "question_id": "2", "l2-category": "figure"}
    assert b.items[0].answer == "Yes" and b.open_image(b.items[0].image_key).size == (40, 30)
    assert [p.index for p in b.problems] == ["VD_figure_7", "VD_figure_0_3_1_3"]
    assert "fields 3-5" in b.problems[0].message and "image file not found" in b.problems[1].message


# ---------------------------------------------------------------------- shared prefix == recompute
def test_shared_prefix_equals_recompute(tiny_model):
    bench = load_benchmark(fx("MME.tsv"))
    keys = list(bench.images)[:3]
    images = [bench.open_image(k) for k in keys]
    prompts = [[it.prompt for it in bench.items if it.image_key == k] for k in keys]
    n_ls = [[[16, 4, 1], [1, 16]], [[4], [16, 1]], [[16], [4]]]
    # A small budget splits the packed question groups over several forwards.
    shared = Evaluator(tiny_model, EvalConfig(n_l=(16, 4, 1), max_fusion_tokens=200)).fused_tokens(
        images, prompts, n_ls
    )
    scratch = Evaluator(tiny_model, EvalConfig(n_l=(16, 4, 1), shared_prefix=False)).fused_tokens(images, prompts, n_ls)
    for i in range(3):
        for j in range(2):
            assert sorted(shared[i][j]) == sorted(n_ls[i][j])
            for n, tokens in shared[i][j].items():
                assert tokens.shape == (n, tiny_model.llm.get_input_embeddings().weight.shape[1])
                torch.testing.assert_close(tokens, scratch[i][j][n], atol=2e-5, rtol=1e-4)


def test_predictions_equal_recompute(tiny_model, tmp_path):
    benches = [load_benchmark(fx(n)) for n in ("MME.tsv", "MMBench_DEV_EN.tsv")]
    out = {}
    for shared in (True, False):
        # Shared prefix with batched answers vs everything from scratch, one prompt at a time.
        cfg = EvalConfig(n_l=(16, 2), shared_prefix=shared, images_per_batch=3, llm_batch_size=5 if shared else 1)
        ev = Evaluator(tiny_model, cfg)
        for b in benches:
            store = PredictionStore(str(tmp_path / f"{shared}-{b.name}.jsonl"))
            ev.run(b, store)
            out[(shared, b.name)] = store.records
    for b in benches:
        assert len(out[(True, b.name)]) == 2 * len(b.items)
        assert out[(True, b.name)] == out[(False, b.name)]


# ---------------------------------------------------------------------- resume
class _Interrupt:
    def __init__(self, after):
        self.after, self.n = after, 0

    def update(self, k):
        self.n += k
        if self.n >= self.after:
            raise KeyboardInterrupt


def test_resume_after_interrupt_and_torn_line(tiny_model, tmp_path):
    bench = load_benchmark(fx("POPE.tsv"))
    cfg = EvalConfig(n_l=(8, 1), images_per_batch=1)
    full = PredictionStore(str(tmp_path / "full.jsonl"))
    Evaluator(tiny_model, cfg).run(bench, full)

    path = str(tmp_path / "part.jsonl")
    with pytest.raises(KeyboardInterrupt):
        Evaluator(tiny_model, cfg).run(bench, PredictionStore(path), progress=_Interrupt(after=6))
    with open(path) as f:
        saved = f.read().splitlines()
    assert 0 < len(saved) < 12  # whole image batches were saved before the interrupt
    with open(path, "a") as f:
        f.write('{"index": "5", "n_l": 8, "predic')  # a write torn by a crash
    store = PredictionStore(path)
    assert len(store.records) == len(saved)
    ev = Evaluator(tiny_model, cfg)
    ev.run(bench, store)
    assert ev.stats.items_done == 12 - len(saved)
    assert store.records == full.records
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 12 and len({(r["index"], r["n_l"]) for r in lines}) == 12

    with open(path, "a") as f:
        f.write("not json\n{}\n")
    with pytest.raises(BenchmarkError, match=r"part.jsonl:13: corrupt prediction line"):
        PredictionStore(path)


def test_config_errors(tiny_model):
    with pytest.raises(ValueError, match="repeated"):
        EvalConfig(n_l=(4, 4))
    with pytest.raises(ValueError, match="n_l=128 needs 127 query tokens"):
        Evaluator(tiny_model, EvalConfig(n_l=(128,)))


# ---------------------------------------------------------------------- CLI
def test_cli_four_formats_end_to_end(tmp_path, capsys):
    from fusedvlm.analysis.cli import read_scaling_csv

    out = str(tmp_path / "out")
    args = ["eval", "--preset", "tiny", "--n-l", "16,4,1", "--out", out, "--no-progress"]
    for name in ALL:
        args += ["--benchmark", fx(name)]
    assert main(args) == 0
    with open(os.path.join(out, "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    groups = {r["group"] for r in rows}
    assert groups == {
        "MME/perception",
        "MME/cognition",
        "POPE/acc",
        "POPE/f1",
        "HallusionBench/aAcc",
        "HallusionBench/fAcc",
        "HallusionBench/qAcc",
        "MMBench_DEV_EN/acc",
        "MMBench_DEV_EN/circular_acc",
        "SEEDBench_IMG/acc",
    }
    assert sorted({int(r["n"]) for r in rows}) == [1, 4, 16]
    assert set(read_scaling_csv(os.path.join(out, "scores.csv"))) == groups
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["benchmarks"]["POPE"]["per_n"]["16"]["metrics"].keys() >= {
        "Overall",
        "random",
        "popular",
        "adversarial",
    }
    assert os.path.getsize(os.path.join(out, "scores.png")) > 0
    assert "| MME/perception |" in open(os.path.join(out, "scores.md")).read()
    with open(os.path.join(out, "MMBench_DEV_EN", "scored.jsonl")) as f:
        scored = [json.loads(line) for line in f]
    assert len(scored) == 12 and scored[0].keys() == {"index", "n_l", "prediction", "extracted", "answer", "correct"}

    # A second run finds everything done; more n_l only computes the new ones.
    capsys.readouterr()
    assert main(args[:4] + ["16,2"] + args[5:]) == 0
    assert capsys.readouterr().out.startswith("25 (item, n_l) predictions")  # the 25 items at n_l=2 only
    assert main(["eval", "--preset", "small", "--out", out, "--benchmark", fx("POPE.tsv")]) == 2
    assert "holds predictions of another run" in capsys.readouterr().err


def test_cli_malformed_rows(tmp_path, capsys):
    out = str(tmp_path / "out")
    args = [
        "eval",
        "--preset",
        "tiny",
        "--n-l",
        "4",
        "--out",
        out,
        "--no-progress",
        "--no-plot",
        "--benchmark",
        fx("POPE_malformed.tsv"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "5 malformed row(s)" in err and "POPE_malformed.tsv:4: index 2: bad base64" in err
    assert main(args + ["--on-error", "skip"]) == 0
    with open(os.path.join(out, "skipped.jsonl")) as f:
        skipped = [json.loads(line) for line in f]
    assert [s["index"] for s in skipped] == ["1", "2", "3", "4", "5"]
    with open(os.path.join(out, "POPE_malformed", "predictions.jsonl")) as f:
        assert sorted(json.loads(line)["index"] for line in f) == ["0", "6"]
    assert "5 item(s) skipped" in open(os.path.join(out, "scores.md")).read()


def test_fuse_single_errors(tiny_model):
    pope = load_benchmark(fx("POPE.tsv"))
    cache = tiny_model.prefix_cache(tiny_model.encode_images([pope.open_image(pope.items[0].image_key)]))
    q = tiny_model.question_ids("Is it?")
    with pytest.raises(ValueError, match="one sample, question and n_l per entry"):
        tiny_model.fuse_single(cache, [0, 0], [q], [4])
    with pytest.raises(ValueError, match="sample 1 is not in the cache of 1 samples"):
        tiny_model.fuse_single(cache, [1], [q], [4])
    with pytest.raises(ValueError, match="n_l=65 needs 64 query tokens"):
        tiny_model.fuse_single(cache, [0], [q], [65])


def test_greedy_batch_matches_one_at_a_time_and_stops_at_eos(tiny_model):
    from fusedvlm.eval.generate import greedy_batch
    from fusedvlm.generation import GenerationConfig, decode, prefill

    llm = tiny_model.llm
    torch.manual_seed(1)
    width = llm.get_input_embeddings().weight.shape[1]
    embeds = [torch.randn(n, width) * 0.5 for n in (7, 3, 12, 3)]
    gen = GenerationConfig(max_new_tokens=6)
    alone = [decode(llm, prefill(llm, e), gen, set()).ids for e in embeds]
    assert greedy_batch(llm, embeds, 6, eos_id=-1) == alone
    eos = alone[2][1]  # the third prompt's second token ends it (and any other answer reaching it)
    cut = [a[: a.index(eos) + 1] if eos in a else a for a in alone]
    assert greedy_batch(llm, embeds, 6, eos_id=eos) == cut
    assert len(cut[2]) == 2


def test_run_meta_set_on_one_side_only_is_a_difference(tmp_path):
    # --llm-dtype / --llm-quant are recorded only when given, so that earlier run.json files match.
    from fusedvlm.eval.cli import _check_run_meta

    meta = {"model": "preset:tiny", "dtype": "float32", "n_l": [4]}
    _check_run_meta(str(tmp_path), meta)
    _check_run_meta(str(tmp_path), {**meta, "n_l": [2]})
    with pytest.raises(ValueError, match=r"llm_quant: None -> 'int8'"):
        _check_run_meta(str(tmp_path), {**meta, "llm_quant": "int8"})
