"""The paper's 7B model end to end on this machine (issue 22): a random-weight checkpoint in the
authors' format at the paper's shapes (tools/make_upstream_checkpoint.py) is converted, loaded in
bf16 on the CPU, and asked two questions about one image. Reports the peak RSS of each phase
above the RSS after the imports, load time, TTFT, prefill FLOP/s, decode tokens/s and the decode
bandwidth fraction (the LLM's weight bytes per token x tokens/s over the measured copy bandwidth).

    # paper size: ~15 GB written twice on disk (~30 GB), ~15 GB of RAM; deletes both when done
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_real_size.py --work /tmp/real-size --cleanup \\
        --out bench/results/<machine>/real_size.json
    # the same path scaled down (a smoke run, seconds)
    .venv/bin/python bench/bench_real_size.py --work /tmp/real-size-small --scale small --cleanup

The chat phase also loads tokenizers and runs activations: its peak is reported, not bounded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MAKE = ROOT / "tools" / "make_upstream_checkpoint.py"
SCALES = {
    "paper": [],
    "small": (
        "--n-l 16 --n-s 8 --num-crops 4 --vision-width 128 --vision-layers 2 --vision-heads 2 --vision-mlp 256 "
        "--fusion-width 128 --fusion-layers 2 --fusion-heads 2 --fusion-mlp 256 --llm-width 512 --llm-layers 4 "
        "--llm-heads 8 --llm-kv-heads 8 --llm-mlp 1024 --shard-gb 0.05"
    ).split(),
}
QUESTIONS = ("Describe the image in detail.", "What colour is it?")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child_peak(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; its peak RSS above its RSS after the imports."""
    script = textwrap.dedent(
        """
        import json, time
        import fusedvlm, torch, transformers, open_clip
        def rss(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
        base = rss("VmRSS")
        t0 = time.perf_counter()
        """
    )
    script += textwrap.dedent(code)
    script += '\nprint(json.dumps({"peak_bytes": rss("VmHWM") - base, "seconds": time.perf_counter() - t0}))\n'
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def vision_flops(cfg, views: int) -> int:
    """Forward FLOPs of the CLIP ViT on ``views`` views (patch embedding, blocks), plus the
    3x3 stride-2 local merge; LayerNorms, softmax and GELU are left out (< 1%)."""
    v = cfg.vision
    t = v.grid**2 + 1
    w, m = v.width, int(v.width * v.mlp_ratio)
    patch = 2 * (t - 1) * w * 3 * v.patch_size**2
    block = 2 * t * (4 * w * w + 2 * w * m) + 4 * t * t * w
    merged = ((v.grid + 1) // 2) ** 2
    merge = 2 * merged * w * w * 9
    return views * (patch + v.layers * block + merge)


def llm_only(model, question: str, new_tokens: int, step_bytes: int) -> dict:
    """Prefill and greedy decode of the LLM on the question's template without fused tokens,
    on the decode path a chat would use (lean, eager)."""
    from fusedvlm.benchmark.decode import prompt_embeds
    from fusedvlm.benchmark.system import memory_bandwidth
    from fusedvlm.generation import GenerationConfig, decode, prefill

    engine = model.decode_engine("auto", compile=False)
    embeds = prompt_embeds(model.llm, model.layout, question)
    state = prefill(engine, embeds)
    out = decode(engine, state, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True), eos_ids=set())
    bw, how = memory_bandwidth(torch.device("cpu"), size_bytes=1 << 30)
    lat = out.token_latencies_s
    tok_s = len(lat) / sum(lat)
    return {
        "prompt_tokens": embeds.shape[0],
        "prefill_s": state.seconds,
        "decode_path": engine.path,
        "token_latencies_s": out.token_latencies_s,
        "tokens_per_s": tok_s,
        "best_tokens_per_s": 1 / min(lat),
        "bytes_per_token": step_bytes,
        "bandwidth_bytes_per_s": bw,
        "bandwidth_method": how,
        "bandwidth_fraction": step_bytes * tok_s / bw,
        "best_bandwidth_fraction": step_bytes / min(lat) / bw,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="scratch directory for the two checkpoints")
    p.add_argument("--scale", choices=sorted(SCALES), default="paper")
    p.add_argument("--image", default="sample:grace_hopper")
    p.add_argument("--n-l", type=int, default=None, help="fused tokens of the first question (default: the model's)")
    p.add_argument("--new-tokens", type=int, default=4, help="decode tokens per answer (every one is a full read)")
    p.add_argument("--compile", action="store_true", help="compile the lean decode step (default: eager)")
    p.add_argument("--cleanup", action="store_true", help="delete both checkpoints at the end")
    p.add_argument(
        "--llm-only",
        action="store_true",
        help="skip the image: time the LLM's prefill and decode on the text of the first question (a converted "
        "directory already in --work is reused)",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="vision tower and fusion module dtype (the LLM stays bf16): fp32 runs their GEMMs at the CPU's fp32 "
        "rate where it has no bf16 arithmetic (AVX2), for 2.3 GB more memory",
    )
    p.add_argument(
        "--llm-quant",
        choices=("none", "int8"),
        default="none",
        help="quantise the LLM's linear layers after the bf16 load (int8: weights and per-row scales; the lean "
        "decode step reads them as they are)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from fusedvlm.benchmark.flops import analytic_fusion_llm_flops
    from fusedvlm.benchmark.system import environment, memory_bandwidth, save_json
    from fusedvlm.commands import open_image
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.model import FusedVLM
    from fusedvlm.session import ChatSession

    src, conv = args.work / "upstream", args.work / "converted"
    args.work.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "scale": args.scale,
        "command": sys.argv,
        "environment": environment(torch.device("cpu")),
        "phases": {},
    }
    phases = res["phases"]
    try:
        if not src.exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(MAKE), str(src), *SCALES[args.scale]], check=True)
            phases["generate"] = {"seconds": time.perf_counter() - t0}
        shards = [f.stat().st_size for f in src.iterdir() if f.name.endswith(".safetensors")]
        res["checkpoint"] = {"bytes": sum(shards), "largest_shard_bytes": max(shards), "shards": len(shards)}
        if not (args.llm_only and (conv / "config.json").is_file()):
            shutil.rmtree(conv, ignore_errors=True)
            phases["convert"] = _child_peak(
                f"from fusedvlm.upstream import convert\nconvert({str(src)!r}, {str(conv)!r}, log=lambda _m: None)"
            )
            phases["convert"]["bound_bytes"] = max(shards) + 1e9
            print(f"convert: {phases['convert']}", flush=True)

        # The libraries' code (~0.3 GB) is no part of the model's memory: import it first.
        import open_clip  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

        base = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        model = FusedVLM.from_pretrained(conv, device="cpu", dtype=dtype, llm_dtype=torch.bfloat16)
        res["dtype"] = {"vision_fusion": args.dtype, "llm": "bf16"}
        load_s = time.perf_counter() - t0
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        llm_bytes = sum(t.numel() * t.element_size() for t in model.llm.state_dict().values())
        embed = model.llm.get_input_embeddings().weight
        # A decode step reads every LLM weight once except the input embedding (one row).
        step_bytes = llm_bytes - embed.numel() * embed.element_size()
        phases["load"] = {
            "seconds": load_s,
            "peak_bytes": _status("VmHWM") - base,
            "weight_bytes": weights,
            "bound_bytes": 1.15 * weights,
        }
        print(f"load: {phases['load']}", flush=True)
        res["llm_quant"] = args.llm_quant
        if args.llm_quant != "none":
            from fusedvlm.quant import quantize_llm

            t0 = time.perf_counter()
            quantize_llm(model.llm, args.llm_quant)
            res["quantize_s"] = time.perf_counter() - t0
            llm_bytes = sum(t.numel() * t.element_size() for t in model.llm.state_dict().values())
            step_bytes = llm_bytes - embed.numel() * embed.element_size()

        if args.llm_only:
            res["llm_only"] = llm_only(model, QUESTIONS[0], args.new_tokens, step_bytes)
            print(f"llm only: {res['llm_only']}", flush=True)
            phases["llm_only"] = {"peak_bytes": _status("VmHWM") - base}
            if args.out:
                save_json(args.out, res)
            return 0
        image = open_image(args.image)
        gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
        _reset_peak()
        session = ChatSession(model, image, n_l=args.n_l, decode="auto", compile=args.compile)
        turns = []
        for q in QUESTIONS:
            ans = session.ask(q, gen)
            turns.append(
                {
                    "question": q,
                    "prompt_tokens": ans.num_prompt_tokens,
                    "fused_tokens": ans.num_fused,
                    "ttft_s": ans.ttft_s,
                    "stages_s": {k: v for k, v in ans.timings.items()},
                    "decode_tokens": len(ans.ids),
                    "decode_tokens_per_s": ans.decode_tokens_per_s,
                    "decode_path": ans.decode_path,
                }
            )
            print(f"turn: {turns[-1]}", flush=True)
        phases["chat"] = {"peak_bytes": _status("VmHWM") - base}
        res["turns"] = turns

        views, counts = model.preprocess([image])
        cfg = model.cfg
        first = turns[0]
        analytic = analytic_fusion_llm_flops(
            model,
            vision_tokens=counts[0] * cfg.tokens_per_view,
            question_tokens=len(model.question_ids(QUESTIONS[0])),
            n_l=first["fused_tokens"],
            llm_prompt_tokens=first["prompt_tokens"],
        )
        flops = {"vision+merge": vision_flops(cfg, counts[0]), **analytic}
        res["prefill"] = {
            "views": counts[0],
            "flops": flops,
            "flop_per_s": sum(flops.values()) / first["ttft_s"],
            "note": "first turn, analytic FLOPs (fusedvlm.benchmark.flops) over its TTFT",
        }
        bw, how = memory_bandwidth(torch.device("cpu"), size_bytes=1 << 30)
        tok_s = [t["decode_tokens_per_s"] for t in turns]
        res["decode"] = {
            "bytes_per_token": step_bytes,
            "tokens_per_s": tok_s,
            "bandwidth_bytes_per_s": bw,
            "bandwidth_method": how,
            "bandwidth_fraction": [step_bytes * t / bw for t in tok_s],
        }
        del session, model
    finally:
        if args.cleanup:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(conv, ignore_errors=True)

    gb = 1e9
    lines = [
        f"scale {args.scale}: {res['checkpoint']['bytes'] / gb:.2f} GB checkpoint (bf16) in "
        f"{res['checkpoint']['shards']} shards, largest {res['checkpoint']['largest_shard_bytes'] / gb:.2f} GB",
        f"convert: peak RSS {phases['convert']['peak_bytes'] / gb:.2f} GB above imports "
        f"(target <= largest shard + 1 GB = {phases['convert']['bound_bytes'] / gb:.2f}), "
        f"{phases['convert']['seconds']:.0f} s",
        f"load ({args.dtype} vision+fusion, bf16 LLM): {phases['load']['seconds']:.1f} s, peak RSS {phases['load']['peak_bytes'] / gb:.2f} GB = "
        f"{phases['load']['peak_bytes'] / phases['load']['weight_bytes']:.3f}x the {phases['load']['weight_bytes'] / gb:.2f} GB "
        "of weights (target <= 1.15x; memory-mapped, pages not yet read)",
        f"chat (2 questions): peak RSS {phases['chat']['peak_bytes'] / gb:.2f} GB above the imports",
    ]
    for i, t in enumerate(res["turns"]):
        lines.append(
            f"turn {i + 1}: TTFT {t['ttft_s']:.1f} s ({t['prompt_tokens']} LLM prompt tokens, "
            f"{t['fused_tokens']} fused), decode {t['decode_tokens_per_s']:.3f} tok/s over {t['decode_tokens']} tokens "
            f"({t['decode_path']}), stages " + ", ".join(f"{k} {v:.1f}" for k, v in t["stages_s"].items())
        )
    pre, dec = res["prefill"], res["decode"]
    lines.append(
        f"prefill turn 1: {sum(pre['flops'].values()) / 1e12:.2f} TFLOP ({pre['views']} views) -> "
        f"{pre['flop_per_s'] / 1e9:.1f} GFLOP/s"
    )
    lines.append(
        f"decode: {dec['bytes_per_token'] / gb:.2f} GB read per token; bandwidth {dec['bandwidth_bytes_per_s'] / gb:.1f} GB/s "
        f"({dec['bandwidth_method']}); fraction " + ", ".join(f"{f:.3f}" for f in dec["bandwidth_fraction"])
    )
    print("\n".join(lines))
    res["summary"] = lines
    if args.out:
        save_json(args.out, res)
        with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if all(math.isfinite(t) for t in res["decode"]["tokens_per_s"]) else 1


if __name__ == "__main__":
    sys.exit(main())
