import math

import pytest
import torch
import torch.nn.functional as F

from fusedvlm.train.losses import clip_infonce, init_logit_scale, orthogonality_loss, orthogonality_sq_error


def naive_orthogonality(hidden, is_eos, group_sizes):
    z = F.normalize(hidden[~is_eos].double(), dim=-1)
    terms, start = [], 0
    for m in (m for s in group_sizes for m in s):
        n = m - 1
        if n:
            g = z[start : start + n] @ z[start : start + n].t()
            terms.append(((g - torch.eye(n, dtype=torch.float64)) ** 2).mean())
        start += n
    return torch.stack(terms).mean()


def eos_mask(group_sizes):
    return torch.tensor([i == m - 1 for s in group_sizes for m in s for i in range(m)])


@pytest.mark.parametrize("c", [4, 16, 64])
@pytest.mark.parametrize("group_sizes", [[[16, 8, 8]], [[16], [16, 8]], [[1, 1]], [[33, 8], [2]]])
def test_orthogonality_matches_naive_value_and_gradient(c, group_sizes):
    # c = 4 and 16 take the C x C form for the 15- and 32-query groups, c = 64 the n x n form.
    torch.manual_seed(0)
    total = sum(sum(s) for s in group_sizes)
    hidden = torch.randn(total, c, requires_grad=True)
    is_eos = eos_mask(group_sizes)
    if all(m == 1 for s in group_sizes for m in s):
        assert float(orthogonality_loss(hidden, is_eos, group_sizes)) == 0.0
        return
    ours = orthogonality_loss(hidden, is_eos, group_sizes)
    (g_ours,) = torch.autograd.grad(ours, hidden)
    ref = naive_orthogonality(hidden, is_eos, group_sizes)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_orthogonality_forms_agree_and_zero_on_orthonormal_rows():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(3, 40, 8), dim=-1)  # n = 40 > C = 8: the Gram form
    direct = ((z @ z.transpose(1, 2) - torch.eye(40)) ** 2).sum((1, 2))
    torch.testing.assert_close(orthogonality_sq_error(z), direct, rtol=1e-5, atol=1e-4)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert float(orthogonality_sq_error(q[:5])) == pytest.approx(0.0, abs=1e-5)


def test_orthogonality_rejects_inconsistent_groups():
    with pytest.raises(ValueError, match="group sizes"):
        orthogonality_loss(torch.randn(5, 4), torch.zeros(5, dtype=torch.bool), [[4]])
    with pytest.raises(ValueError, match="EOS"):
        orthogonality_loss(torch.randn(4, 4), torch.zeros(4, dtype=torch.bool), [[4]])


def test_clip_infonce_matches_definition():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 5), dim=-1)
    txt = F.normalize(torch.randn(6, 5), dim=-1)
    scale = init_logit_scale(0.07)
    assert float(scale) == pytest.approx(math.log(1 / 0.07))
    logits = (img @ txt.t()) / 0.07
    want = 0
    for i in range(6):
        want += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    assert float(clip_infonce(img, txt, scale)) == pytest.approx(float(want) / 12, rel=1e-5)
    with pytest.raises(ValueError):
        clip_infonce(img, txt[:5], scale)
    with pytest.raises(ValueError):
        init_logit_scale(0.0)
