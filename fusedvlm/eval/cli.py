"""``fusedvlm eval``: benchmark scores at many n_l, ready for ``fusedvlm fit-scaling``."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os


def register(sub) -> None:
    from fusedvlm.cli_args import add_max_image_pixels, add_model_arguments, add_n_l_list
    from fusedvlm.eval.runner import EvalConfig
    from fusedvlm.options import add_options

    p = sub.add_parser(
        "eval",
        help="score a model on VLMEvalKit-style benchmarks across n_l (shared vision prefix)",
        description="Benchmarks in the VLMEvalKit TSV layout (MME, POPE, HallusionBench, MMBench / SEED-Bench "
        "multiple choice) at every n_l; each image's vision prefix is computed once. Writes per-item "
        "predictions (OUT/BENCH/predictions.jsonl, resumable) and their extracted answers (scored.jsonl), "
        "metrics.json, scores.csv for `fusedvlm fit-scaling`, scores.md and scores.png.",
    )
    add_model_arguments(p, required=True)
    p.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="[KIND=]FILE",
        help="a TSV; KIND (mme, pope, hallusionbench, mcq) is guessed from the file name if omitted; repeatable",
    )
    add_n_l_list(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="malformed rows: stop with their list (default) or skip them, listed in OUT/skipped.jsonl",
    )
    p.add_argument("--limit", type=int, help="only the first N items of each benchmark")
    add_max_image_pixels(p)
    # --n-l is a list above; --recompute and --max-new-tokens say the rest in the harness's terms.
    add_options(p, EvalConfig, exclude=("n_l", "shared_prefix", "max_new_tokens_yes_no", "max_new_tokens_mcq"))
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: 8 for yes/no and multiple choice)")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="recompute vision and fusion for every (question, n_l), as the authors' harness does",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="discard the predictions OUT holds from an earlier run (another model, weights, dtype, device or "
        "decode settings) instead of refusing to mix them",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)


def weights_fingerprint(path: str) -> str:
    """A fingerprint of the weights at ``path`` (a file, or every file of a model directory):
    size, modification time and a hash of the first and last 64 KiB of each file (the
    safetensors header and the tail of the data), so that weights overwritten in place, even
    with the same shapes, are told apart without reading gigabytes."""
    files = [path]
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name) for root, _, names in os.walk(path) for name in names if not name.startswith(".")
        )
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
            if st.st_size > 1 << 17:
                fh.seek(-(1 << 16), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:24]


RUN_FILES = ("predictions.jsonl", "scored.jsonl")


def discard_run(out: str) -> None:
    """--fresh: remove run.json and every benchmark's predictions and scored answers in ``out``."""
    for name in ("run.json", "metrics.json", "scores.csv", "scores.md", "skipped.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
    for entry in os.scandir(out):
        if entry.is_dir(follow_symlinks=False):
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(entry.path, name))


def _check_run_meta(out: str, meta: dict) -> None:
    """A directory's predictions belong to one model, weights, dtype, device and decode setup;
    refuse to mix (``--fresh`` discards the earlier run's)."""
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rerun with --fresh to start over") from None
        diff = sorted(k for k in set(meta) | set(old) if k != "n_l" and old.get(k) != meta.get(k))
        if diff:
            raise ValueError(
                f"{out} holds predictions of another run ({', '.join(f'{k}: {old.get(k)!r} -> {meta.get(k)!r}' for k in diff)}); "
                f"rerun with --fresh to discard them, or use another --out"
            )
        meta = {**meta, "n_l": sorted(set(old.get("n_l", [])) | set(meta["n_l"]), reverse=True)}
    from fusedvlm.outputs import write_text_atomic

    write_text_atomic(path, json.dumps(meta, indent=1))


# ---------------------------------------------------------------------- several processes
# Under torchrun each rank predicts the items of every world-th image (in file order) into its own
# OUT/BENCH/predictions.rank<R>.jsonl, so a killed run resumes per rank; rank 0 then appends them,
# in benchmark order, to predictions.jsonl (what one process writes), deletes them and scores.
def _on_every_rank(ctx, fn) -> None:
    """Run ``fn`` (on whichever ranks it acts) and raise its error on every rank, so that no
    rank waits forever for one that failed."""
    error = None
    try:
        fn()
    except (ValueError, OSError) as e:
        error = e
    if ctx.enabled:
        import torch.distributed as dist

        errors = [None] * ctx.world
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        failed = next((e for e in errors if e is not None), None)
        if error is None and failed is not None:
            raise ValueError(f"another rank failed: {failed}")
    if error is not None:
        raise error


