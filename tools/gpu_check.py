"""``make gpu-check``: everything a CUDA machine should confirm, in one command (< 8 min on one H100/H200).

Steps, each a subprocess with its own time limit, each a row of ``summary.md`` / ``summary.json``
in ``bench/results/<gpu-name>/`` next to its own log and results:

  install        fusedvlm importable from this checkout (``pip install --no-deps --no-build-isolation -e .``
                 when it is not; ``--wheels DIR`` installs missing dependencies from local wheels, for
                 machines without a package index)
  cuda-tests     tests/kernels (all three kernels natively vs the fp64 references, and the interpreter
                 tile tests in their own subprocess) + tests/test_mixed_precision.py
  local-merge    bench/bench_local_merge.py: vs F.conv2d and the eager chain, fp32/fp16/bf16
  packed-attn    bench/bench_packed_attention.py: vs dense masked SDPA, per-segment SDPA, FlexAttention,
                 flash-attn varlen, xformers BlockDiagonalCausalMask (rows say "skipped: not installed")
  pairwise       bench/bench_pairwise_cosine.py
  paper-bench    fusedvlm bench --preset paper --n-l 768,256,64,1 (needs open_clip for the vision tower)
  fusion-train   30 bf16-autocast AdamW steps of the paper-shaped fusion module (merge, 20-layer decoder,
                 projection) on random CLIP-shaped tokens: step time, tokens/s, peak memory, losses

Without CUDA it stops at once with exit status 2 and says so; it never reports a CPU run as a GPU check.

    python tools/gpu_check.py [--out DIR] [--only STEP ...] [--wheels DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

from steps import ROOT, Row, Step, installed, run_step, slug

# Optional comparison libraries of the kernel benchmarks: a row each, run or "skipped: not installed".
OPTIONAL = {"flash_attn": "flash-attn varlen", "xformers": "xformers BlockDiagonalCausalMask"}


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (a results folder name)."""
    return slug(name, "unknown-gpu")


def plan(out: str, python: str = sys.executable) -> list[Step]:
    """The steps in order, writing under ``out``. The time limits sum to under 8 min; on an H100
    the steps take well under them."""
    bench = os.path.join(ROOT, "bench")
    tests = ["tests/kernels"]
    if installed("open_clip"):
        tests.append("tests/test_mixed_precision.py")  # whole models: the vision tower is open_clip's
    # Most of the tests' time is Triton compiling each kernel for each tile configuration and
    # dtype (single-threaded per process): with pytest-xdist the compiles spread over the cores.
    workers = ["-n", str(min(8, os.cpu_count() or 1))] if installed("xdist") and (os.cpu_count() or 1) >= 4 else []
    return [
        Step(
            "cuda-tests",
            [
                python,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *workers,
                f"--junitxml={out}/cuda-tests.xml",
                *tests,
            ],
            125,
            outputs=["cuda-tests.xml"],
        ),
        Step(
            "local-merge",
            [python, f"{bench}/bench_local_merge.py", "--repeats", "20", "--out", f"{out}/local_merge.json"],
            25,
            outputs=["local_merge.json"],
        ),
        Step(
            "packed-attn",
            [
                python,
                f"{bench}/bench_packed_attention.py",
                "--samples",
                "2",
                "8",
                "--backward-samples",
                "2",
                "--repeats",
                "5",
                "--out",
                f"{out}/packed_attention.json",
            ],
            55,
            outputs=["packed_attention.json"],
        ),
        Step(
            "pairwise",
            [
                python,
                f"{bench}/bench_pairwise_cosine.py",
                "--dtype",
                "bfloat16",
                "--out",
                f"{out}/pairwise_cosine.json",
            ],
            15,
            outputs=["pairwise_cosine.json"],
        ),
        Step(
            "paper-bench",
            [
                python,
                "-m",
                "fusedvlm.cli",
                "bench",
                "--preset",
                "paper",
                "--n-l",
                "768,256,64,1",
                "--device",
                "cuda",
                "--dtype",
                "bf16",
                "--images",
                "astronaut",
                "chelsea",
                "--max-new-tokens",
                "64",
                "--repeats",
                "2",
                "--decode-compare",
                "none",
                "--quiet",
                "--out",
                f"{out}/paper-bench",
            ],
            120,
            needs=("open_clip",),
            outputs=["paper-bench"],
        ),
        # The 7B LLM's decode paths side by side (target: >= 70 % of the HBM bandwidth limit).
        Step(
            "decode",
            [
                python,
                f"{bench}/bench_decode.py",
                "--preset",
                "paper",
                "--device",
                "cuda",
                "--new-tokens",
                "128",
                "--repeats",
                "2",
                "--batches",
                "1,4,16",
                "--out",
                f"{out}/decode.json",
            ],
            95,
            outputs=["decode.json"],
        ),
        Step(
            "fusion-train",
            [python, os.path.abspath(__file__), "--fusion-train", f"{out}/fusion_train.json"],
            40,
            outputs=["fusion_train.json"],
        ),
    ]


