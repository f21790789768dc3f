import json
import os

import pytest

from fusedvlm.chat import IGNORE_INDEX, ChatLayout
from fusedvlm.model.llm import byte_tokenizer
from fusedvlm.train.data import (
    Collator,
    ConversationDataset,
    DataError,
    ResumableBatchSampler,
    SampleEncoder,
    read_records,
)
from fusedvlm.train.synthetic import candidate_answers, write_dataset

TPV = 17  # tiny preset: 7x7 patches -> 4x4 merged + LF


@pytest.fixture(scope="module")
def shapes(module_tmp):
    root = module_tmp("shapes")
    path = write_dataset(str(root), 6, seed=3, size=64)
    return str(root), path


def encoder(stage=2, n_l=4, n_s=2, drop_question=False):
    layout = ChatLayout("llama2", byte_tokenizer(), "") if stage == 2 else None
    return SampleEncoder(
        stage,
        hd_num=1,
        view_size=112,
        n_l=n_l,
        n_s=n_s,
        drop_question=drop_question,
        max_question_tokens=32,
        layout=layout,
    )


def write_jsonl(path, objs_or_lines):
    with open(path, "w") as f:
        for o in objs_or_lines:
            f.write((o if isinstance(o, str) else json.dumps(o)) + "\n")


def test_llava_records_multi_turn_and_tags(shapes, tmp_path):
    root, _ = shapes
    img = os.path.join(root, "images", "data-000000.png")
    objs = [
        {
            "image": img,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A shape."},
                {"from": "human", "value": "Colour? <image>"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "image": "images/data-000001.png",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "Where?"},
                {"role": "assistant", "content": "left"},
            ],
        },
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(objs))
    records, problems = read_records(str(path), root)
    assert problems == []
    assert records[0].turns == (("What is it?", "A shape."), ("Colour?", "red"))
    assert records[1].turns == (("Where?", "left"),)
    assert records[1].image == os.path.join(root, "images/data-000001.png")
    assert [r.index for r in records] == [0, 1]


BAD = [
    ("not json {", "not valid JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "no 'image'"),
    (
        {"image": "images/nope.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "image not found",
    ),
    (
        {"image": "images/data-000000.png", "conversations": [{"from": "gpt", "value": "a"}]},
        "answer without a question",
    ),
    ({"image": "images/data-000000.png", "conversations": [{"from": "human", "value": "q"}]}, "no answer"),
    (
        {
            "image": "images/data-000000.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
        },
        "empty question",
    ),
    ({"image": "images/data-000000.png", "conversations": [{"from": "bot", "value": "q"}]}, "unknown role"),
    ({"image": "images/data-000000.png"}, "no 'conversations'"),
]


@pytest.mark.parametrize("bad,reason", BAD)
def test_malformed_records_are_reported_with_their_index(shapes, tmp_path, bad, reason, caplog):
    root, good_path = shapes
    good = [json.loads(line) for line in open(good_path)][:2]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [good[0], bad, good[1]])
    records, problems = read_records(str(path), root, on_error="skip")
    assert [r.index for r in records] == [0, 2]
    assert len(problems) == 1 and problems[0].index == 1 and reason in str(problems[0])
    assert "record 1" in caplog.text and reason in caplog.text
    with pytest.raises(DataError, match=f"record 1: .*{reason}"):
        read_records(str(path), root, on_error="raise")


def test_corrupt_image_is_skipped_with_index_or_raises(shapes, tmp_path):
    root, good_path = shapes
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"\x89PNG not really")
    objs = [json.loads(line) for line in open(good_path)][:3]
    objs[1]["image"] = str(bad_image)
    path = tmp_path / "d.jsonl"
    write_jsonl(path, objs)
    records, _ = read_records(str(path), root)
    enc = encoder()
    ds = ConversationDataset(records, enc, on_error="skip")
    batch = Collator(enc, TPV)([ds[i] for i in range(3)])
    assert batch.indices == [0, 2]
    assert [s.index for s in batch.skipped] == [1] and "bad image" in batch.skipped[0].reason
    with pytest.raises(DataError, match="record 1: bad image"):
        ConversationDataset(records, enc, on_error="raise")[1]


