"""Writers for a sweep: terminal table, JSON, CSV, markdown table and PNG plots."""

from __future__ import annotations

import csv
import json
import math
import os

from fusedvlm.benchmark.flops import STAGES
from fusedvlm.benchmark.system import write_text_atomic

COLUMNS = (
    ("n_l", "n_l", "{:d}"),
    ("n_s", "n_s", "{:d}"),
    ("llm_prompt_tokens", "LLM tok", "{:.0f}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("ttft_ms_iqr", "±IQR", "{:.1f}"),
    ("prefill_ms.vision", "vision ms", "{:.1f}"),
    ("prefill_ms.fusion", "fusion ms", "{:.1f}"),
    ("prefill_ms.llm_prefill", "LLM ms", "{:.1f}"),
    ("prefill_tflops.total", "GFLOP", "{:.2f}"),
    ("prefill_tflops_per_s.total", "GFLOP/s", "{:.1f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("decode_latency_ms.p90", "p90 ms/tok", "{:.1f}"),
    ("decode_bandwidth_fraction", "BW frac", "{:.2f}"),
    ("peak_mem_bytes", "peak MiB", "{:.0f}"),
)


def _get(row: dict, key: str):
    for part in key.split("."):
        row = row[part]
    return row


def _cell(row: dict, key: str, fmt: str) -> str:
    v = _get(row, key)
    if key == "peak_mem_bytes":
        v = v / 2**20
    elif key.startswith("prefill_tflops"):
        v = v * 1e3
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return fmt.format(v)


def table_lines(results: list[dict]) -> list[str]:
    heads = [h for _, h, _ in COLUMNS]
    cells = [[_cell(r, k, f) for k, _, f in COLUMNS] for r in results]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return lines


def markdown(payload: dict) -> str:
    env, cfg = payload["environment"], payload["config"]
    heads = [h for _, h, _ in COLUMNS]
    lines = [
        f"# fusedvlm bench: preset `{cfg['preset']}` on {env['device_name']}",
        "",
        f"git {env['git_sha']}, torch {env['torch']}, {env['torch_threads']} thread(s), dtype {cfg['dtype']}; "
        f"images {', '.join(cfg['images'])}; {cfg['questions']} question(s); {cfg['max_new_tokens']} new tokens; "
        f"{cfg['repeats']} repeat(s) per image; medians over images x repeats. "
        f"Wall time {payload['wall_time_s']:.0f} s.",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "|".join("---:" for _ in heads) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in payload["results"]]
    for title, cell in (
        ("Prefill time per stage (ms, medians):", lambda r, s: f"{r['prefill_ms'][s]:.2f}"),
        ("Prefill GFLOPs per stage (attention included):", lambda r, s: f"{r['prefill_tflops'][s] * 1e3:.3f}"),
    ):
        lines += [
            "",
            title,
            "",
            "| n_l | " + " | ".join(STAGES) + " |",
            "|" + "|".join("---:" for _ in range(len(STAGES) + 1)) + "|",
        ]
        lines += ["| " + " | ".join([str(r["n_l"])] + [cell(r, s) for s in STAGES]) + " |" for r in payload["results"]]
    bw = payload["bandwidth"]
    lines += [
        "",
        f"Memory bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['source']}); peak memory: {payload['peak_mem_method']}.",
        "",
    ]
    if "decode_path" in payload:
        lines += [
            f"LLM decode path of the sweep: {payload['decode_path']} ({payload['decode_reason']}); compiling it took "
            f"{payload['compile_s']:.1f} s, paid once and outside every timing.",
            "",
        ]
    if payload.get("decode_paths"):
        from fusedvlm.benchmark.decode import markdown_lines

        lines += markdown_lines(payload["decode_paths"])
    return "\n".join(lines)


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def write_csv(path: str, results: list[dict]) -> None:
    rows = []
    for r in results:
        flat: dict = {}
        _flatten("", r, flat)
        rows.append(flat)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_all(payload: dict, out_dir: str) -> list[str]:
    """results.json, results.csv, results.md and the PNG plots; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("results.json", "results.csv", "results.md")]
    write_text_atomic(paths[0], json.dumps(payload, indent=2, default=str))
    write_csv(paths[1], payload["results"])
    write_text_atomic(paths[2], markdown(payload))
    return paths + plot(payload, out_dir)


# ---------------------------------------------------------------------------- plots

STAGE_COLOURS = {
    "preprocess": "#8c8c8c",
    "vision": "#4c72b0",
    "merge": "#64b5cd",
    "fusion": "#dd8452",
    "projection": "#c44e52",
    "llm_prefill": "#55a868",
}


def _title(payload: dict, what: str) -> str:
    env, cfg = payload["environment"], payload["config"]
    return f"{what}\npreset {cfg['preset']}, {env['device_name']}, {env['torch_threads']} thread(s), {cfg['dtype']}"


def _log_x(ax, n_ls: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(n_ls)
    # 384, 512 and 768 sit close on a log axis: slanted labels keep them apart.
    ax.set_xticklabels([str(n) for n in n_ls], fontsize=8, rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("n_l (fused tokens for the first question)")
    ax.grid(True, alpha=0.3)


def plot(payload: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(payload["results"], key=lambda r: r["n_l"])
    n_ls = [r["n_l"] for r in rows]
    paths = []

    # Prefill time and FLOPs against n_l.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ttft = [r["ttft_ms"] for r in rows]
    a1.errorbar(
        n_ls, ttft, yerr=[r["ttft_ms_iqr"] / 2 for r in rows], marker="o", capsize=3, label="time to first token"
    )
    a1.plot(n_ls, [r["prefill_ms"]["llm_prefill"] for r in rows], marker="s", label="LLM prefill")
    a1.plot(n_ls, [r["prefill_ms"]["fusion"] for r in rows], marker="^", label="fusion decoder")
    a1.set_ylabel("milliseconds (median, bars: IQR)")
    a1.set_ylim(bottom=0)
    a1.legend(fontsize=8)
    _log_x(a1, n_ls)
    a1.set_title("prefill time", fontsize=10)
    a2.plot(n_ls, [r["prefill_tflops"]["total"] * 1e3 for r in rows], marker="o", label="total")
    a2.plot(n_ls, [r["prefill_tflops"]["llm_prefill"] * 1e3 for r in rows], marker="s", label="LLM prefill")
    a2.plot(n_ls, [r["prefill_tflops"]["fusion"] * 1e3 for r in rows], marker="^", label="fusion decoder")
    a2.set_ylabel("GFLOPs (attention included)")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=8)
    _log_x(a2, n_ls)
    a2.set_title("prefill FLOPs", fontsize=10)
    fig.suptitle(_title(payload, "Prefill vs n_l"), fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "prefill_vs_nl.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Decode speed against n_l.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.errorbar(
        n_ls,
        [r["decode_tokens_per_s"] for r in rows],
        yerr=[r["decode_tokens_per_s_iqr"] / 2 for r in rows],
        marker="o",
        capsize=3,
    )
    a1.set_ylabel("decode tokens/s (median, bars: IQR)")
    a1.set_ylim(bottom=0)
    _log_x(a1, n_ls)
    a1.set_title("decode throughput", fontsize=10)
    for key, label in (("p50", "p50"), ("p90", "p90"), ("p99", "p99")):
        a2.plot(n_ls, [r["decode_latency_ms"][key] for r in rows], marker="o", label=label)
    a2.set_ylabel("per-token latency, ms")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=8)
    _log_x(a2, n_ls)
    bw = payload["bandwidth"]["bytes_per_s"]
    frac = max(r["decode_bandwidth_fraction"] for r in rows)
    a2.set_title(f"per-token latency (bytes/token reach at most {frac:.0%} of {bw / 1e9:.0f} GB/s)", fontsize=10)
    fig.suptitle(_title(payload, "Decode vs n_l"), fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "decode_vs_nl.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Stage breakdown: time and FLOPs, stacked per n_l.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    x = list(range(len(rows)))
    for ax, key, scale, ylabel in (
        (a1, "prefill_ms", 1.0, "prefill time, ms (medians)"),
        (a2, "prefill_tflops", 1e3, "prefill GFLOPs"),
    ):
        bottom = [0.0] * len(rows)
        for s in STAGES:
            vals = [r[key][s] * scale for r in rows]
            ax.bar(x, vals, bottom=bottom, color=STAGE_COLOURS[s], label=s, width=0.7)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(x)
        ax.set_xticklabels([str(n) for n in n_ls], fontsize=8)
        ax.set_xlabel("n_l")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(STAGES), fontsize=9, frameon=False)
    a1.set_title("time per stage", fontsize=10)
    a2.set_title("FLOPs per stage", fontsize=10)
    fig.suptitle(_title(payload, "Prefill stage breakdown"), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    paths.append(os.path.join(out_dir, "stage_breakdown.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
