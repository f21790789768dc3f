"""pytest-benchmark tests of every kernel at small shapes (the torch path on CPU, Triton on
CUDA). ``make test`` runs each once with --benchmark-disable (a smoke test);
``make bench-regress`` times them and compares against a saved baseline."""

from __future__ import annotations

import importlib

import pytest
import torch

from fusedvlm.packing import cu_seqlens_from_lengths
from fusedvlm.timing import sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel(name: str):
    """The public functional, or a skip naming why it is missing."""
    try:
        return getattr(importlib.import_module("fusedvlm.kernels"), name)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"fusedvlm.kernels.{name} is unavailable: {e}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A 10-view image of the smol preset's shapes: 16x16 patch grid per view, width 256.
MERGE_SHAPE = (10, 16, 256)


def test_local_merge_forward(benchmark):
    local_merge = _kernel("local_merge")
    v, g, c = MERGE_SHAPE
    x = torch.randn(v, g * g, c, device=DEVICE)
    w = torch.randn(c, c, 3, 3, device=DEVICE) * 0.02
    lf = torch.randn(c, device=DEVICE)

    def run():
        with torch.no_grad():
            y = local_merge(x, w, lf)
        sync(DEVICE)
        return y

    y = benchmark(run)
    assert y.shape == (v, (g // 2) ** 2 + 1, c) and torch.isfinite(y).all()


def test_local_merge_forward_backward(benchmark):
    local_merge = _kernel("local_merge")
    v, g, c = MERGE_SHAPE
    x = torch.randn(v, g * g, c, device=DEVICE, requires_grad=True)
    w = (torch.randn(c, c, 3, 3, device=DEVICE) * 0.02).requires_grad_()
    lf = torch.randn(c, device=DEVICE, requires_grad=True)

    def run():
        x.grad = w.grad = lf.grad = None
        local_merge(x, w, lf).square().sum().backward()
        sync(DEVICE)

    benchmark(run)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, w, lf))


# Two images' fusion streams plus a 1-token segment; heads and width of the smol fusion decoder.
ATTN_LENS, ATTN_HEADS, ATTN_DIM = [725 + 40, 435 + 300, 1], 4, 64


def _attention_inputs(requires_grad: bool):
    t = sum(ATTN_LENS)
    q, k, v = (torch.randn(t, ATTN_HEADS, ATTN_DIM, device=DEVICE, requires_grad=requires_grad) for _ in range(3))
    return q, k, v, cu_seqlens_from_lengths(ATTN_LENS, device=DEVICE)


def test_packed_attention_forward(benchmark):
    packed_attention = _kernel("packed_attention")
    q, k, v, cu = _attention_inputs(False)

    def run():
        o = packed_attention(q, k, v, cu, cu, causal=True)
        sync(DEVICE)
        return o

    o = benchmark(run)
    assert o.shape == q.shape and torch.isfinite(o).all()


def test_packed_attention_forward_backward(benchmark):
    packed_attention = _kernel("packed_attention")
    q, k, v, cu = _attention_inputs(True)

    def run():
        q.grad = k.grad = v.grad = None
        packed_attention(q, k, v, cu, cu, causal=True).square().sum().backward()
        sync(DEVICE)

    benchmark(run)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_pairwise_cosine_stats(benchmark):
    pairwise_cosine_stats = _kernel("pairwise_cosine_stats")
    lens, d = [256, 200, 1], 576  # hidden width of SmolLM2-135M
    t = sum(lens)
    h_a, h_b = torch.randn(t, d, device=DEVICE), torch.randn(t, d, device=DEVICE)
    cu = cu_seqlens_from_lengths(lens, device=DEVICE)

    def run():
        s = pairwise_cosine_stats(h_a, h_b, cu)
        sync(DEVICE)
        return s

    stats = benchmark(run)
    assert stats.eq.shape == (t,) and torch.isfinite(stats.div).all()
