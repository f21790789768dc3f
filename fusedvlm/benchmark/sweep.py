"""The n_l sweep (design §9): per n_l, time to first token, prefill time and FLOPs per
stage, decode speed and bytes per token, peak memory.

One model is built per preset; every run is a fresh :class:`fusedvlm.session.ChatSession`
with ``n_l=``/``n_s=`` overrides, so the timings are the runtime's own stage timings
(synchronised on CUDA). The FLOP pass (one untimed prefill per image and n_l) goes first and
doubles as warm-up for every shape; ``warmup`` further full runs follow. Timed runs then go
round every (image, n_l) ``repeats`` times, n_l ascending on even repeats and descending on
odd ones, so that a drifting machine biases no end of the sweep.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from fusedvlm.benchmark.flops import STAGES, analytic_fusion_llm_flops, prefill_flops
from fusedvlm.benchmark.system import (
    PeakMemory,
    kv_bytes_per_position,
    memory_bandwidth,
    percentile,
    quantiles,
    unique_parameter_bytes,
)

QUESTIONS = (
    "Describe the image in detail.",
    "What colours stand out the most?",
    "Is there any text in the image?",
    "What is in the background?",
)
# Real photographs of several aspect ratios (fusedvlm.samples): square, landscape 3:2,
# portrait 5:6, wide 2:1.
DEFAULT_IMAGES = ("astronaut", "chelsea", "grace_hopper", "page")


@dataclass
class SweepConfig:
    """One sweep; ``fusedvlm bench`` takes every field but the first two as a flag (:mod:`fusedvlm.options`)."""

    preset: str
    n_l: tuple[int, ...]
    n_s: int | None = field(
        default=None,
        metadata={
            "help": "fused tokens of later questions, min(n_s, n_l) at every n_l (None: the design §5 rule, 8 or n_l)"
        },
    )
    questions: int = field(
        default=1, metadata={"help": "questions per image (turn 1 gets n_l fused tokens, later turns n_s)"}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "tokens decoded per answer, EOS ignored (the paper's 256)"}
    )
    repeats: int = field(default=3, metadata={"help": "timed runs per (image, n_l)"})
    warmup: int = field(
        default=1, metadata={"help": "untimed full runs after the FLOP pass (which already warms every shape)"}
    )
    decode: str = field(default="auto", metadata={"help": "LLM decode path (fusedvlm.decode)"})
    compile: bool | None = field(
        default=None, metadata={"help": "compile the decode step (None: fusedvlm.decode.engine.compile_default())"}
    )

    def __post_init__(self):
        if not self.n_l:
            raise ValueError("no n_l values to sweep")
        if len(set(self.n_l)) != len(self.n_l):
            raise ValueError(f"duplicate n_l values in {list(self.n_l)}")
        if self.n_s is not None and self.n_s < 1:
            raise ValueError(f"--n-s must be >= 1, got {self.n_s}")
        if self.questions < 1:
            raise ValueError(f"--questions must be >= 1, got {self.questions}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.max_new_tokens < 2:
            raise ValueError(
                f"--max-new-tokens must be >= 2 (decode speed needs at least one decode step), got {self.max_new_tokens}"
            )

    def n_s_at(self, n_l: int) -> int | None:
        return None if self.n_s is None else min(self.n_s, n_l)


@dataclass
class Run:
    image: str
    n_l: int
    n_s: int
    repeat: int
    stage_ms: list[dict[str, float]]  # per turn
    ttft_ms: list[float]  # per turn: ask() wall time up to the start of decoding
    decode_ms: list[float]
    decode_latencies_ms: list[list[float]]
    prompt_tokens: list[int]
    peak_mem_bytes: int
    answer: str = ""


def run_session(
    model,
    image,
    n_l: int,
    n_s: int | None,
    questions: Sequence[str],
    generation,
    decode: str = "auto",
    compile: bool | None = None,
) -> dict:
    from fusedvlm.session import ChatSession

    device = model.device
    out = {
        "stage_ms": [],
        "ttft_ms": [],
        "decode_ms": [],
        "decode_latencies_ms": [],
        "prompt_tokens": [],
        "compile_s": 0.0,
    }
    with PeakMemory(device) as mem:
        session = ChatSession(model, image, n_l=n_l, n_s=n_s, decode=decode, compile=compile)
        for q in questions:
            t0 = time.perf_counter()
            ans = session.ask(q, generation)
            wall = time.perf_counter() - t0
            decode_s = ans.timings.get("decode", 0.0)
            # Compiling the decode step is paid once per cache bucket; it is no part of the TTFT.
            out["compile_s"] += ans.timings.get("compile", 0.0)
            wall -= ans.timings.get("compile", 0.0)
            out["stage_ms"].append({s: ans.timings.get(s, 0.0) * 1e3 for s in STAGES})
            out["ttft_ms"].append((wall - decode_s) * 1e3)
            out["decode_ms"].append(decode_s * 1e3)
            out["decode_latencies_ms"].append([t * 1e3 for t in ans.token_latencies_s])
            out["prompt_tokens"].append(ans.num_prompt_tokens)
            out["answer"] = ans.text
    out["peak_mem_bytes"] = mem.peak_bytes
    out["peak_mem_method"] = mem.method
    return out


def run_sweep(
    model, images: Sequence[tuple[str, object]], cfg: SweepConfig, log: Callable[[str], None] = print
) -> dict:
    """Run the sweep; returns ``{"bandwidth": ..., "results": [per n_l], "runs": [...]}``."""
    from fusedvlm.generation import GenerationConfig

    device = model.device
    dtype = next(model.llm.parameters()).dtype
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(cfg.questions)]
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
    bandwidth, bandwidth_source = memory_bandwidth(device)
    log(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s ({bandwidth_source})")

    # FLOPs of the first question's prefill, per image and n_l; also warms every shape up.
    # They depend on the image only through its number of views, so images with as many
    # views as an earlier one reuse its counts.
    t0 = time.perf_counter()
    flops: dict[tuple[str, int], dict] = {}
    by_views: dict[tuple[int, int], dict] = {}
    for name, image in images:
        num_views = model.preprocess([image])[1][0]
        for n_l in cfg.n_l:
            if (num_views, n_l) not in by_views:
                counts = prefill_flops(model, image, questions[0], n_l, cfg.n_s_at(n_l))
                analytic = analytic_fusion_llm_flops(
                    model,
                    num_views * model.cfg.tokens_per_view,
                    len(model.question_ids(questions[0])),
                    n_l,
                    len(model.layout.question(questions[0], n_l, True)),
                )
                by_views[num_views, n_l] = {s: c.total for s, c in counts.items()} | {
                    "attention": sum(c.attention for c in counts.values()),
                    "views": num_views,
                    "analytic_fusion_llm": sum(analytic.values()),
                }
            flops[name, n_l] = by_views[num_views, n_l]
        log(f"FLOPs of {name} ({num_views} views) counted ({time.perf_counter() - t0:.0f} s)")
    log(f"FLOP pass (and warm-up): {len(by_views)} prefills in {time.perf_counter() - t0:.1f} s")

    engine = model.decode_engine(cfg.decode, cfg.compile)
    log(f"LLM decode path: {engine.path} ({engine.reason})")
    compile_s = 0.0
    for _ in range(cfg.warmup):
        for n_l in (max(cfg.n_l), min(cfg.n_l)):
            compile_s += run_session(
                model, images[0][1], n_l, cfg.n_s_at(n_l), questions, generation, cfg.decode, cfg.compile
            )["compile_s"]
    if compile_s:
        log(f"compiled the decode step in {compile_s:.1f} s (once per cache bucket, outside every timing)")

    runs: list[Run] = []
    ascending = sorted(cfg.n_l)
    total = cfg.repeats * len(images) * len(ascending)
    t0 = time.perf_counter()
    for r in range(cfg.repeats):
        order = ascending if r % 2 == 0 else ascending[::-1]
        for name, image in images:
            for n_l in order:
                n_s = cfg.n_s_at(n_l)
                res = run_session(model, image, n_l, n_s, questions, generation, cfg.decode, cfg.compile)
                compile_s += res["compile_s"]
                resolved_n_s = model.fuser.resolve_counts(n_l, n_s)[1]
                runs.append(
                    Run(
                        name,
                        n_l,
                        resolved_n_s,
                        r,
                        res["stage_ms"],
                        res["ttft_ms"],
                        res["decode_ms"],
                        res["decode_latencies_ms"],
                        res["prompt_tokens"],
                        res["peak_mem_bytes"],
                        res["answer"],
                    )
                )
                log(
                    f"[{len(runs)}/{total}] {name} n_l={n_l}: ttft {res['ttft_ms'][0]:.0f} ms, "
                    f"decode {_tokens_per_s(res['decode_latencies_ms'][0]):.1f} tok/s ({time.perf_counter() - t0:.0f} s)"
                )

    llm_bytes = unique_parameter_bytes(model.llm)
    kv_pos = kv_bytes_per_position(model.llm, dtype)
    results = [
        _aggregate(
            n_l,
            [r for r in runs if r.n_l == n_l],
            {k: v for k, v in flops.items() if k[1] == n_l},
            llm_bytes,
            kv_pos,
            cfg.max_new_tokens,
            bandwidth,
        )
        for n_l in cfg.n_l
    ]
    return {
        "bandwidth": {"bytes_per_s": bandwidth, "source": bandwidth_source},
        "llm_parameter_bytes": llm_bytes,
        "kv_bytes_per_position": kv_pos,
        "peak_mem_method": PeakMemory(device).method,
        "decode_path": engine.path,
        "decode_reason": engine.reason,
        "compile_s": compile_s,
        "questions": questions,
        "results": results,
        "runs": [asdict(r) for r in runs],
        "flops_per_image": [{"image": k[0], "n_l": k[1], **v} for k, v in flops.items()],
    }


def _tokens_per_s(latencies_ms: Sequence[float]) -> float:
    return 1e3 * len(latencies_ms) / sum(latencies_ms) if latencies_ms else float("nan")


def _aggregate(
    n_l: int, runs: list[Run], flops: dict, llm_bytes: int, kv_pos: int, max_new_tokens: int, bandwidth: float
) -> dict:
    first_stage = [r.stage_ms[0] for r in runs]
    prefill_total = [sum(s.values()) for s in first_stage]
    ttft = quantiles([r.ttft_ms[0] for r in runs])
    prefill_ms = {"total": quantiles(prefill_total)["median"]}
    prefill_ms |= {s: quantiles([x[s] for x in first_stage])["median"] for s in STAGES}
    latencies = [t for r in runs for t in r.decode_latencies_ms[0]]
    decode_tps = [_tokens_per_s(r.decode_latencies_ms[0]) for r in runs]
    lat = quantiles(latencies)
    tps = quantiles(decode_tps)

    per_image = list(flops.values())
    tflops = {s: statistics.fmean(f[s] for f in per_image) / 1e12 for s in STAGES}
    tflops = {"total": sum(tflops.values())} | tflops
    attention_tflops = statistics.fmean(f["attention"] for f in per_image) / 1e12
    # The counted n_l-dependent stages against their closed form (a self-check of the counter).
    counted = statistics.fmean(f["fusion"] + f["projection"] + f["llm_prefill"] for f in per_image)
    analytic = statistics.fmean(f["analytic_fusion_llm"] for f in per_image)
    achieved = {"total": tflops["total"] / (prefill_ms["total"] / 1e3) if prefill_ms["total"] > 0 else float("nan")}
    achieved |= {s: tflops[s] / (prefill_ms[s] / 1e3) if prefill_ms[s] > 0 else 0.0 for s in STAGES}

    prompt = statistics.fmean(r.prompt_tokens[0] for r in runs)
    # Each decode step reads every LLM weight once and the KV cache so far (mean context:
    # the prompt plus half the generated tokens).
    bytes_per_token = llm_bytes + kv_pos * (prompt + max_new_tokens / 2)
    row = {
        "n_l": n_l,
        "n_s": runs[0].n_s,
        "runs": len(runs),
        "llm_prompt_tokens": prompt,
        "ttft_ms": ttft["median"],
        "ttft_ms_iqr": ttft["iqr"],
        "ttft_ms_min": ttft["min"],
        "ttft_ms_max": ttft["max"],
        "prefill_ms": prefill_ms,
        "prefill_ms_iqr": quantiles(prefill_total)["iqr"],
        "decode_tokens_per_s": tps["median"],
        "decode_tokens_per_s_iqr": tps["iqr"],
        "decode_latency_ms": {
            "p50": lat["median"],
            "p90": percentile(latencies, 0.9),
            "p99": percentile(latencies, 0.99),
        },
        "prefill_tflops": tflops,
        "prefill_attention_tflops": attention_tflops,
        "fusion_llm_tflops_analytic": analytic / 1e12,
        "fusion_llm_flops_rel_diff": (counted - analytic) / analytic,
        "prefill_tflops_per_s": achieved,
        "decode_bytes_per_token": bytes_per_token,
        "decode_bandwidth_bytes_per_s": bytes_per_token * tps["median"],
        "decode_bandwidth_fraction": bytes_per_token * tps["median"] / bandwidth,
        "peak_mem_bytes": max(r.peak_mem_bytes for r in runs),
    }
    if len(runs[0].ttft_ms) > 1:
        later = [t for r in runs for t in r.ttft_ms[1:]]
        row["later_turn_ttft_ms"] = quantiles(later)["median"]
        row["later_turn_prefill_ms"] = quantiles([sum(s.values()) for r in runs for s in r.stage_ms[1:]])["median"]
    return row
