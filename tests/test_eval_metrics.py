"""Answer extraction and benchmark metrics against hand-computed values."""

import pytest

from fusedvlm.eval.data import Item
from fusedvlm.eval.metrics import (
    Scored,
    extract_option,
    extract_yes_no,
    hallusion_metrics,
    mcq_metrics,
    mme_metrics,
    pope_metrics,
    score_item,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a cat.", "Yes"),
        ("No.", "No"),
        ("NO!", "No"),
        ("yes and no", "Unknown"),
        ("Yesterday it rained", "Unknown"),
        ("I cannot tell", "Unknown"),
        ("The answer: yes", "Yes"),
        ("", "Unknown"),
    ],
)
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text) == expected


OPTS = {"A": "cat", "B": "coffee", "C": "rocket", "D": "a dog"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("The answer is (C).", "C"),
        ("A cat", "A"),
        ("I think B or C", None),
        ("coffee", "B"),
        ("Cat", "A"),
        ("a rocket and a dog", None),
        ("nothing matches", None),
        ("D. a dog", "D"),
    ],
)
def test_extract_option(text, expected):
    assert extract_option(text, OPTS) == expected


def _yn(index, answer, extracted, category="", **fields):
    item = Item(index, "img", "q", "q", answer, category, fields)
    return Scored(item, extracted, extracted == answer)


def test_mme_acc_plus_and_super_categories():
    scored = [
        _yn("0", "Yes", "Yes", "existence", image_path="a"),
        _yn("1", "No", "No", "existence", image_path="a"),
        _yn("2", "Yes", "Yes", "existence", image_path="b"),
        _yn("3", "No", "Yes", "existence", image_path="b"),
        _yn("4", "Yes", "No", "color", image_path="c"),
        _yn("5", "No", "Unknown", "color", image_path="c"),
        _yn("6", "Yes", "Yes", "code_reasoning", image_path="d"),
        _yn("7", "No", "No", "code_reasoning", image_path="d"),
    ]
    m = mme_metrics(scored)
    assert m["existence"] == {"acc": 75.0, "acc+": 50.0, "score": 125.0}
    assert m["color"] == {"acc": 0.0, "acc+": 0.0, "score": 0.0}
    assert m["code_reasoning"]["score"] == 200.0
    assert m["Overall"]["perception"] == 125.0 and m["Overall"]["cognition"] == 200.0
    assert m["Overall"]["perception_categories"] == 2 and m["Overall"]["cognition_categories"] == 1


def test_pope_per_split():
    scored = [
        _yn("0", "Yes", "Yes", split="random"),
        _yn("1", "Yes", "No", split="random"),
        _yn("2", "No", "Yes", split="random"),
        _yn("3", "No", "No", split="popular"),
        _yn("4", "No", "Unknown", split="popular"),
    ]
    m = pope_metrics(scored)
    o = m["Overall"]
    assert (o["acc"], o["precision"], o["recall"], o["f1"], o["yes_ratio"], o["unknown"]) == (
        40.0,
        50.0,
        50.0,
        50.0,
        40.0,
        20.0,
    )
    assert m["random"]["f1"] == 50.0 and m["random"]["acc"] == pytest.approx(100 / 3)
    assert m["random"]["yes_ratio"] == pytest.approx(200 / 3)
    assert (m["popular"]["acc"], m["popular"]["f1"], m["popular"]["yes_ratio"]) == (50.0, 0.0, 0.0)


def test_pope_comma_separated_splits_count_in_each():
    m = pope_metrics([_yn("0", "Yes", "Yes", split="random,popular"), _yn("1", "No", "Yes", split="popular")])
    assert m["random"]["acc"] == 100.0 and m["popular"]["acc"] == 50.0 and m["Overall"]["acc"] == 50.0


def test_hallusion_figure_and_question_accuracy():
    def h(i, l2, s, f, q, ok, cat="VD"):
        return _yn(
            i, "Yes", "Yes" if ok else "No", cat, **{"l2-category": l2, "set_id": s, "figure_id": f, "question_id": q}
        )

    scored = [
        h("0", "a", "0", "0", "0", True),
        h("1", "a", "0", "1", "0", False),
        h("2", "a", "0", "0", "1", True),
        h("3", "b", "1", "0", "0", True, "VS"),
        h("4", "b", "1", "1", "0", True, "VS"),
    ]
    m = hallusion_metrics(scored)
    assert m["Overall"]["aAcc"] == 80.0
    assert m["Overall"]["fAcc"] == 75.0  # figures (a,0,0) ok, (a,0,1) wrong, (b,1,0) ok, (b,1,1) ok
    assert m["Overall"]["qAcc"] == pytest.approx(200 / 3)  # questions (a,0,0) wrong, (a,0,1) ok, (b,1,0) ok
    assert m["VS"] == {"aAcc": 100.0, "fAcc": 100.0, "qAcc": 100.0}
    assert m["a"]["aAcc"] == pytest.approx(200 / 3)


def test_mcq_accuracy_and_circular():
    def mc(i, answer, text, cat):
        return score_item(Item(i, "img", "q", "q", answer, cat, {"l2-category": ""}, OPTS), text, yes_no=False)

    scored = [
        mc("0", "A", "A", "x"),
        mc("1000000", "B", "C", "x"),
        mc("1", "B", "coffee", "y"),
        mc("2", "C", "B or C", "y"),
    ]
    m = mcq_metrics(scored)
    assert m["Overall"]["acc"] == 50.0
    assert m["Overall"]["unmatched"] == 25.0
    # groups: 0 -> [right, wrong], 1 -> [right], 2 -> [unmatched]
    assert m["Overall"]["circular_acc"] == pytest.approx(100 / 3)
    assert m["x"]["acc"] == 50.0 and m["y"]["acc"] == 50.0
    assert "circular_acc" not in mcq_metrics(scored[:1])["Overall"]