@pytest.mark.parametrize("drop_question", [False, True])
def test_collator_packs_fusion_streams_and_labels_answers(shapes, drop_question):
    root, path = shapes
    records, _ = read_records(path, root)
    enc = encoder(n_l=4, n_s=2, drop_question=drop_question)
    items = [ConversationDataset(records, enc)[i] for i in range(3)]
    batch = Collator(enc, TPV)(items)
    from fusedvlm.clip_text import clip_tokenizer

    want = []
    for it in items:
        # Without a system prompt the authors' first question piece is "[INST] {q}".
        qlen = [
            0 if drop_question else len(clip_tokenizer().encode(enc.layout.fusion_text(q, j == 0)))
            for j, (q, _) in enumerate(it.turns)
        ]
        want.append(it.views.shape[0] * TPV + qlen[0] + 4 + sum(q + 2 for q in qlen[1:]))
    assert batch.fusion_cu_seqlens.diff().tolist() == want  # packed: no padding
    assert batch.views.shape[0] == sum(batch.num_views)
    tok = byte_tokenizer()
    for i, it in enumerate(items):
        labelled = batch.llm_labels[i][batch.llm_labels[i] != IGNORE_INDEX].tolist()
        want_ids = []
        for _, a in it.turns:
            want_ids += tok(f"{a} </s>", add_special_tokens=False).input_ids  # the authors' answer piece
        assert labelled == want_ids  # answers and their closing EOS, nothing else
        assert int(batch.llm_fused[i].sum()) == 4 + 2 * (len(it.turns) - 1)
    assert batch.num_targets == int((batch.llm_labels[:, 1:] != IGNORE_INDEX).sum())
    assert batch.llm_attention_mask.sum(1).tolist() == [len(it.llm) for it in items]


def test_stage1_answers_are_clip_tokenized(shapes):
    root, path = shapes
    records, _ = read_records(path, root)
    enc = encoder(stage=1)
    items = [ConversationDataset(records, enc)[i] for i in range(2)]
    batch = Collator(enc, TPV)(items)
    assert batch.answer_ids.shape[0] == sum(len(it.turns) for it in items)
    assert batch.num_targets == batch.answer_ids.shape[0]  # one target per (question group, answer) pair
    assert (batch.answer_ids[:, 0] == 49406).all()
    assert (batch.answer_ids.max(1).values == 49407).all()  # EOT, where the text tower pools


def test_sampler_ranks_partition_global_batches_and_resume_continues():
    single = iter(ResumableBatchSampler(10, 4, seed=5))
    ranks = [iter(ResumableBatchSampler(10, 4, seed=5, rank=r, world=2)) for r in range(2)]
    seen = []
    for _ in range(5):  # crosses two epoch boundaries (2 batches per epoch, tail dropped)
        whole = next(single)
        parts = [next(r) for r in ranks]
        assert parts[0] + parts[1] == whole and len(parts[0]) == 2
        seen.append(whole)
    assert seen[2] != seen[0]  # each epoch has its own order
    resumed = iter(ResumableBatchSampler(10, 4, seed=5, start=3))
    assert [next(resumed) for _ in range(2)] == seen[3:5]
    with pytest.raises(ValueError, match="multiple of the world size"):
        ResumableBatchSampler(10, 3, world=2)
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        ResumableBatchSampler(3, 4)


def test_synthetic_answers_are_closed_sets(shapes):
    root, path = shapes
    for line in open(path):
        conv = json.loads(line)["conversations"]
        assert len(conv) == 4
        for q, a in zip(conv[::2], conv[1::2]):
            question = q["value"].replace("<image>\n", "")
            assert a["value"] in candidate_answers(question)
    with pytest.raises(ValueError):
        candidate_answers("How old is the cat?")
