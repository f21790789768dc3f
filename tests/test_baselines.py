"""FastV and VisionZip token selection (fusedvlm.adapters.baselines)."""

import pytest
import torch

from fusedvlm.adapters.baselines import attention_received, fastv_keep, visionzip


def test_fastv_keeps_the_image_tokens_that_receive_the_most_attention():
    torch.manual_seed(0)
    length, heads = 12, 3
    image = torch.zeros(length, dtype=torch.bool)
    image[2:9] = True
    logits = torch.randn(heads, length, length)
    logits[:, :, 6] += 4.0  # image tokens 6 and 3 draw most attention, text token 10 more still
    logits[:, :, 3] += 3.0
    logits[:, :, 10] += 8.0
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attention = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    assert fastv_keep(attention, image, 2).tolist() == [3, 6]
    kept = fastv_keep(attention[0], image, 7)  # every image token, in order
    assert kept.tolist() == list(range(2, 9))
    with pytest.raises(ValueError, match="budget 8 exceeds the 7 image tokens"):
        fastv_keep(attention, image, 8)
    with pytest.raises(ValueError, match="image_mask must be a \\(12,\\) bool tensor"):
        fastv_keep(attention, image.long(), 2)


def test_visionzip_keeps_dominant_tokens_and_averages_the_rest_into_contextual_ones():
    # Two clusters of non-dominant tokens around +e0 and +e1; tokens 0 and 5 dominate.
    tokens = torch.tensor(
        [
            [9.0, 9.0],
            [1.0, 0.1],
            [1.0, 0.2],
            [1.0, 0.0],
            [0.1, 1.0],
            [-9.0, 9.0],
            [0.2, 1.0],
            [0.0, 1.0],
        ]
    )
    scores = torch.tensor([5.0, 0, 0, 0, 0, 4.0, 0, 0])
    out = visionzip(tokens, scores, budget=4, contextual=2)
    assert out.shape == (4, 2)
    torch.testing.assert_close(out[:2], tokens[[0, 5]])
    # The rest, [1, 2, 3, 4, 6, 7], gets targets 1 and 4 (every third); each cluster joins its own target.
    torch.testing.assert_close(out[2], tokens[[1, 2, 3]].mean(0))
    torch.testing.assert_close(out[3], tokens[[4, 6, 7]].mean(0))
    # The default split is VisionZip's 10 contextual in 64; the whole budget is every token unchanged.
    assert visionzip(torch.randn(100, 4), torch.randn(100), 64).shape == (64, 4)
    x = torch.randn(10, 3)
    assert torch.equal(visionzip(x, torch.randn(10), 10), x)
    assert torch.equal(visionzip(x, torch.arange(10.0), 3, contextual=0), x[7:])
    with pytest.raises(ValueError, match="budget 11 exceeds the 10 tokens"):
        visionzip(x, torch.randn(10), 11)
    with pytest.raises(ValueError, match="contextual must be in"):
        visionzip(x, torch.randn(10), 3, contextual=3)


def test_attention_received_sums_to_one_and_favours_tokens_aligned_with_many():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [0.0, 0.3]]) * 4
    r = attention_received(x)
    torch.testing.assert_close(r.sum(), torch.tensor(1.0))
    assert r[3] < r[:3].min()
