"""The evaluation harness itself: a 10-point n_l sweep, shared vision prefix vs recomputing
everything for every (question, n_l).

A synthetic yes/no benchmark (POPE-style questions, two per image) over the bundled sample
photos at 640x480 (5 HD views on ``smol``), evaluated at the paper's n_l = 768 ... 1, in the
same process:

* **fusion side** (``--images`` images): everything that makes the fused tokens - vision tower,
  merge, fusion decoder, projection. ``shared``: each image encoded once and its fusion KV
  prefix reused by its questions at every n_l (packed); ``recompute``: the authors' harness,
  the whole image -> fused-token pipeline once per (question, n_l). Fused tokens compared.
* **end to end** (``--answer-images`` images, the first ones): the same plus the LLM's greedy
  answers (``--max-new-tokens``). ``shared`` also decodes its answers in batches
  (``--llm-batch-size``); ``recompute`` answers one prompt at a time. Predictions compared.
  The LLM prefill (up to ~800 prompt tokens at n_l = 768) costs the same in both modes and
  bounds this ratio; the per-stage seconds are printed so the split is visible.

    OMP_NUM_THREADS=2 python bench/bench_eval.py            # ~5 min on 2 cores (smol)
    OMP_NUM_THREADS=2 python bench/bench_eval.py --quick    # ~1 min check
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from fusedvlm.benchmark.system import environment, print_table, save_json

PAPER_N_L = (768, 512, 384, 256, 128, 64, 32, 16, 8, 1)
OBJECTS = ("cat", "person", "cup", "car", "rocket", "dog", "chair", "book", "tree", "boat", "clock", "bird")
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle", "grace_hopper", "hubble_deep_field", "camera")


def make_benchmark(num_images: int, questions_per_image: int):
    """Distinct 640x480 images (crops of the sample photos) with POPE-style questions."""
    from fusedvlm.eval.data import Benchmark, Item, _yes_no_prompt
    from fusedvlm.samples import sample_image

    images, items = {}, []
    for i in range(num_images):
        photo = sample_image(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        w, h = photo.size
        k = i // len(PHOTOS)  # later rounds: a shifted crop, so every image is distinct
        crop = photo.crop((k * w // 16, k * h // 16, w - (k % 3) * w // 16, h - (k % 2) * h // 16)).resize((640, 480))
        key = f"img{i}"
        images[key] = crop
        for j in range(questions_per_image):
            q = f"Is there a {OBJECTS[(i + 5 * j) % len(OBJECTS)]} in the image?"
            items.append(
                Item(
                    f"{i}-{j}", key, q, _yes_no_prompt(q), "Yes" if (i + j) % 2 else "No", "random", {"split": "random"}
                )
            )
    bench = Benchmark("synthetic-pope", "pope", "<memory>", items, {k: ("memory", k) for k in images}, [])
    bench.open_image = images.__getitem__  # in memory: decoding is not what is measured
    return bench


def fusion_side(evaluator, bench, n_ls):
    keys = list(bench.images)
    fused = {}
    for b in range(0, len(keys), evaluator.cfg.images_per_batch):
        batch = keys[b : b + evaluator.cfg.images_per_batch]
        prompts = [[it.prompt for it in bench.items if it.image_key == k] for k in batch]
        out = evaluator.fused_tokens(
            [bench.open_image(k) for k in batch], prompts, [[list(n_ls)] * len(p) for p in prompts]
        )
        for k, per_image in zip(batch, out):
            for j, per_n in enumerate(per_image):
                for n, t in per_n.items():
                    fused[(k, j, n)] = t
    return fused


class Clock:
    """Wall and CPU seconds of a block: on a shared machine the CPU time of this process
    (OMP_NUM_THREADS=1) is the steadier measure of work; on a quiet one the wall time counts."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main(argv=None) -> int:
    from fusedvlm.eval.runner import EvalConfig
    from fusedvlm.options import add_options

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smol")
    p.add_argument("--images", type=int, default=24, help="images of the fusion-side sweep")
    p.add_argument("--answer-images", type=int, default=2, help="images of the end-to-end sweep (with LLM answers)")
    p.add_argument("--questions-per-image", type=int, default=2)
    p.add_argument("--n-l", default=",".join(map(str, PAPER_N_L)))
    add_options(p, EvalConfig, only=("images_per_batch", "llm_batch_size"))
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="4 images fusion side, 1 image end to end, n_l 256,64,8,1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/eval.json")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.answer_images, args.n_l = 4, 1, "256,64,8,1"
    from fusedvlm.cli_args import parse_n_l

    n_ls = parse_n_l(args.n_l)
    if min(args.images, args.answer_images, args.questions_per_image) < 1:
        raise SystemExit("--images, --answer-images and --questions-per-image must be >= 1")

    from fusedvlm.eval.runner import Evaluator, PredictionStore
    from fusedvlm.model import FusedVLM

    threads = os.environ.get("OMP_NUM_THREADS", "?")
    command = f"OMP_NUM_THREADS={threads} python bench/bench_eval.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    torch.manual_seed(args.seed)
    model = FusedVLM.from_preset(args.preset).eval()
    q = args.questions_per_image
    print(f"preset={args.preset} threads={torch.get_num_threads()} n_l={list(n_ls)} questions/image={q}", flush=True)

    def evaluator(shared: bool) -> Evaluator:
        return Evaluator(
            model,
            EvalConfig(
                n_l=n_ls,
                shared_prefix=shared,
                images_per_batch=args.images_per_batch,
                llm_batch_size=args.llm_batch_size if shared else 1,
                max_new_tokens_yes_no=args.max_new_tokens,
            ),
        )

    # Warm-up (allocator, tokenizers, first-call paths) on one image, both modes.
    warm = make_benchmark(1, 1)
    for shared in (True, False):
        fusion_side(Evaluator(model, EvalConfig(n_l=(n_ls[-1],), shared_prefix=shared)), warm, (n_ls[-1],))

    # ---- fusion side
    fusion_bench = make_benchmark(args.images, q)
    rows, fused, seconds, cpu = [], {}, {}, {}
    for shared in (True, False):  # shared first: any leftover warm-up effect favours the baseline
        ev = evaluator(shared)
        with Clock() as c:
            fused[shared] = fusion_side(ev, fusion_bench, n_ls)
        seconds[shared], cpu[shared] = c.wall, c.cpu
        mode = "shared" if shared else "recompute"
        rows.append(
            dict(
                part="fusion side",
                mode=mode,
                pairs=len(fused[shared]),
                seconds=c.wall,
                cpu_s=c.cpu,
                vision_s=ev.stats.seconds["vision"],
                fusion_s=ev.stats.seconds["fusion"],
                llm_s=0.0,
            )
        )
        print(f"fusion side, {mode}: {c.wall:.1f} s (cpu {c.cpu:.1f} s)", flush=True)
    diff = max(float((fused[True][k] - fused[False][k]).abs().max()) for k in fused[True])
    fusion_ratio, fusion_cpu_ratio = seconds[False] / seconds[True], cpu[False] / cpu[True]

    # ---- end to end
    e2e = make_benchmark(args.answer_images, q)
    preds, e2e_s, e2e_cpu = {}, {}, {}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for shared in (True, False):
            ev = evaluator(shared)
            store = PredictionStore(os.path.join(tmp, f"{shared}.jsonl"))
            with Clock() as c:
                ev.run(e2e, store)
            e2e_s[shared], e2e_cpu[shared] = c.wall, c.cpu
            preds[shared] = store.records
            mode = "shared" if shared else "recompute"
            rows.append(
                dict(
                    part="end to end",
                    mode=mode,
                    pairs=len(store.records),
                    seconds=c.wall,
                    cpu_s=c.cpu,
                    vision_s=ev.stats.seconds["vision"],
                    fusion_s=ev.stats.seconds["fusion"],
                    llm_s=ev.stats.seconds["llm"],
                )
            )
            print(f"end to end, {mode}: {c.wall:.1f} s (cpu {c.cpu:.1f} s)", flush=True)
    same = preds[True] == preds[False]
    e2e_ratio, e2e_cpu_ratio = e2e_s[False] / e2e_s[True], e2e_cpu[False] / e2e_cpu[True]

    print_table(
        rows,
        ["part", "mode", "pairs", "seconds", "cpu_s", "vision_s", "fusion_s", "llm_s"],
        title="(question, n_l) pairs",
    )
    print(
        f"\nfusion side: {args.images} images x {q} questions x {len(n_ls)} n_l = {len(fused[True])} pairs: "
        f"recompute {seconds[False]:.1f} s, shared {seconds[True]:.1f} s -> {fusion_ratio:.2f}x "
        f"(cpu time {fusion_cpu_ratio:.2f}x; fused tokens max |diff| {diff:.2g})"
    )
    print(
        f"end to end: {args.answer_images} images x {q} questions x {len(n_ls)} n_l = {len(preds[True])} answers: "
        f"recompute {e2e_s[False]:.1f} s, shared {e2e_s[True]:.1f} s -> {e2e_ratio:.2f}x "
        f"(cpu time {e2e_cpu_ratio:.2f}x); identical predictions: {same}"
    )
    save_json(
        args.out,
        dict(
            command=command,
            env=environment(),
            args=vars(args),
            rows=rows,
            summary=dict(
                fusion_side_ratio=fusion_ratio,
                end_to_end_ratio=e2e_ratio,
                fusion_side_cpu_ratio=fusion_cpu_ratio,
                end_to_end_cpu_ratio=e2e_cpu_ratio,
                fused_max_abs_diff=diff,
                identical_predictions=same,
            ),
        ),
    )
    print(f"saved {args.out}")
    return 0 if same and diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
