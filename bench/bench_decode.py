"""Decode paths side by side on one LLM prompt (default: the smol preset's SmolLM2-135M, fp32):
HF ``generate``, today's HF decode loop, the lean static-cache step eager and compiled, batches
of 1, 4 and 16 concurrent chats stepping together, and LLM prefill per path on a 795-token prompt
(what smol's LLM reads at n_l=768; --prefill-tokens) as a fraction of the measured FMA peak
(fusedvlm.benchmark.decode). Ratios are against baselines measured in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_decode.py            # about 2-4 min cold, 1 min cached
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_decode.py --no-compile --batches 1

Compiled graphs are cached under ~/.cache/fusedvlm/inductor, so a second run pays little compile time.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fusedvlm.benchmark.system import cpp_isa, environment, save_json


def main(argv: list[str] | None = None) -> int:
    from fusedvlm.benchmark.decode import DecodeBenchConfig, prompt_embeds, run_decode_bench, table_lines
    from fusedvlm.config import PRESETS
    from fusedvlm.options import add_options, from_options

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smol", choices=sorted(PRESETS))
    # A tuple has no flag of its own: --batches is parsed below.
    add_options(p, DecodeBenchConfig, exclude=("batches",))
    p.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes of the batch-decode rows")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from fusedvlm.chat import ChatLayout
    from fusedvlm.config import get_preset
    from fusedvlm.model.llm import load_llm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    cfg = from_options(DecodeBenchConfig, args, batches=batches)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    torch.manual_seed(0)
    llm_cfg = get_preset(args.preset).llm
    llm, tokenizer = load_llm(llm_cfg, device=args.device, dtype=dtype)
    layout = ChatLayout(llm_cfg.chat_template, tokenizer, llm_cfg.system_prompt)
    res = run_decode_bench(llm, prompt_embeds(llm, layout), cfg, log=lambda m: print(m, flush=True))
    print(f"\npreset {args.preset}, {dtype}, {torch.get_num_threads()} thread(s), C++ ISA variant {cpp_isa()}")
    print("\n".join(table_lines(res)))
    if args.out:
        save_json(args.out, {"environment": environment(), "preset": args.preset, "dtype": str(dtype), **res})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
