"""A multi-question conversation about one image: prefix reuse vs recomputing every turn.

Two :class:`fusedvlm.session.ChatSession` runs of the same conversation (default: the
``smol`` preset, 4 questions, greedy answers of up to ``--max-new-tokens`` tokens), measured
in the same process, alternating which goes first over ``--repeats`` rounds:

* ``reuse``     : the image's vision-prefix keys/values are computed once and kept, with every
                  earlier question group, in the fusion decoder's packed KV cache; the LLM keeps
                  the conversation's KV cache; a turn computes only its own tokens.
* ``recompute`` : upstream's way: every turn re-encodes the image, re-runs the whole fusion
                  stream [V | Q1 .. | Qk ..] and re-prefills the whole LLM prompt.

The headline is the total **fusion + projection + LLM prefill** time over all turns
(``fusion_prefill_s``), recompute / reuse; the time to first token summed over turns (every
prefill stage, vision included) is printed too. The fused tokens of both runs are compared
(they must agree to float rounding) and so are the answers.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_conversation.py
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch

from fusedvlm.benchmark.system import environment, print_table, save_json

QUESTIONS = [
    "What is shown in this image?",
    "Which colours dominate the picture, and where are they?",
    "Is there any text or writing visible?",
    "Describe the lower half of the image in detail.",
]
FUSION_PREFILL = ("fusion", "projection", "llm_prefill")


def synthetic_image(width: int, height: int, seed: int):
    """A deterministic RGB test card: colour gradients plus noise (no files, no downloads)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 64 * np.sin(x / 17.0 + y / 23.0)], -1
    )
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def run_conversation(model, image, questions, reuse: bool, generation):
    from fusedvlm.session import ChatSession

    session = ChatSession(model, image, reuse_prefix=reuse)
    turns = []
    for q in questions:
        ans = session.ask(q, generation)
        turns.append(
            dict(
                mode="reuse" if reuse else "recompute",
                fusion_s=ans.timings.get("fusion", 0.0),
                fusion_prefill_s=sum(ans.timings.get(s, 0.0) for s in FUSION_PREFILL),
                ttft_s=ans.ttft_s,
                llm_prompt_tokens=ans.num_prompt_tokens,
                answer_tokens=len(ans.ids),
                ids=ans.ids,
            )
        )
    return turns, session.fused_tokens()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smol")
    p.add_argument("--questions", type=int, default=4, help=f"1..{len(QUESTIONS)}")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--repeats", type=int, default=2, help="rounds of (reuse, recompute), alternating order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/conversation.json")
    args = p.parse_args(argv)
    if not 1 <= args.questions <= len(QUESTIONS):
        raise SystemExit(f"--questions must be in 1..{len(QUESTIONS)}, got {args.questions}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")

    from fusedvlm.generation import GenerationConfig
    from fusedvlm.model.vlm import FusedVLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = FusedVLM.from_preset(args.preset).to(device).eval()
    image = synthetic_image(*args.image_size, args.seed)
    questions = QUESTIONS[: args.questions]
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    print(
        f"preset={args.preset} device={device} threads={torch.get_num_threads()} questions={len(questions)} "
        f"max_new_tokens={args.max_new_tokens} image={args.image_size[0]}x{args.image_size[1]}",
        flush=True,
    )

    for reuse in (True, False):  # warm-up of both modes (allocator, tokenizers, caches), so neither runs cold
        run_conversation(model, image, questions[:1], reuse, generation)

    totals: dict[str, list[float]] = {"reuse": [], "recompute": []}
    ttft: dict[str, list[float]] = {"reuse": [], "recompute": []}
    last: dict[str, tuple] = {}
    for r in range(args.repeats):
        for reuse in (True, False) if r % 2 == 0 else (False, True):
            turns, fused = run_conversation(model, image, questions, reuse, generation)
            mode = turns[0]["mode"]
            totals[mode].append(sum(t["fusion_prefill_s"] for t in turns))
            ttft[mode].append(sum(t["ttft_s"] for t in turns))
            last[mode] = (turns, fused)
            print(
                f"round {r + 1} {mode}: fusion+prefill {totals[mode][-1]:.3f} s, ttft {ttft[mode][-1]:.3f} s",
                flush=True,
            )

    rows = []
    for mode in ("recompute", "reuse"):
        for i, t in enumerate(last[mode][0]):
            rows.append(dict(mode=mode, turn=i + 1, **{k: v for k, v in t.items() if k not in ("mode", "ids")}))
    print_table(
        rows,
        ["mode", "turn", "fusion_s", "fusion_prefill_s", "ttft_s", "llm_prompt_tokens", "answer_tokens"],
        title="per turn (last round)",
    )

    fused_reuse, fused_recompute = last["reuse"][1], last["recompute"][1]
    fused_diff = max(float((a - b).abs().max()) for a, b in zip(fused_reuse, fused_recompute))
    same_answers = [a["ids"] == b["ids"] for a, b in zip(last["reuse"][0], last["recompute"][0])]
    summary = dict(
        fusion_prefill_reuse_s=statistics.median(totals["reuse"]),
        fusion_prefill_recompute_s=statistics.median(totals["recompute"]),
        ttft_reuse_s=statistics.median(ttft["reuse"]),
        ttft_recompute_s=statistics.median(ttft["recompute"]),
        fused_max_abs_diff=fused_diff,
        same_answers=same_answers,
    )
    summary["speedup_fusion_prefill"] = summary["fusion_prefill_recompute_s"] / summary["fusion_prefill_reuse_s"]
    summary["speedup_ttft"] = summary["ttft_recompute_s"] / summary["ttft_reuse_s"]
    print(
        f"\nfusion+projection+LLM prefill over {len(questions)} turns (median of {args.repeats}): "
        f"recompute {summary['fusion_prefill_recompute_s']:.3f} s, reuse {summary['fusion_prefill_reuse_s']:.3f} s "
        f"-> {summary['speedup_fusion_prefill']:.2f}x"
    )
    print(
        f"time to first token summed over turns: recompute {summary['ttft_recompute_s']:.3f} s, "
        f"reuse {summary['ttft_reuse_s']:.3f} s -> {summary['speedup_ttft']:.2f}x"
    )
    print(
        f"fused tokens, reuse vs recompute: max |diff| = {fused_diff:.3g}; identical answers per turn: {same_answers}"
    )
    save_json(args.out, dict(env=environment(), args=vars(args), summary=summary, turns=rows, totals=totals, ttft=ttft))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
