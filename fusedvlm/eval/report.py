"""Metrics of stored predictions, and the outputs: metrics.json, scores.csv in the
``(n, score, group)`` shape of ``fusedvlm fit-scaling``, scores.md and a score-vs-n_l plot."""

from __future__ import annotations

import csv
import io
import json
import math
import os

from fusedvlm.eval.data import Benchmark
from fusedvlm.eval.metrics import HEADLINE, METRICS, score_item
from fusedvlm.outputs import write_text_atomic


def benchmark_metrics(
    bench: Benchmark, predictions: dict[tuple[str, int], str], n_ls, scored_path: str | None = None
) -> dict[int, dict]:
    """{n_l: {"items": k, "metrics": {split: {metric: value}}}} over the items predicted at n_l.
    With ``scored_path`` every (item, n_l) is also written there as JSONL with the extracted
    answer and whether it is right: what to read when a score looks wrong."""
    out, lines = {}, []
    for n in n_ls:
        scored = [
            score_item(it, predictions[(it.index, n)], bench.yes_no)
            for it in bench.items
            if (it.index, n) in predictions
        ]
        if scored:
            out[n] = {"items": len(scored), "metrics": METRICS[bench.kind](scored)}
        lines += [
            json.dumps(
                {
                    "index": s.item.index,
                    "n_l": n,
                    "prediction": predictions[(s.item.index, n)],
                    "extracted": s.extracted,
                    "answer": s.item.answer,
                    "correct": s.correct,
                },
                ensure_ascii=False,
            )
            for s in scored
        ]
    if scored_path is not None:
        write_text_atomic(scored_path, "".join(line + "\n" for line in lines))
    return out


def headline_rows(name: str, kind: str, per_n: dict[int, dict]) -> list[dict]:
    """Rows (n, score, group, items) of the benchmark's headline metrics."""
    rows = []
    for n, res in sorted(per_n.items(), reverse=True):
        pairs = list(HEADLINE[kind])
        if kind == "mcq" and "circular_acc" in res["metrics"]["Overall"]:
            pairs.append(("Overall", "circular_acc"))
        for split, metric in pairs:
            value = res["metrics"].get(split, {}).get(metric)
            if value is not None and not math.isnan(value):
                rows.append({"n": n, "score": round(value, 4), "group": f"{name}/{metric}", "items": res["items"]})
    return rows


def write_scores_csv(rows: list[dict], path: str) -> None:
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=["n", "score", "group", "items"])
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, text.getvalue())


def markdown_table(rows: list[dict]) -> str:
    ns = sorted({r["n"] for r in rows}, reverse=True)
    groups = list(dict.fromkeys(r["group"] for r in rows))
    value = {(r["group"], r["n"]): r["score"] for r in rows}
    lines = ["| score | " + " | ".join(f"n_l={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for g in groups:
        cells = [f"{value[(g, n)]:.2f}" if (g, n) in value else "-" for n in ns]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(r["group"].split("/")[0] for r in rows))
    fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for g in dict.fromkeys(r["group"] for r in rows if r["group"].split("/")[0] == bench):
            pts = sorted((r["n"], r["score"]) for r in rows if r["group"] == g)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=g.split("/", 1)[1])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n_l (fused tokens)")
        ax.set_ylabel("score")
        ax.set_title(bench)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(out_dir: str, results: dict[str, dict], skipped: int, plot: bool = True) -> list[dict]:
    """results: {bench name: {"kind", "path", "per_n"}} -> metrics.json, scores.csv, scores.md (+ scores.png)."""
    rows = [r for name, res in results.items() for r in headline_rows(name, res["kind"], res["per_n"])]
    metrics = json.dumps({"skipped_items": skipped, "benchmarks": results}, indent=1, default=str)
    write_text_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    write_scores_csv(rows, os.path.join(out_dir, "scores.csv"))
    table = markdown_table(rows) if rows else "no scores\n"
    if skipped:
        table += f"\n{skipped} item(s) skipped: see skipped.jsonl\n"
    write_text_atomic(os.path.join(out_dir, "scores.md"), table)
    if plot and rows:
        plot_scores(rows, os.path.join(out_dir, "scores.png"))
    return rows
