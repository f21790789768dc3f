"""``fusedvlm bench``: the n_l sweep of SPEC section 9 on one preset."""

from __future__ import annotations

import argparse

DEFAULT_OUT = "out/bench"
# On a CPU the paper's 256 new tokens per run would dominate the sweep's time budget; decode
# speed per token is already stable over a few dozen tokens.
CPU_MAX_NEW_TOKENS = 32
GPU_MAX_NEW_TOKENS = 256
# Presets above this many parameters take hours per sweep on a CPU.
CPU_MAX_PARAMETERS = 1_000_000_000


def register(sub) -> None:
    from fusedvlm.config import PAPER_N_L, PRESETS

    p = sub.add_parser(
        "bench", help="n_l sweep: TTFT, prefill time/FLOPs per stage, decode speed, memory",
        description="Sweep n_l over the paper's configuration space and write JSON, CSV, markdown and PNG plots.",
    )
    p.add_argument("--preset", default="smol", choices=sorted(PRESETS),
                   help="model preset (default smol: the largest that sweeps in about 5 min on a 2-core CPU; use paper on a GPU)")
    p.add_argument("--n-l", default=",".join(map(str, PAPER_N_L)),
                   help="comma-separated n_l values (default: the paper's 768,...,1; values the preset's fusion decoder cannot hold are skipped)")
    p.add_argument("--n-s", type=int, default=None, help="fused tokens of later questions, capped at n_l (default: SPEC rule, 8 or n_l)")
    p.add_argument("--questions", type=int, default=1, help="questions per image (turn 1 gets n_l fused tokens, later turns n_s)")
    p.add_argument("--images", nargs="+", default=None,
                   help="sample names (fusedvlm.samples) or image files (default: astronaut chelsea grace_hopper page)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens decoded per answer, EOS ignored (default {GPU_MAX_NEW_TOKENS} on GPU, {CPU_MAX_NEW_TOKENS} on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per (image, n_l) (default 3 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed full runs after the FLOP pass (which already warms every shape)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    from fusedvlm.commands import add_decode_args

    add_decode_args(p)
    p.add_argument("--decode-compare", default="1,4,16", metavar="BATCHES",
                   help="after the sweep, decode with every path on one prompt and step these batch sizes "
                        "together (comma-separated; 'none' skips it)")
    p.add_argument("--decode-new-tokens", type=int, default=None,
                   help="tokens per run of the decode comparison (default 256 on GPU, 64 on CPU)")
    p.set_defaults(func=run_bench)


def parse_n_l(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--n-l must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError("--n-l is empty")
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"--n-l values must be >= 1, got {bad}")
    return values


def resolve_n_l(values: list[int], max_queries: int, explicit: bool, preset: str) -> tuple[list[int], list[int]]:
    """(kept, skipped): the fusion decoder holds n_l - 1 query tokens at most."""
    kept = [v for v in values if v - 1 <= max_queries]
    skipped = [v for v in values if v - 1 > max_queries]
    if skipped and explicit:
        raise ValueError(f"preset {preset!r} has {max_queries} query tokens, so n_l <= {max_queries + 1}; got {skipped}")
    if not kept:
        raise ValueError(f"no n_l value fits preset {preset!r} (n_l <= {max_queries + 1})")
    return kept, skipped


def load_images(specs: list[str]) -> list[tuple[str, object]]:
    import os

    from fusedvlm.preprocess import load_image
    from fusedvlm.samples import SAMPLE_NAMES, sample_image

    out = []
    for spec in specs:
        if spec in SAMPLE_NAMES:
            out.append((spec, sample_image(spec)))
        elif os.path.exists(spec):
            out.append((os.path.basename(spec), load_image(spec)))
        else:
            raise FileNotFoundError(f"--images: {spec!r} is neither a sample ({', '.join(SAMPLE_NAMES)}) nor a file")
    return out


def run_bench(args: argparse.Namespace) -> int:
    import time

    t_start = time.perf_counter()
    import torch

    from fusedvlm.benchmark.report import table_lines, write_all
    from fusedvlm.benchmark.sweep import DEFAULT_IMAGES, SweepConfig, run_sweep
    from fusedvlm.benchmark.system import check_fits, environment
    from fusedvlm.config import get_preset
    from fusedvlm.model.vlm import FusedVLM

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is available")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    cfg_model = get_preset(args.preset)
    n_ls, skipped = resolve_n_l(parse_n_l(args.n_l), cfg_model.fusion.max_queries, args.n_l != _default_n_l(), args.preset)
    if args.n_s is not None and args.n_s < 1:
        raise ValueError(f"--n-s must be >= 1, got {args.n_s}")
    sweep_cfg = SweepConfig(
        preset=args.preset, n_l=tuple(n_ls), n_s=args.n_s, questions=args.questions,
        max_new_tokens=args.max_new_tokens or (GPU_MAX_NEW_TOKENS if device.type == "cuda" else CPU_MAX_NEW_TOKENS),
        repeats=args.repeats or (3 if device.type == "cuda" else 2), warmup=args.warmup,
        decode=args.decode, compile=False if args.no_compile else None,
    )
    decode_batches = parse_batches(args.decode_compare)
    images = load_images(args.images or list(DEFAULT_IMAGES))
    req = check_fits(args.preset, device, dtype)
    if device.type == "cpu" and req["parameters"] > CPU_MAX_PARAMETERS:
        raise ValueError(
            f"preset {args.preset!r} has {req['parameters'] / 1e9:.1f} B parameters: a CPU sweep would take hours; "
            f"run it on a GPU (--device cuda) or pick a smaller preset"
        )
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if skipped:
        print(f"preset {args.preset}: skipping n_l {skipped} (its fusion decoder has {cfg_model.fusion.max_queries} query tokens)")

    torch.manual_seed(args.seed)
    model = FusedVLM(cfg_model).eval().to(device=device, dtype=dtype)
    env = environment(device)
    log(f"fusedvlm bench: preset {args.preset} ({req['parameters'] / 1e6:.1f} M parameters) on {env['device_name']}, "
        f"{env['torch_threads']} thread(s), {dtype_name}; n_l {n_ls}; {len(images)} image(s) x {sweep_cfg.repeats} repeat(s), "
        f"{sweep_cfg.max_new_tokens} new tokens")
    sweep = run_sweep(model, images, sweep_cfg, log)
    decode_paths = None
    if decode_batches:
        from fusedvlm.benchmark.decode import DecodeBenchConfig, prompt_embeds, run_decode_bench
        from fusedvlm.decoding import compile_default

        decode_cfg = DecodeBenchConfig(
            new_tokens=args.decode_new_tokens or (256 if device.type == "cuda" else 64),
            repeats=3, batches=decode_batches, compile=not args.no_compile and compile_default(),
        )
        bw = sweep["bandwidth"]
        decode_paths = run_decode_bench(model.llm, prompt_embeds(model.llm, model.layout), decode_cfg, log,
                                        bandwidth=(bw["bytes_per_s"], bw["source"]), engine_for=model.decode_engine)
    payload = {
        "environment": env,
        "config": {
            "preset": args.preset, "n_l": n_ls, "n_s": args.n_s, "questions": args.questions,
            "images": [name for name, _ in images], "image_sizes": [list(im.size) for _, im in images],
            "max_new_tokens": sweep_cfg.max_new_tokens, "repeats": sweep_cfg.repeats, "warmup": sweep_cfg.warmup,
            "dtype": dtype_name, "seed": args.seed, "parameters": req["parameters"], "ignore_eos": True,
        },
        **sweep,
        "decode_paths": decode_paths,
        "wall_time_s": time.perf_counter() - t_start,
    }
    print()
    print("\n".join(table_lines(payload["results"])))
    worst = max(abs(r["fusion_llm_flops_rel_diff"]) for r in payload["results"])
    print(f"\nFLOP check: fusion + projection + LLM prefill counted vs closed form, worst relative difference {worst:.2e}")
    print(f"decode path of the sweep: {sweep['decode_path']} ({sweep['decode_reason']}); compile {sweep['compile_s']:.1f} s, paid once, not in any timing")
    if decode_paths is not None:
        from fusedvlm.benchmark.decode import table_lines as decode_table

        print()
        print("\n".join(decode_table(decode_paths)))
    paths = write_all(payload, args.out)
    print(f"\nwall time {payload['wall_time_s']:.0f} s; wrote {', '.join(paths)}")
    return 0


def parse_batches(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--decode-compare must be comma-separated batch sizes or 'none', got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--decode-compare batch sizes must be >= 1, got {text!r}")
    return values


def _default_n_l() -> str:
    from fusedvlm.config import PAPER_N_L

    return ",".join(map(str, PAPER_N_L))
