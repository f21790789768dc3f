"""Where a lean decode step's time goes: the smol LLM (SmolLM2-135M) steps once per token under
torch.profiler, op by op with the projections on our matrix-vector kernel (fusedvlm::linear)
and on F.linear (FUSEDVLM_MATVEC=0 in a second process would do the same), and as one C++ op
(the fused step, fusedvlm::llama_decode_step), all in one process, rounds interleaved. Prints,
per variant, the step time next to the time the step's weight bytes take at the measured memory
bandwidth, then the profiler's top operators by self time.

    OMP_NUM_THREADS=2 .venv/bin/python bench/profile_decode.py --out bench/results/<cpu>/decode_profile.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant, interleaved")
    p.add_argument("--no-compile", action="store_true", help="profile the eager step (one profiler row per op)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--top", type=int, default=12, help="operators listed per variant")
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from fusedvlm import native
    from fusedvlm.benchmark.system import environment, memory_bandwidth, unique_parameter_bytes
    from fusedvlm.config import get_preset
    from fusedvlm.decode import make_engine
    from fusedvlm.model.llm import load_llm

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    llm, _ = load_llm(get_preset("smol").llm, dtype=dtype)
    bw, bw_source = memory_bandwidth(torch.device("cpu"))
    weight_bytes = unique_parameter_bytes(llm)
    floor_ms = weight_bytes / bw * 1e3
    compile = not args.no_compile
    engines = {}
    for name, matvec, fused in (
        ("fusedvlm::linear", True, False),
        ("F.linear", False, False),
        ("fused step", True, None),
    ):
        engine = make_engine(llm, "lean", compile, fused)
        if fused is None and not engine.fused:
            print(f"no fused-step variant: {engine.reason}")
            continue
        if not matvec:
            engine.model.matvec = None
        cache = engine.new_cache(1)
        embeds = llm.get_input_embeddings()(torch.arange(40)[None] % 1000)
        with torch.no_grad():
            engine.prefill(embeds, cache)
            engine.prepare(cache, 40 + args.steps * (args.rounds + 2))
        engines[name] = (engine, cache)

    def run(engine, cache, steps: int) -> float:
        tokens = torch.zeros(1, dtype=torch.long)
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = engine.step(tokens, cache).argmax(-1)
        return (time.perf_counter() - t0) / steps

    for engine, cache in engines.values():
        run(engine, cache, 4)  # warm
    times = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, (engine, cache) in engines.items():
            times[name].append(run(engine, cache, args.steps))

    env = environment()
    lines = [
        f"# {time.strftime('%Y-%m-%d')}, {env.get('cpu', '?')}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), ISA variant {native.isa()}",
        f"# python bench/profile_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"smol LLM {args.dtype}, lean step op by op {'compiled' if compile else 'eager'}; weights {weight_bytes / 1e6:.0f} MB "
        f"per token; memory bandwidth {bw / 1e9:.1f} GB/s ({bw_source}) -> weight-streaming floor {floor_ms:.1f} ms",
        "",
        f"{'projections on':<22} {'step ms (median)':>16} {'floor / step':>13}",
    ]
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        lines.append(f"{name:<22} {ms:>16.1f} {floor_ms / ms:>13.2f}")
    for name, (engine, cache) in engines.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(engine, cache, args.steps)
        lines += ["", f"profile, projections on {name}: {args.steps} steps, self CPU time per step"]
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60)
        lines += table.splitlines()
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
