"""Decode paths side by side on one prompt: Hugging Face ``generate``, today's HF decode loop,
the lean static-cache step uncompiled and compiled; then batches of concurrent chats stepping
together, and LLM prefill through each path. Used by ``fusedvlm bench`` and bench/bench_decode.py.

Every row is measured in the same run, so the ratios hold on a noisy machine even when the
absolute numbers do not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fusedvlm.benchmark.system import (
    cpp_isa,
    fma_peak,
    kv_bytes_per_position,
    memory_bandwidth,
    percentile,
    unique_parameter_bytes,
)
from fusedvlm.timing import sync

QUESTION = (
    "Describe a busy harbour at dawn: the boats, the people, the light on the water and the sounds. "
    "Then explain how the tides shape the work of the fishermen there."
)


@dataclass(frozen=True)
class DecodeBenchConfig:
    """bench/bench_decode.py takes its flags from these fields (:mod:`fusedvlm.options`)."""

    new_tokens: int = field(default=64, metadata={"help": "tokens decoded per timed run"})
    repeats: int = field(default=3, metadata={"help": "timed runs per path"})
    batches: tuple[int, ...] = (1, 4, 16)
    batch_tokens: int = field(default=32, metadata={"help": "steps timed per batch row"})
    compile: bool = field(default=True, metadata={"help": "the compiled lean path"})
    prefill_tokens: int = field(
        default=795,
        metadata={
            "help": "prompt length of the prefill rows: 795 is what smol's LLM reads at n_l=768 (768 fused "
            "tokens and the first-turn text); 0 times the decode prompt itself"
        },
    )

    def __post_init__(self):
        if self.new_tokens < 4:
            raise ValueError(f"new_tokens must be >= 4 (latency percentiles need a few steps), got {self.new_tokens}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.batch_tokens < 2:
            raise ValueError(f"batch_tokens must be >= 2, got {self.batch_tokens}")
        if self.prefill_tokens < 0:
            raise ValueError(f"prefill_tokens must be >= 0, got {self.prefill_tokens}")


def prompt_embeds(llm, layout, question: str = QUESTION) -> torch.Tensor:
    """(L, d) embeddings of a first chat turn in the model's template, without fused tokens."""
    ids = torch.tensor(layout.question(question, 0, True).ids, device=llm.get_input_embeddings().weight.device)
    with torch.no_grad():
        return llm.get_input_embeddings()(ids)


