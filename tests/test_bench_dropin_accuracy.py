"""bench/bench_dropin_accuracy.py at --scale tiny: the table's structure, and the shortcuts the
real run takes (cached vision, right padding, answer-only logits, the layer-by-layer FastV pass)
checked against the adapter's and the host's own forward passes. The tiny run's accuracies mean
nothing (a random 2-layer LLM, two steps), so none is asserted."""

import dataclasses
import json

import pytest
import torch

from bench import bench_dropin_accuracy as acc

TINY = ["--scale", "tiny", "--fastv-k", "1", "--quiet"]


def test_tiny_run_writes_the_table(tmp_path):
    assert acc.main([*TINY, "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "accuracy.json").read_text())
    assert result["partial"] is False and result["native_tokens"] == 4
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["native, untrained", "native", "fusion 2", "fusion 4", "fastv 2", "visionzip 2"]
    assert [r["visual"] for r in rows.values()] == [4, 4, 2, 4, 2, 2]
    held_out = acc.SCALES["tiny"].eval_images
    for r in rows.values():
        assert r["colour"]["n"] == r["position"]["n"] == held_out and r["overall"]["n"] == 2 * held_out
        assert r["overall"]["correct"] == r["colour"]["correct"] + r["position"]["correct"]
        for kind in ("colour", "position", "overall"):
            lo, hi = r[kind]["ci95"]
            assert 0 <= lo <= r[kind]["acc"] <= hi <= 1
    assert set(result["curves"]) == {"native", "fusion 2", "fusion 4"}
    assert all(len(c) == acc.SCALES["tiny"].steps for c in result["curves"].values())
    table = (tmp_path / "accuracy.md").read_text()
    assert "| fastv 2 | 2 |" in table and "bench_dropin_accuracy.py --scale tiny" in table
    assert result["machine"]["cores"] >= 1


def test_wilson_interval():
    assert acc.wilson(0, 10)[0] == 0 and acc.wilson(10, 10)[1] == pytest.approx(1)
    lo, hi = acc.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


@pytest.fixture(scope="module")
def run():
    return acc.Run(acc.parse_args([*TINY, "--eval-images", "3"]))


def _native_rows(run, n):
    """The first n held-out prompts with the native connector's tokens: ids, labels, embeddings."""
    items = run.eval_items[:n]
    ids, labels = acc.prompt_rows(run.layout, run.image_id, items, run.native)
    embeds = acc.scatter(
        run.host, ids, run.image_id, acc.connector_tokens(run.host, run.eval_images, [i for i, *_ in items])
    )
    return ids, labels, embeds


def test_answer_scores_match_the_hosts_loss(run):
    ids, labels, embeds = _native_rows(run, 4)
    with torch.no_grad():
        loss, exact = acc.answer_scores(run.host, acc.llm_hidden(run.host, embeds), labels)
        # Right padding, no mask: every real token precedes the padding, so causality suffices.
        reference = run.host(inputs_embeds=embeds, labels=labels).loss
        logits = run.host(inputs_embeds=embeds).logits
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    predicted = logits[:, :-1].argmax(-1)
    where = labels[:, 1:] != -100
    assert exact.tolist() == [bool((predicted[r][where[r]] == labels[r, 1:][where[r]]).all()) for r in range(4)]


def test_fastv_keeping_every_token_is_the_plain_forward(run):
    ids, labels, embeds = _native_rows(run, 3)
    with torch.no_grad():
        hidden, kept = acc.fastv_hidden(run.host, embeds, labels, ids == run.image_id, run.native, 1)
        plain = acc.llm_hidden(run.host, embeds)
    assert torch.equal(kept, labels)
    torch.testing.assert_close(hidden, plain, rtol=1e-5, atol=1e-5)


def test_fusion_with_cached_vision_equals_the_adapters_own_forward(run):
    adapter = run.attach(2)
    items = run.eval_items[:3]
    idx = [i for i, *_ in items]
    with torch.no_grad():
        features = acc.connector_tokens(run.host, run.eval_images, slice(None))
        loss, _ = run.fusion_pass(adapter, features, run.eval_images, items, 2)
        inputs = adapter.prepare_inputs(
            run.tok,
            [[(q, a)] for _, _, q, a in items],
            pixel_values=run.eval_images.pixel_values[idx],
            pixel_attention_mask=run.eval_images.pixel_attention_mask[idx],
            n_l=2,
        )
        reference = adapter(**inputs).loss  # the host's vision path, left padding, the host's loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_each_row_trains_at_its_own_lr(run, monkeypatch):
    """The first runs trained the fusion module at the native connector's lr (4e-3), where its
    residual stream blows up and the image's share of the fused tokens falls to noise: every
    fusion row scored one answer per question type. The fusion rows train at fusion_lr."""
    peaks = {}
    train = acc.Run.train

    def spy(self, name, params, loss_fn, peak_lr):
        peaks[name] = peak_lr
        return train(self, name, params, loss_fn, peak_lr)

    monkeypatch.setattr(acc.Run, "train", spy)
    scale, batches = run.scale, run.batches
    run.scale = dataclasses.replace(scale, lr=4e-3, fusion_lr=3e-4, steps=1, budgets=(2,))
    run.batches = batches[:1]
    connector = {k: v.clone() for k, v in run.host.model.connector.state_dict().items()}
    try:
        result = run.run()
    finally:
        run.scale, run.batches = scale, batches
        run.host.model.connector.load_state_dict(connector)  # the module-scoped host stays untrained
    assert peaks == {"native": 4e-3, "fusion 2": 3e-4}
    assert set(result["image_shares"]) == {"fusion 2"}


def test_image_share_is_zero_when_every_image_gives_the_same_features(run):
    adapter = run.attach(2)
    with torch.no_grad():
        features = acc.connector_tokens(run.host, run.eval_images, slice(None))
    assert run.image_share(adapter, features, 2) > 0.01
    same = features[:1].expand_as(features).contiguous()
    assert run.image_share(adapter, same, 2) < 1e-5
