"""The fusion decoder: packed == each sample alone == Hugging Face LlamaModel; cached == scratch."""

import pytest
import torch

from fusedvlm.config import FusionConfig
from fusedvlm.model.fusion import FusionDecoder
from fusedvlm.packing import cu_seqlens_from_lengths, pack, unpack

CFG = FusionConfig(
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    text_vocab_size=100,
    eos_token_id=99,
    max_queries=20,
)


def _decoder(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return FusionDecoder(cfg).eval()


def test_packed_equals_each_sample_alone():
    dec = _decoder()
    lengths = [5, 1, 0, 23, 12]
    parts = [torch.randn(n, CFG.hidden_size) for n in lengths]
    x, cu = pack(parts)
    with torch.no_grad():
        packed, _ = dec(x, cu)
        for part, out in zip(parts, unpack(packed, cu)):
            alone, _ = dec(part, cu_seqlens_from_lengths([part.shape[0]]))
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_hugging_face_llama(kv_heads):
    from transformers import LlamaConfig, LlamaModel

    cfg = FusionConfig(**{**CFG.__dict__, "num_kv_heads": kv_heads})
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=256,
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(1)
    hf = LlamaModel(hf_cfg).eval()
    ours = FusionDecoder(cfg).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    lengths = [7, 19]
    ids = torch.randint(0, cfg.vocab_size, (sum(lengths),))
    with torch.no_grad():
        packed, _ = ours(ours.embed_tokens(ids), cu_seqlens_from_lengths(lengths))
        start = 0
        for n in lengths:
            ref = hf(input_ids=ids[start : start + n][None]).last_hidden_state[0]
            torch.testing.assert_close(packed[start : start + n], ref, atol=2e-5, rtol=2e-5)
            start += n


def test_cache_appends_equal_from_scratch():
    dec = _decoder()
    prefix_lens, new_lens, more_lens = [6, 3, 0], [4, 0, 5], [2, 3, 1]
    pre = [torch.randn(n, CFG.hidden_size) for n in prefix_lens]
    new = [torch.randn(n, CFG.hidden_size) for n in new_lens]
    more = [torch.randn(n, CFG.hidden_size) for n in more_lens]
    with torch.no_grad():
        x, cu = pack(pre)
        _, cache = dec(x, cu, use_cache=True)
        x, cu_new = pack(new)
        out_new, cache = dec(x, cu_new, cache=cache, use_cache=True)
        x, cu_more = pack(more)
        out_more, cache = dec(x, cu_more, cache=cache, use_cache=True)
        full, cu_full = pack([torch.cat(t) for t in zip(pre, new, more)])
        ref, _ = dec(full, cu_full)
    ref_parts = unpack(ref, cu_full)
    for i, (a, b) in enumerate(zip(prefix_lens, new_lens)):
        torch.testing.assert_close(unpack(out_new, cu_new)[i], ref_parts[i][a : a + b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unpack(out_more, cu_more)[i], ref_parts[i][a + b :], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [a + b + c for a, b, c in zip(prefix_lens, new_lens, more_lens)]


def test_gradients_flow_through_packed_decoder():
    dec = _decoder().train()
    x = torch.randn(9, CFG.hidden_size, requires_grad=True)
    out, _ = dec(x, cu_seqlens_from_lengths([4, 5]))
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for n, p in dec.named_parameters() if not n.startswith("embed_tokens"))


def test_bad_inputs():
    dec = _decoder()
    with pytest.raises(ValueError, match="has 3 tokens"):
        dec(torch.randn(3, CFG.hidden_size), cu_seqlens_from_lengths([2]))
    _, cache = dec(torch.randn(3, CFG.hidden_size), cu_seqlens_from_lengths([3]), use_cache=True)
    with pytest.raises(ValueError, match="cache holds 1 samples"):
        dec(torch.randn(2, CFG.hidden_size), cu_seqlens_from_lengths([1, 1]), cache=cache)


def test_compiles_fullgraph_with_the_fusedvlm_ops():
    """torch.compile(fullgraph=True) sees packed_attention as one fusedvlm:: op (fake kernel,
    autograd): no graph break, and the same outputs and gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dec = FusionDecoder(CFG)
    cu = cu_seqlens_from_lengths([5, 1, 9])
    x = torch.randn(15, CFG.hidden_size, requires_grad=True)
    compiled = torch.compile(lambda e: dec(e, cu)[0], fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.sum().backward()
    grad, x.grad = x.grad, None
    want = dec(x, cu)[0]
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, x.grad)