def install(wheels: str | None, out: str) -> Row:
    """Make ``import fusedvlm`` resolve to this checkout, offline."""
    t0 = time.perf_counter()
    log = os.path.join(out, "install.log")
    cmds = []
    if wheels:
        need = [pkg for mod, pkg in (("open_clip", "open_clip_torch"), ("ftfy", "ftfy")) if not installed(mod)]
        if need:
            cmds.append([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, *need])
    probe = subprocess.run(
        [sys.executable, "-c", "import fusedvlm, os; print(os.path.dirname(fusedvlm.__file__))"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    if probe.returncode != 0 or os.path.realpath(probe.stdout.strip()) != os.path.join(
        os.path.realpath(ROOT), "fusedvlm"
    ):
        cmds.append([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ROOT])
    status = "ok (already installed)" if not cmds else "ok"
    with open(log, "w") as fh:
        for cmd in cmds:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc:
                status = f"failed (rc {rc})"
                break
    return Row("install", status, round(time.perf_counter() - t0, 1), os.path.relpath(log, out))


def optional_rows() -> list[Row]:
    return [
        Row(
            f"packed-attn: {label}",
            "ok: installed, in packed_attention.json" if installed(mod) else "skipped: not installed",
            0.0,
        )
        for mod, label in OPTIONAL.items()
    ]


def write_summary(rows: list[Row], out: str, header: dict) -> None:
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(dict(header, steps=[asdict(r) for r in rows]), f, indent=1)
    lines = [
        f"# gpu-check on {header['gpu']}",
        "",
        f"torch {header['torch']}, triton {header['triton']}, CUDA {header['cuda']}, git {header['git']}, "
        f"total {header['total_s']} s",
        "",
        "| step | status | seconds | log | outputs |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.step} | {r.status} | {r.seconds} | {r.log or ''} | {', '.join(r.outputs)} |" for r in rows]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- fusion training


def fusion_training(
    steps: int = 30,
    device: str = "cuda",
    preset: str = "paper",
    images: int = 4,
    views: int = 10,
    questions: int = 2,
    question_tokens: int = 12,
    n_l: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    autocast_dtype=None,
) -> dict:
    """AdamW steps of the preset's fusion module under autocast on random CLIP-shaped patch tokens
    (``views`` per image, the preset's grid and width) and random question ids; the loss is the MSE
    of the projected fused tokens to a fixed random target, so it must fall."""
    import torch
    import torch.nn.functional as F

    from fusedvlm.config import get_preset
    from fusedvlm.model.fusion_module import FusionModule

    autocast_dtype = autocast_dtype or torch.bfloat16
    cfg = get_preset(preset, n_l=n_l)
    torch.manual_seed(seed)
    module = FusionModule(cfg.fusion_module(cfg.llm.hidden_size)).to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    g = torch.Generator(device="cpu").manual_seed(seed)
    grid = cfg.vision.grid
    patches = torch.randn(images * views, grid * grid, cfg.vision.width, generator=g).to(device)
    vocab = cfg.fusion.text_vocab_size - 2  # leave CLIP's start/end ids out
    qids = [
        [torch.randint(1, vocab, (question_tokens,), generator=g).tolist() for _ in range(questions)]
        for _ in range(images)
    ]
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    target = None
    for _ in range(steps):
        if on_cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype):
            fused = module.fuse(module.merge_views(patches, [views] * images), qids)
        if target is None:
            target = torch.randn(fused.tokens.shape, generator=g).to(device)
        loss = F.mse_loss(fused.tokens.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    stream = images * (views * cfg.tokens_per_view + questions * question_tokens) + fused.tokens.shape[0]
    steady = sorted(times[1:] or times)
    median = steady[len(steady) // 2]
    result = dict(
        preset=preset,
        steps=steps,
        images=images,
        views_per_image=views,
        questions=questions,
        n_l=n_l,
        autocast=str(autocast_dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in module.parameters()),
        fusion_stream_tokens=stream,
        first_step_s=times[0],
        median_step_s=median,
        tokens_per_s=stream / median,
        losses=losses,
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None,
    )
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise RuntimeError(f"non-finite loss in fusion training: {losses}")
    if not losses[-1] < losses[0]:
        raise RuntimeError(f"fusion training did not lower its loss: {losses[0]:.4g} -> {losses[-1]:.4g}")
    return result


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results folder (default bench/results/<gpu-name>)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps (install always runs)")
    p.add_argument(
        "--wheels",
        default=None,
        help="a folder of wheels for missing dependencies (open_clip_torch, ftfy) on offline machines",
    )
    p.add_argument("--fusion-train", metavar="JSON", help=argparse.SUPPRESS)  # the fusion-train step's own process
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-check: needs a CUDA GPU, and torch.cuda.is_available() is False here; nothing was run", file=sys.stderr
        )
        return 2
    if args.fusion_train:
        result = fusion_training()
        with open(args.fusion_train, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
        return 0

    gpu = torch.cuda.get_device_name(0)
    out = os.path.abspath(args.out or os.path.join(ROOT, "bench", "results", gpu_slug(gpu)))
    os.makedirs(out, exist_ok=True)
    steps = plan(out)
    unknown = set(args.only or ()) - {s.name for s in steps}
    if unknown:
        raise SystemExit(f"gpu-check: unknown step(s) {sorted(unknown)}; steps: {[s.name for s in steps]}")
    t0 = time.perf_counter()
    rows = [install(args.wheels, out)]
    print(f"gpu-check on {gpu}: results in {out}", flush=True)
    if rows[0].status.startswith("ok"):
        for step in steps:
            if args.only and step.name not in args.only:
                continue
            rows.append(run_step(step, out))
            print(f"  {step.name:<14} {rows[-1].status} ({rows[-1].seconds} s)", flush=True)
    rows += optional_rows()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    header = dict(
        gpu=gpu,
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        git=git or "unknown",
        total_s=round(time.perf_counter() - t0, 1),
    )
    write_summary(rows, out, header)
    print(f"gpu-check: {header['total_s']} s; summary in {os.path.join(out, 'summary.md')}")
    failed = [r for r in rows if not (r.status.startswith("ok") or r.status.startswith("skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