def prefill_prompt(llm, embeds: torch.Tensor, tokens: int) -> torch.Tensor:
    """(tokens, d): ``embeds`` (L, d) after tokens - L stand-ins for fused visual tokens (the
    embeddings of seeded random ids: the prefill's cost depends on the length, not the values).
    tokens == 0 gives ``embeds`` itself."""
    length = embeds.shape[0]
    if tokens == 0 or tokens == length:
        return embeds
    if tokens < length:
        raise ValueError(f"prefill_tokens {tokens} is shorter than the {length}-token decode prompt it extends")
    limit = getattr(llm.config, "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise ValueError(f"prefill_tokens {tokens} exceeds the LLM's max_position_embeddings {limit}")
    table = llm.get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(table.num_embeddings, (tokens - length,), generator=gen).to(embeds.device)
    with torch.no_grad():
        return torch.cat([table(ids).to(embeds.dtype), embeds])


def _row(
    name: str,
    path: str,
    latencies: list[float],
    tokens_per_s: list[float],
    bytes_per_token: float,
    bandwidths: list[float],
    compile_s: float,
    reason: str = "",
) -> dict:
    """``bandwidths[i]`` was read just before the run that gave ``tokens_per_s[i]``: the fraction
    is the median of the pairs, so a machine whose speed drifts between runs (a shared VM's moved
    20 % within minutes) moves both sides of each pair alike."""
    tps = statistics.median(tokens_per_s)
    return {
        "name": name,
        "path": path,
        "reason": reason,
        "tokens_per_s": tps,
        "bandwidth_fraction": statistics.median(bytes_per_token * t / b for t, b in zip(tokens_per_s, bandwidths)),
        "latency_ms": {p: percentile(latencies, q) * 1e3 for p, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "compile_s": compile_s,
    }


def run_decode_bench(
    llm,
    embeds: torch.Tensor,
    cfg: DecodeBenchConfig,
    log: Callable[[str], None] = print,
    bandwidth: tuple[float, str] | None = None,
    engine_for: Callable | None = None,
) -> dict:
    """Every path on the prompt ``embeds`` (L, d); returns rows, batch rows, prefill rows, ratios.
    ``engine_for(decode, compile, fused)`` supplies the engines (default: new ones from
    make_engine); pass ``FusedVLM.decode_engine`` to reuse steps a chat already compiled."""
    from fusedvlm.decode import make_engine

    if engine_for is None:

        def engine_for(decode: str, compile: bool, fused: bool | None = None):
            return make_engine(llm, decode, compile, fused)

    from fusedvlm.generation import GenerationConfig, decode, prefill

    device = embeds.device
    dtype = llm.get_input_embeddings().weight.dtype
    bw, bw_source = bandwidth or memory_bandwidth(device)
    llm_bytes = unique_parameter_bytes(llm)
    kv_pos = kv_bytes_per_position(llm, dtype)
    prompt_len = embeds.shape[0]
    # Every decode step streams the weights once and the KV cache so far (mean context).
    bytes_per_token = llm_bytes + kv_pos * (prompt_len + cfg.new_tokens / 2)
    gen = GenerationConfig(max_new_tokens=cfg.new_tokens, ignore_eos=True)

    engines = [engine_for("hf", False)]
    # auto: the lean step (eager, compiled, then as one C++ op where it can) for Llama, HF's
    # static cache (compiled) for other LMs that support one; an engine already in the list
    # (plain HF) is not timed twice.
    for compiled, fused in [(False, False), *([(True, False)] if cfg.compile else []), (cfg.compile, None)]:
        engine = engine_for("auto", compiled, fused)
        if engine.path in {e.path for e in engines}:
            log(f"decode: auto{' compiled' if compiled else ''} gives {engine.path} ({engine.reason})")
        else:
            engines.append(engine)

    # HF generate, as a user of transformers would decode: new tokens minus a 1-token run (its prefill).
    def generate(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        llm.generate(
            inputs_embeds=embeds[None],
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=llm.config.eos_token_id if llm.config.pad_token_id is None else llm.config.pad_token_id,
        )
        sync(device)
        return time.perf_counter() - t0

    # Warm-up (and compilation) first; then the timed runs go round every path in turn, so that a
    # machine whose load drifts biases no path.
    generate(2)
    compile_s, answers = {}, {}
    for engine in engines:
        out = decode(engine, prefill(engine, embeds), gen, eos_ids=set())
        compile_s[engine.path] = out.compile_s
        answers[engine.path] = out.ids
    gen_tps = []
    tps = {e.path: [] for e in engines}
    lat = {e.path: [] for e in engines}
    # The bandwidth each run is measured against, read just before it (a given one stays fixed).
    run_bw = {p: [] for p in ["hf-generate", *tps]}

    def read_bandwidth(path: str) -> None:
        run_bw[path].append(memory_bandwidth(device, repeats=2)[0] if bandwidth is None else bw)

    for _ in range(cfg.repeats):
        read_bandwidth("hf-generate")
        gen_tps.append((cfg.new_tokens - 1) / max(generate(cfg.new_tokens) - generate(1), 1e-9))
        for engine in engines:
            read_bandwidth(engine.path)
            state = prefill(engine, embeds)
            out = decode(engine, state, gen, eos_ids=set())
            tps[engine.path].append(len(out.token_latencies_s) / sum(out.token_latencies_s))
            lat[engine.path] += out.token_latencies_s
    rows = [
        _row(
            "HF generate",
            "hf-generate",
            [],
            gen_tps,
            bytes_per_token,
            run_bw["hf-generate"],
            0.0,
            "transformers generate(), greedy",
        )
    ]
    rows[-1]["latency_ms"] = {k: float("nan") for k in rows[-1]["latency_ms"]}
    names = {
        "hf": "HF forward loop",
        "lean-eager": "lean, eager",
        "lean-compiled": "lean, compiled",
        "lean-fused": "lean, fused",
        "hf-static-eager": "HF static cache, eager",
        "hf-static-compiled": "HF static cache, compiled",
    }
    for engine in engines:
        rows.append(
            _row(
                names[engine.path],
                engine.path,
                lat[engine.path],
                tps[engine.path],
                bytes_per_token,
                run_bw[engine.path],
                compile_s[engine.path],
                "today's path: HF forward + DynamicCache" if engine is engines[0] else engine.reason,
            )
        )
    for r in rows:
        log(f"decode: {r['name']} {r['tokens_per_s']:.1f} tok/s (compile {r['compile_s']:.1f} s)")

    base = {r["path"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        r["x_hf_generate"] = r["tokens_per_s"] / base["hf-generate"]
        r["x_hf_loop"] = r["tokens_per_s"] / base["hf"]
    same = {p: ids == answers["hf"] for p, ids in answers.items()}

    best = engines[-1]
    batch_rows = []
    for b in cfg.batches:
        cache = best.new_cache(b)
        best.prefill(embeds[None].expand(b, -1, -1), cache)
        compile_s = best.prepare(cache, prompt_len + cfg.batch_tokens + 1)
        tokens = torch.zeros(b, dtype=torch.long, device=device)
        best.step(tokens, cache)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(cfg.batch_tokens):
            tokens = best.step(tokens, cache).argmax(-1)
        sync(device)
        seconds = time.perf_counter() - t0
        batch_rows.append(
            {
                "batch": b,
                "path": best.step_path(b),
                "aggregate_tokens_per_s": b * cfg.batch_tokens / seconds,
                "step_ms": seconds / cfg.batch_tokens * 1e3,
                "compile_s": compile_s,
            }
        )
        log(f"decode: batch {b} ({best.path}) {batch_rows[-1]['aggregate_tokens_per_s']:.1f} tok/s aggregate")
    for r in batch_rows:
        r["x_batch_1"] = (
            r["aggregate_tokens_per_s"] / batch_rows[0]["aggregate_tokens_per_s"]
            if cfg.batches[0] == 1
            else float("nan")
        )

    # Prefill on its own prompt, each path warmed on that length first (a new cache bucket may
    # compile), then timed in turn like the decode rows.
    long = prefill_prompt(llm, embeds, cfg.prefill_tokens)
    for engine in engines:
        prefill(engine, long)
    pre = {e.path: [] for e in engines}
    for _ in range(cfg.repeats):
        for engine in engines:
            pre[engine.path].append(prefill(engine, long).seconds)
    prefill_ms = {p: statistics.median(v) * 1e3 for p, v in pre.items()}
    prefill_len = long.shape[0]

    # Prefill FLOPs: every matmul weight once per prompt token (embedding lookups excluded), and
    # causal attention (QK^T and PV, half the square).
    c = llm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    matmul_params = sum(p.numel() for n, p in llm.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if getattr(c, "tie_word_embeddings", False):
        matmul_params += llm.get_input_embeddings().weight.numel()
    # logits_to_keep: the LM head runs on the last position only.
    lm_head = llm.get_output_embeddings().weight.numel()
    flops = 2 * (matmul_params - lm_head) * prefill_len + 2 * lm_head
    flops += 2 * 2 * c.num_hidden_layers * c.num_attention_heads * head_dim * prefill_len * (prefill_len + 1) / 2
    peak = fma_peak(device)
    prefill_rows = [
        {
            "path": p,
            "ms": ms,
            "gflops_per_s": flops / (ms / 1e3) / 1e9,
            "x_hf": prefill_ms["hf"] / ms,
            "peak_fraction": flops / (ms / 1e3) / peak[0] if peak else None,
        }
        for p, ms in prefill_ms.items()
    ]
    return {
        "cpp_isa": cpp_isa(),
        "bandwidth": {"bytes_per_s": bw, "source": bw_source, "per_run": run_bw},
        "fma_peak": {"flops_per_s": peak[0], "source": peak[1]} if peak else None,
        "prompt_tokens": prompt_len,
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        "llm_parameter_bytes": llm_bytes,
        "bytes_per_token": bytes_per_token,
        "limit_tokens_per_s": bw / bytes_per_token,
        "rows": rows,
        "greedy_ids_match_hf": same,
        "batch_rows": batch_rows,
        "prefill_tokens": prefill_len,
        "prefill_flops": flops,
        "prefill_rows": prefill_rows,
    }


def table_lines(res: dict) -> list[str]:
    bw = res["bandwidth"]["bytes_per_s"]
    runs = [b for per_path in res["bandwidth"].get("per_run", {}).values() for b in per_path]
    lines = [
        f"C++ kernels: ISA variant {res.get('cpp_isa')}",
        f"decode, {res['prompt_tokens']}-token prompt, {res['new_tokens']} new tokens, median of {res['repeats']}; "
        f"{res['bytes_per_token'] / 1e6:.0f} MB/token at {bw / 1e9:.1f} GB/s -> limit {res['limit_tokens_per_s']:.1f} tok/s",
        "BW frac: median over the runs of each run's tok/s against the bandwidth read just before it"
        + (f" ({min(runs) / 1e9:.1f}-{max(runs) / 1e9:.1f} GB/s)" if runs else ""),
        f"{'path':<16} {'tok/s':>7} {'BW frac':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'compile s':>9} {'x generate':>10} {'x HF loop':>9}",
    ]
    for r in res["rows"]:
        lat = r["latency_ms"]
        lines.append(
            f"{r['name']:<16} {r['tokens_per_s']:>7.1f} {r['bandwidth_fraction']:>7.2f} {lat['p50']:>7.1f} "
            f"{lat['p90']:>7.1f} {lat['p99']:>7.1f} {r['compile_s']:>9.1f} {r['x_hf_generate']:>10.2f} {r['x_hf_loop']:>9.2f}"
        )
    lines.append(
        "greedy ids equal to the HF loop: "
        + ", ".join(f"{p} {'yes' if ok else 'NO'}" for p, ok in res["greedy_ids_match_hf"].items())
    )
    lines.append("")
    lines.append(f"{'batch':>5} {'path':<14} {'agg tok/s':>9} {'ms/step':>8} {'x B=1':>6} {'compile s':>9}")
    for r in res["batch_rows"]:
        lines.append(
            f"{r['batch']:>5} {r['path']:<14} {r['aggregate_tokens_per_s']:>9.1f} {r['step_ms']:>8.1f} "
            f"{r['x_batch_1']:>6.2f} {r['compile_s']:>9.1f}"
        )
    lines.append("")
    peak = res.get("fma_peak")
    lines.append(
        f"LLM prefill, {res['prefill_tokens']}-token prompt ({res['prefill_flops'] / 1e9:.2f} GFLOP): "
        + "; ".join(
            f"{r['path']} {r['ms']:.1f} ms = {r['gflops_per_s']:.1f} GFLOP/s ({r['x_hf']:.2f}x HF"
            + (f", {r['peak_fraction']:.2f} of FMA peak" if r.get("peak_fraction") is not None else "")
            + ")"
            for r in res["prefill_rows"]
        )
    )
    if peak:
        lines.append(f"FMA peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['source']})")
    return lines


def markdown_lines(res: dict) -> list[str]:
    lines = ["", "## Decode paths", "", "\n".join(table_lines(res)).join(["```\n", "\n```"]), ""]
    return lines
