"""``make cpu-check``: the CPU figures of issue 25 (and issue 22's int8 ratio) on this machine,
for every ISA variant it runs, in one command.

Per variant V (``FUSEDVLM_ISA=V``; by default each one ``fusedvlm.native.supported_isas()``
lists except the portable baseline), each step a subprocess with its own time limit, its log and
its JSON under ``bench/results/<cpu>-<N>core/<V>/``:

  decode       bench/bench_decode.py (smol, fp32): decode tok/s of the best lean path against the
               read-bandwidth limit and against HF generate; LLM prefill against the FMA peak
  attn-long    bench/bench_packed_attention.py: 8 samples of 1500-2600 tokens, forward and
               forward + backward against the per-segment SDPA loop, in interleaved rounds
  attn-short   the same on 64 samples of 16-300 tokens
  overhead     bench/bench_op_overhead.py: per-call overhead of the public ops, with gradients
  int8-paper   with --paper DIR (a converted paper-size checkpoint: bench/bench_real_size.py makes
               one): bench/bench_int8.py, int8 against bf16 decode of the 7B LLM

then ``summary.md`` and ``summary.json`` beside the variants' folders: a row per figure, a column
per variant, each value next to its target. The figures are one run each; on a shared machine,
read the bandwidth and FMA peak the benches print beside them.

    python tools/cpu_check.py [--variants avx2 avx512] [--only STEP ...] [--paper DIR] [--out DIR]

``--quick`` runs every step on small shapes (about a minute, for the tests and a first look): its
figures say nothing about the targets, and the summary says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from steps import ROOT, Row, Step, run_step, slug

STEPS = ("decode", "attn-long", "attn-short", "overhead", "int8-paper")


def plan(variant: str, out: str, quick: bool = False, paper: str | None = None, python: str = sys.executable):
    """The steps of one ISA variant, writing under ``out`` (that variant's folder)."""
    bench = os.path.join(ROOT, "bench")
    env = {"FUSEDVLM_ISA": variant}

    def attention(name, samples, lo, hi, limit):
        argv = [python, f"{bench}/bench_packed_attention.py", "--samples", str(samples), "--backward-samples"]
        argv += [str(samples), "--min-len", str(lo), "--max-len", str(hi), "--only", "fusedvlm", "sdpa_loop"]
        argv += ["--heads", "2", "--repeats", "3"] if quick else ["--repeats", "5"]
        return Step(name, [*argv, "--out", f"{out}/{name}.json"], limit, outputs=[f"{name}.json"], env=env)

    decode = [python, f"{bench}/bench_decode.py", "--batches", "1", "--out", f"{out}/decode.json"]
    if quick:
        decode += ["--preset", "tiny", "--new-tokens", "4", "--repeats", "1", "--prefill-tokens", "16", "--no-compile"]
    else:
        decode += ["--new-tokens", "32", "--repeats", "3"]
    overhead = [python, f"{bench}/bench_op_overhead.py", "--out", f"{out}/overhead.json"]
    overhead += ["--calls", "50", "--rounds", "3"] if quick else ["--rounds", "9"]
    steps = [
        Step("decode", decode, 1800, outputs=["decode.json"], env=env),
        attention("attn-long", 2, 30, 60, 1800) if quick else attention("attn-long", 8, 1500, 2600, 1800),
        attention("attn-short", 4, 3, 20, 600) if quick else attention("attn-short", 64, 16, 300, 600),
        Step("overhead", overhead, 600, outputs=["overhead.json"], env=env),
    ]
    if paper:
        int8 = [python, f"{bench}/bench_int8.py", "--checkpoint", paper, "--out", f"{out}/int8-paper.json"]
        int8 += ["--new-tokens", "8", "--repeats", "1"] if quick else ["--new-tokens", "64", "--repeats", "3"]
        steps.append(Step("int8-paper", int8, 3600, outputs=["int8-paper.json"], env=env))
    return steps


@dataclass
class Figure:
    name: str
    step: str  # the step whose JSON it reads
    target: str  # as issue 25 (or 22) states it
    met: Callable[[float], bool]
    read: Callable[[dict], tuple[float, str]]  # the step's JSON -> (value, the value as printed)


def _best_lean_decode(d: dict) -> dict:
    return max((r for r in d["rows"] if r["path"].startswith("lean")), key=lambda r: r["bandwidth_fraction"])


def _best_lean_prefill(d: dict) -> dict:
    return max((r for r in d["prefill_rows"] if r["path"].startswith("lean")), key=lambda r: r["peak_fraction"])


def _attention(mode: str) -> Callable[[dict], tuple[float, str]]:
    def read(d):
        r = next(r for r in d["rows"] if r["mode"] == mode and r["method"] == "fusedvlm")
        base = next(b for b in d["rows"] if b["mode"] == mode and b["method"] == "sdpa_loop")
        return r["x_vs_sdpa_loop"], f"{r['x_vs_sdpa_loop']:.2f}x ({r['ms']:.0f} vs {base['ms']:.0f} ms)"

    return read


def _overhead(op: str) -> Callable[[dict], tuple[float, str]]:
    def read(d):
        r = next(r for r in d["rows"] if r["op"] == op and r["mode"] == "grad")
        return r["public_minus_floor_us"], f"{r['public_minus_floor_us']:.1f} us (floor {r['floor_us']:.1f})"

    return read


def _decode_fraction(d):
    r = _best_lean_decode(d)
    bw = d["bandwidth"]["per_run"][r["path"]]
    return r["bandwidth_fraction"], (
        f"{r['bandwidth_fraction']:.2f} ({r['path']}, {r['tokens_per_s']:.1f} tok/s, bandwidth reads "
        f"{min(bw) / 1e9:.1f}-{max(bw) / 1e9:.1f} GB/s)"
    )


def _decode_vs_generate(d):
    r = _best_lean_decode(d)
    return r["x_hf_generate"], f"{r['x_hf_generate']:.2f}x ({r['path']})"


def _prefill(d):
    r = _best_lean_prefill(d)
    return r["peak_fraction"], (
        f"{r['peak_fraction']:.2f} ({r['path']}, {r['gflops_per_s']:.0f} of {d['fma_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s)"
    )


def _int8(d):
    # The median of the rounds' own ratios (bench_int8 pairs bf16 and int8 in each round).
    per_round = d["int8_over_bf16_per_round"]
    ratio = statistics.median(per_round)
    f = d.get("bandwidth_fraction", {})
    fractions = f"; fractions bf16 {f['bf16']:.2f} / int8 {f['int8']:.2f}" if f else ""
    return ratio, (
        f"{ratio:.2f}x (rounds {' / '.join(f'{x:.2f}' for x in per_round)}; median tok/s "
        f"{d['decode_tokens_per_s']['int8']:.2f} vs {d['decode_tokens_per_s']['bf16']:.2f}{fractions})"
    )


FIGURES = [
    Figure(
        "decode, smol fp32, best lean path: fraction of the read-bandwidth limit",
        "decode",
        ">= 0.7",
        lambda v: v >= 0.7,
        _decode_fraction,
    ),
    Figure("decode vs HF generate, same run", "decode", ">= 1.5x", lambda v: v >= 1.5, _decode_vs_generate),
    Figure(
        "attention, 8 long samples, forward vs per-segment SDPA",
        "attn-long",
        ">= 1.3x",
        lambda v: v >= 1.3,
        _attention("fwd"),
    ),
    Figure(
        "attention, 8 long samples, fwd+bwd vs SDPA loop",
        "attn-long",
        ">= 2x",
        lambda v: v >= 2.0,
        _attention("fwd+bwd"),
    ),
    Figure("attention, 64 short segments, forward", "attn-short", ">= 2x", lambda v: v >= 2.0, _attention("fwd")),
    Figure(
        "per-call overhead with gradients, attention",
        "overhead",
        "<= 10 us",
        lambda v: v <= 10.0,
        _overhead("packed_attention"),
    ),
    Figure(
        "per-call overhead with gradients, local merge",
        "overhead",
        "<= 10 us",
        lambda v: v <= 10.0,
        _overhead("local_merge"),
    ),
    Figure("LLM prefill, smol n_l=768: fraction of the FMA peak", "decode", ">= 0.6", lambda v: v >= 0.6, _prefill),
    Figure("int8 vs bf16 decode, paper-size LLM (issue 22)", "int8-paper", ">= 1.7x", lambda v: v >= 1.7, _int8),
]


def figures(variant_dir: str, rows: list[Row]) -> dict[str, dict]:
    """Each figure of one variant: its value, as printed, and whether it meets its target; a
    figure whose step did not run or failed says so instead."""
    status = {r.step: r.status for r in rows}
    out = {}
    for f in FIGURES:
        path = os.path.join(variant_dir, f"{f.step}.json")
        if f.step not in status:
            out[f.name] = dict(value=None, text="not run", met=None)
        elif status[f.step] != "ok" or not os.path.exists(path):
            out[f.name] = dict(value=None, text=f"{f.step}: {status[f.step]}", met=None)
        else:
            with open(path) as fh:
                value, text = f.read(json.load(fh))
            out[f.name] = dict(value=value, text=text, met=bool(f.met(value)))
    return out


def write_summary(out: str, header: dict, results: dict[str, dict], steps: dict[str, list[Row]]) -> None:
    variants = list(results)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(
            dict(header, figures=results, steps={v: [asdict(r) for r in rows] for v, rows in steps.items()}),
            f,
            indent=1,
        )
    lines = [
        f"# cpu-check on {header['cpu']} ({header['cores']} cores, {header['threads']} threads)",
        "",
        f"torch {header['torch']}, git {header['git']}, {header['date']}, load average {header['load_before']} "
        f"before, {header['load_after']} after; total {header['total_s']} s; ISA variants run: {', '.join(variants)}",
        "",
    ]
    if header["quick"]:
        lines += ["**--quick: small shapes; these figures say nothing about the targets.**", ""]
    lines += [
        "| figure | target | " + " | ".join(variants) + " |",
        "| --- | --- | " + " | ".join("---" for _ in variants) + " |",
    ]
    for f in FIGURES:
        cells = []
        for v in variants:
            r = results[v][f.name]
            mark = "" if r["met"] is None or header["quick"] else (" met" if r["met"] else " **short**")
            cells.append(r["text"] + mark)
        lines.append(f"| {f.name} | {f.target} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | step | status | seconds | log |", "| --- | --- | --- | --- | --- |"]
    for v, rows in steps.items():
        lines += [f"| {v} | {r.step} | {r.status} | {r.seconds} | {v}/{r.log or ''} |" for r in rows]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=None, help="ISA variants (default: all but baseline)")
    p.add_argument("--only", nargs="+", default=None, choices=STEPS, help="run only these steps")
    p.add_argument("--paper", default=None, help="a converted paper-size checkpoint for the int8-paper step")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<cpu>-<N>core)")
    p.add_argument("--quick", action="store_true", help="small shapes: checks that every step runs")
    args = p.parse_args(argv)

    import torch

    from fusedvlm import native
    from fusedvlm.benchmark.system import cpu_name

    if not native.available():
        print(
            f"cpu-check: the C++ kernels are not available here ({native.status()}); nothing was run", file=sys.stderr
        )
        return 2
    runnable = native.supported_isas()
    variants = args.variants or [v for v in runnable if v != "baseline"] or runnable
    missing = [v for v in variants if v not in runnable]
    if missing:
        print(
            f"cpu-check: this CPU cannot run the ISA variant(s) {missing}; it runs {runnable}; nothing was run",
            file=sys.stderr,
        )
        return 2
    if args.paper and not os.path.isdir(args.paper):
        print(f"cpu-check: --paper {args.paper} is not a folder; nothing was run", file=sys.stderr)
        return 2
    cpu, cores = cpu_name(), os.cpu_count() or 1
    out = os.path.abspath(args.out or os.path.join(ROOT, "bench", "results", f"{slug(cpu, 'cpu')}-{cores}core"))
    header = dict(
        cpu=cpu,
        cores=cores,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        git=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or "unknown",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load_before=load_average(),
        quick=args.quick,
    )
    t0 = time.perf_counter()
    results, all_rows = {}, {}
    print(f"cpu-check on {cpu}, variants {variants}: results in {out}", flush=True)
    for v in variants:
        vdir = os.path.join(out, v)
        os.makedirs(vdir, exist_ok=True)
        rows = []
        for step in plan(v, vdir, args.quick, args.paper):
            if args.only and step.name not in args.only:
                continue
            rows.append(run_step(step, vdir))
            print(f"  {v:<8} {step.name:<11} {rows[-1].status} ({rows[-1].seconds} s)", flush=True)
        results[v], all_rows[v] = figures(vdir, rows), rows
    header.update(load_after=load_average(), total_s=round(time.perf_counter() - t0, 1))
    write_summary(out, header, results, all_rows)
    print(f"cpu-check: {header['total_s']} s; summary in {os.path.join(out, 'summary.md')}")
    failed = [r for rows in all_rows.values() for r in rows if r.status != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