def _rank_path(path: str, rank: int) -> str:
    return path.removesuffix(".jsonl") + f".rank{rank}.jsonl"


def _rank_files(path: str) -> list[str]:
    """Every rank's file beside ``path``, also those of a killed run with another world size."""
    import glob

    return sorted(glob.glob(glob.escape(path.removesuffix(".jsonl")) + ".rank*.jsonl"))


def _rank_store(path: str, merged, ctx):
    from fusedvlm.eval.runner import PredictionStore

    mine = _rank_path(path, ctx.rank)
    store = PredictionStore(mine)
    # What an earlier run predicted (merged, or left by any rank) counts as done and is not redone.
    for other in [merged] + [PredictionStore(f) for f in _rank_files(path) if f != mine]:
        for key, text in other.records.items():
            if key not in store.records:
                store.records[key], store.digests[key] = text, other.digests[key]
    return store


def _shard(bench, ctx):
    from dataclasses import replace

    keys = list(dict.fromkeys(it.image_key for it in bench.items))
    mine = set(keys[ctx.rank :: ctx.world])
    return replace(bench, items=[it for it in bench.items if it.image_key in mine])


def _merge_ranks(out: str, benches, n_ls, skipped: list, evaluator, ctx) -> list:
    """Wait for every rank, then (rank 0) merge their predictions; every rank's skipped rows
    and counts are gathered to rank 0. Returns the skipped rows of all ranks."""
    import torch.distributed as dist

    from fusedvlm.eval.runner import Prediction, PredictionStore

    gathered = [None] * ctx.world
    stats = (skipped, evaluator.stats.items_done, dict(evaluator.stats.seconds))
    dist.all_gather_object(gathered, stats)  # also the barrier: every rank has finished writing
    if ctx.is_main:
        for b in benches:
            path = os.path.join(out, b.name, "predictions.jsonl")
            merged = PredictionStore(path)
            files = _rank_files(path)
            found = {}
            for f in files:
                ranked = PredictionStore(f)
                found.update({k: (text, ranked.digests[k]) for k, text in ranked.records.items()})
            merged.append(
                Prediction(it.index, n, *found[(it.index, n)]) for it in b.items for n in n_ls if (it.index, n) in found
            )
            for f in files:
                os.remove(f)
        evaluator.stats.items_done = sum(g[1] for g in gathered)
        for key in evaluator.stats.seconds:
            evaluator.stats.seconds[key] = sum(g[2][key] for g in gathered)
    dist.barrier()
    unique = {(s.benchmark, s.index): s for g in gathered for s in g[0]}
    return list(unique.values())


