"""int8 weight-only LLM (``--llm-quant int8``) against the same LLM in bf16 (issue 22): error of
the first-token logits, greedy agreement over 64 tokens, and decode tokens/s, both on the HF
decode path (the one an int8 LLM runs) and, for reference, bf16 on the lean path. Every model
is the same smol preset (real SmolLM2-135M-Instruct; vision and fusion random, seeded) in bf16;
only the LLM's linear layers differ. Timings are the best of --repeats warm runs in this process.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_int8.py --out bench/results/<machine>/int8.json
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch


def paper_layer_timing(repeats: int) -> dict:
    """One decode token through the seven linear layers of a Llama-2-7B block, bf16 weights vs
    int8 (the same Int8Linear the LLM gets), best of ``repeats`` after a warm-up."""
    from fusedvlm.benchmark.system import time_fn
    from fusedvlm.quant import Int8Linear

    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    gen = torch.Generator().manual_seed(0)
    layers = []
    for out_f, in_f in shapes:
        lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.02)
        layers.append((lin, Int8Linear(lin)))
    x = {n: torch.randn(1, n, generator=gen).bfloat16() for n in (4096, 11008)}

    def timed(pick) -> float:
        def token():
            for pair in layers:
                pick(pair)(x[pair[0].in_features])

        with torch.no_grad():
            return time_fn(token, warmup=1, repeats=repeats).min_ms / 1e3

    bf16_s, int8_s = timed(lambda p: p[0]), timed(lambda p: p[1])
    n = sum(o * i for o, i in shapes)
    return {
        "bf16_ms": bf16_s * 1e3,
        "int8_ms": int8_s * 1e3,
        "bf16_gb_s": 2 * n / bf16_s / 1e9,
        "int8_gb_s": n / int8_s / 1e9,
    }


TEXT_PROMPT = "What is the capital of France? Explain its history briefly."


@torch.no_grad()
def text_only(llm32, tokenizer, new_tokens: int) -> dict:
    """The LLM alone on a chat-templated text prompt: bf16, and int8 with bf16 and with fp32
    activations, against fp32 (greedy, HF generate)."""
    from fusedvlm.quant import quantize_llm

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXT_PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    bf16 = copy.deepcopy(llm32).to(torch.bfloat16)
    variants = {
        "bf16": bf16,
        "int8 (bf16 activations)": quantize_llm(copy.deepcopy(bf16), "int8"),
        "int8 (fp32 activations)": quantize_llm(copy.deepcopy(llm32), "int8"),
    }

    def run(m):
        out = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return out[0, ids.shape[1] :].tolist(), m(ids).logits[0, -1].float()

    ref_ids, ref_logits = run(llm32)
    res = {}
    for name, m in variants.items():
        got, logits = run(m)
        same = [a == b for a, b in zip(ref_ids, got)]
        res[name] = {
            "relative_l2_error": float((logits - ref_logits).norm() / ref_logits.norm()),
            "greedy_identical_prefix": same.index(False) if False in same else len(same),
            "text": tokenizer.decode(got),
        }
    res["fp32_text"] = tokenizer.decode(ref_ids)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smol")
    p.add_argument("--image", default="sample:grace_hopper")
    p.add_argument("--question", default="Describe the image in detail.")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from fusedvlm.benchmark.system import environment, save_json
    from fusedvlm.commands import _open_image
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.model import FusedVLM
    from fusedvlm.quant import quantize_llm
    from fusedvlm.session import ChatSession

    torch.manual_seed(0)
    fp32 = FusedVLM.from_preset(args.preset).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    int8 = copy.deepcopy(bf16)
    quantize_llm(int8.llm, "int8")
    image = _open_image(args.image)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)

    def run(model, decode: str):
        best, ans = 0.0, None
        for _ in range(args.repeats):
            ans = ChatSession(model, image, decode=decode, compile=False).ask(args.question, gen)
            best = max(best, ans.decode_tokens_per_s)
        return ans, best

    full = ChatSession(fp32, image, decode="hf", compile=False).ask(args.question, gen)
    ref, ref_hf = run(bf16, "hf")
    q, q_hf = run(int8, "hf")
    _, ref_lean = run(bf16, "lean")

    def compare(x, y) -> dict:
        a, b = x.first_logits.float(), y.first_logits.float()
        top2 = a.topk(2).values
        same = [i == j for i, j in zip(x.ids, y.ids)]
        return {
            "relative_l2_error": float((a - b).norm() / a.norm()),
            "max_abs_error": float((a - b).abs().max()),
            "top1_equal": bool(a.argmax() == b.argmax()),
            "reference_top2_margin": float(top2[0] - top2[1]),
            "greedy_tokens": len(same),
            "greedy_identical_prefix": same.index(False) if False in same else len(same),
            "greedy_positions_equal": sum(same),
        }

    text = text_only(fp32.llm, bf16.tokenizer, args.new_tokens)
    layer = paper_layer_timing(args.repeats)
    res = {
        "environment": environment(torch.device("cpu")),
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "int8_vs_bf16": compare(ref, q),
        "bf16_vs_fp32": compare(full, ref),  # the rounding bf16 itself brings, for scale
        "answers": {"fp32": full.text, "bf16": ref.text, "int8": q.text},
        "decode_tokens_per_s": {"bf16_hf": ref_hf, "int8_hf": q_hf, "bf16_lean_eager": ref_lean},
        "speedup_int8_over_bf16_hf": q_hf / ref_hf,
    }
    res["paper_layer"] = layer
    res["text_only_vs_fp32"] = text
    lines = []
    for name, c in (("int8 vs bf16", res["int8_vs_bf16"]), ("bf16 vs fp32", res["bf16_vs_fp32"])):
        lines.append(
            f"{args.preset} {name}: first-token logits relative L2 {c['relative_l2_error']:.4f}, max abs "
            f"{c['max_abs_error']:.3f}, top-1 {'equal' if c['top1_equal'] else 'different'} (reference top-2 margin "
            f"{c['reference_top2_margin']:.3f}); greedy over {c['greedy_tokens']} tokens: identical for the first "
            f"{c['greedy_identical_prefix']}, {c['greedy_positions_equal']} positions equal"
        )
    for name, t in text.items():
        if name == "fp32_text":
            continue
        lines.append(
            f"LLM alone, text prompt, {name} vs fp32: last-position logits relative L2 {t['relative_l2_error']:.4f}; "
            f"greedy identical for the first {t['greedy_identical_prefix']} of {args.new_tokens}"
        )
    lines.append(
        f"{args.preset} decode tok/s ({res['threads']} threads, best of {args.repeats}): bf16 hf {ref_hf:.1f}, "
        f"int8 hf {q_hf:.1f} ({q_hf / ref_hf:.2f}x), bf16 lean eager {ref_lean:.1f}"
    )
    lines.append(
        f"Llama-2-7B decoder layer, one token (q,k,v,o 4096x4096, gate/up/down 4096x11008): bf16 F.linear "
        f"{layer['bf16_ms']:.1f} ms ({layer['bf16_gb_s']:.1f} GB/s), int8 {layer['int8_ms']:.1f} ms "
        f"({layer['int8_gb_s']:.1f} GB/s): {layer['bf16_ms'] / layer['int8_ms']:.2f}x"
    )
    print("\n".join(lines))
    res["summary"] = lines
    if args.out:
        save_json(args.out, res)
        with open(args.out.removesuffix(".json") + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