def run_eval(args: argparse.Namespace) -> int:
    from fusedvlm.cli_args import max_image_pixels, model_config, n_l_list
    from fusedvlm.eval.data import BenchmarkError, load_benchmark
    from fusedvlm.eval.runner import EvalConfig, Skipped
    from fusedvlm.options import from_options
    from fusedvlm.outputs import check_output_dir, locked_output

    n_ls = n_l_list(args)
    max_new = (
        {}
        if args.max_new_tokens is None
        else {"max_new_tokens_yes_no": args.max_new_tokens, "max_new_tokens_mcq": args.max_new_tokens}
    )
    cfg = from_options(EvalConfig, args, n_l=n_ls, shared_prefix=not args.recompute, **max_new)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")

    benches = [load_benchmark(spec) for spec in args.benchmark]
    for b in benches:
        b.max_pixels = max_image_pixels(args)
    names = [b.name for b in benches]
    if len(set(names)) != len(names):
        raise ValueError(f"two benchmarks share a name (file stem): {names}")
    skipped: list[Skipped] = []
    for b in benches:
        if b.problems and args.on_error == "fail":
            shown = "\n  ".join(p.describe(b.path) for p in b.problems[:10])
            more = f"\n  ... and {len(b.problems) - 10} more" if len(b.problems) > 10 else ""
            raise BenchmarkError(
                f"{len(b.problems)} malformed row(s) (rerun with --on-error skip to leave them out):\n  {shown}{more}"
            )
        skipped += [Skipped(b.name, p.index, p.describe(b.path)) for p in b.problems]
        if args.limit is not None:
            b.items = b.items[: args.limit]

    model_config(args)  # its refusals (a missing or stage-1 checkpoint) before the output is touched
    check_output_dir(args.out)
    # Under torchrun rank 0 holds the output's lock for all ranks (as train does).
    lock = locked_output(args.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        return _run_locked(args, cfg, n_ls, benches, skipped)


def _run_locked(args, cfg, n_ls, benches, skipped) -> int:
    from tqdm import tqdm

    from fusedvlm.cli_args import load_model, placement
    from fusedvlm.device import dtype_name
    from fusedvlm.eval.report import benchmark_metrics, write_reports
    from fusedvlm.eval.runner import Evaluator, PredictionStore
    from fusedvlm.outputs import write_text_atomic
    from fusedvlm.train.distributed import init_distributed

    ctx = init_distributed(args.device)
    os.makedirs(args.out, exist_ok=True)
    if args.fresh:
        discard_run(args.out)
    device, dtype, llm_dtype = placement(args)
    meta = {
        "model": f"preset:{args.preset}" if args.preset else os.path.abspath(args.checkpoint),
        "weights": None if args.preset else weights_fingerprint(args.checkpoint),
        "seed": args.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "shared_prefix": cfg.shared_prefix,
        "decode": "greedy",
        "max_new_tokens_yes_no": cfg.max_new_tokens_yes_no,
        "max_new_tokens_mcq": cfg.max_new_tokens_mcq,
        "llm_batch_size": cfg.llm_batch_size,
        "n_l": list(n_ls),
    }
    # Recorded only when set, so that the run.json of earlier runs, which lack them, still matches.
    if llm_dtype is not None:
        meta["llm_dtype"] = dtype_name(llm_dtype)
    if args.llm_quant != "none":
        meta["llm_quant"] = args.llm_quant
    _on_every_rank(ctx, lambda: _check_run_meta(args.out, meta) if ctx.is_main else None)
    model = load_model(args, local_rank=ctx.local_rank)
    evaluator = Evaluator(model, cfg)

    stores = {}
    for b in benches:
        path = os.path.join(args.out, b.name, "predictions.jsonl")
        stores[b.name] = _rank_store(path, PredictionStore(path), ctx) if ctx.enabled else PredictionStore(path)
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()  # every rank has read the others' files before any rank appends to its own
    for b in benches:
        store = stores[b.name]
        b = _shard(b, ctx) if ctx.enabled else b
        total = sum(not store.done(it, n) for it in b.items for n in n_ls)
        desc = b.name if not ctx.enabled else f"{b.name} [rank {ctx.rank}/{ctx.world}]"
        with tqdm(total=total, unit="item", desc=desc, disable=args.no_progress) as bar:
            evaluator.run(b, store, args.on_error, skipped.append, bar)
    if ctx.enabled:
        skipped = _merge_ranks(args.out, benches, n_ls, skipped, evaluator, ctx)
        if not ctx.is_main:
            return 0
        stores = {b.name: PredictionStore(os.path.join(args.out, b.name, "predictions.jsonl")) for b in benches}

    results = {}
    for b in benches:
        predictions = stores[b.name].predictions(b.items, n_ls)
        results[b.name] = {
            "kind": b.kind,
            "path": os.path.abspath(b.path),
            "per_n": benchmark_metrics(b, predictions, n_ls, os.path.join(args.out, b.name, "scored.jsonl")),
        }
    write_text_atomic(
        os.path.join(args.out, "skipped.jsonl"),
        "".join(
            json.dumps({"benchmark": s.benchmark, "index": s.index, "error": s.error}, ensure_ascii=False) + "\n"
            for s in skipped
        ),
    )
    rows = write_reports(args.out, results, len(skipped), plot=not args.no_plot)
    t = evaluator.stats.seconds
    print(
        f"{evaluator.stats.items_done} (item, n_l) predictions in {sum(t.values()):.1f} s "
        f"(vision {t['vision']:.1f}, fusion {t['fusion']:.1f}, llm {t['llm']:.1f}); {len(skipped)} skipped"
    )
    print(open(os.path.join(args.out, "scores.md"), encoding="utf-8").read().rstrip())
    print(
        f"wrote {args.out}/scores.csv ({len(rows)} rows): next, fusedvlm fit-scaling {os.path.join(args.out, 'scores.csv')}"
    )
    return 0
