"""``fusedvlm bench``: the n_l sweep of design §9 on one preset."""

from __future__ import annotations

import argparse

DEFAULT_OUT = "out/bench"
# On a CPU the paper's 256 new tokens per run (SweepConfig's defaults are the GPU's) would
# dominate the sweep's time budget; decode speed per token is already stable over a few dozen
# tokens.
CPU_SWEEP_DEFAULTS = {"max_new_tokens": 32, "repeats": 2}
# Presets above this many parameters take hours per sweep on a CPU.
CPU_MAX_PARAMETERS = 1_000_000_000


def register(sub) -> None:
    from fusedvlm.benchmark.sweep import SweepConfig
    from fusedvlm.cli_args import add_decode_args, add_model_arguments, add_n_l_list
    from fusedvlm.options import add_options

    p = sub.add_parser(
        "bench",
        help="n_l sweep: TTFT, prefill time/FLOPs per stage, decode speed, memory",
        description="Sweep n_l over the paper's configuration space and write JSON, CSV, markdown and PNG plots. "
        "The default preset, smol, is the largest that sweeps in about 5 min on a 2-core CPU; use paper on a GPU.",
    )
    add_n_l_list(
        p,
        "; values the preset's fusion decoder cannot hold are skipped; with --checkpoint: the checkpoint's n_l",
    )
    p.add_argument(
        "--images",
        nargs="+",
        default=None,
        help="sample names (fusedvlm.samples) or image files (default: astronaut chelsea grace_hopper page)",
    )
    on_device = {k: f"{getattr(SweepConfig, k)} on GPU, {v} on CPU" for k, v in CPU_SWEEP_DEFAULTS.items()}
    add_options(
        p,
        SweepConfig,
        exclude=("preset", "n_l", "decode", "compile"),
        defaults=dict.fromkeys(CPU_SWEEP_DEFAULTS),
        helps=on_device,
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS)"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    p.add_argument(
        "--flops-table",
        action="store_true",
        help="print fvcore's per-module FLOP table of one prefill (first image, first n_l) beside the "
        "bench's own counts, and exit (needs fvcore: pip install 'fusedvlm[bench]')",
    )
    add_decode_args(p)
    p.add_argument(
        "--decode-compare",
        default="1,4,16",
        metavar="BATCHES",
        help="after the sweep, decode with every path on one prompt and step these batch sizes "
        "together (comma-separated; 'none' skips it)",
    )
    p.add_argument(
        "--decode-new-tokens",
        type=int,
        default=None,
        help="tokens per run of the decode comparison (default 256 on GPU, 64 on CPU)",
    )
    add_model_arguments(p, quant=False)
    p.set_defaults(func=run_bench)


def resolve_n_l(values: list[int], max_queries: int, explicit: bool, preset: str) -> tuple[list[int], list[int]]:
    """(kept, skipped): the fusion decoder holds n_l - 1 query tokens at most."""
    kept = [v for v in values if v - 1 <= max_queries]
    skipped = [v for v in values if v - 1 > max_queries]
    if skipped and explicit:
        raise ValueError(
            f"preset {preset!r} has {max_queries} query tokens, so n_l <= {max_queries + 1}; got {skipped}"
        )
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


def check_bench_args(args: argparse.Namespace) -> None:
    """Refuse bad settings before any model is built: a sweep can take many minutes, and its
    results must not be thrown away at the end (e.g. because --out is a file)."""
    import os

    for flag, value, least in (
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--repeats", args.repeats, 1),
        ("--questions", args.questions, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(
            f"--out {args.out} is a file; bench writes a directory (results.json, results.csv, results.md, plots)"
        )
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot create the output directory: {e.strerror}") from None
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: the output directory is not writable")


def run_bench(args: argparse.Namespace) -> int:
    import time

    check_bench_args(args)
    t_start = time.perf_counter()
    import torch

    from fusedvlm.benchmark.report import table_lines, write_all
    from fusedvlm.benchmark.sweep import DEFAULT_IMAGES, SweepConfig, run_sweep
    from fusedvlm.benchmark.system import check_fits, environment
    from fusedvlm.cli_args import load_model, model_config, n_l_list, placement, preset_name
    from fusedvlm.options import from_options

    device, dtype, llm_dtype = placement(args)
    dtype_name = str(dtype).removeprefix("torch.")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    cfg_model = model_config(args)
    preset = preset_name(args) or f"checkpoint:{args.checkpoint}"
    if args.checkpoint is not None and args.n_l is None:
        # A trained model is measured at the n_l it was trained for.
        n_l_values, explicit = (cfg_model.n_l,), True
        if args.n_s is None:
            args.n_s = cfg_model.resolved_n_s
    else:
        n_l_values, explicit = n_l_list(args), args.n_l is not None
    n_ls, skipped = resolve_n_l(list(n_l_values), cfg_model.fusion.max_queries, explicit, preset)
    on_device = {} if device.type == "cuda" else CPU_SWEEP_DEFAULTS
    unset = {k: on_device.get(k, getattr(SweepConfig, k)) for k in CPU_SWEEP_DEFAULTS if getattr(args, k) is None}
    sweep_cfg = from_options(
        SweepConfig,
        args,
        preset=preset,
        n_l=tuple(n_ls),
        decode=args.decode,
        compile=False if args.no_compile else None,
        **unset,
    )
    decode_batches = parse_batches(args.decode_compare)
    images = load_images(args.images or list(DEFAULT_IMAGES))
    model = None
    if args.checkpoint is not None:
        model = load_model(args)
        req = {"parameters": sum(t.numel() for t in model.parameters())}
    else:
        req = check_fits(preset, device, dtype)
    if device.type == "cpu" and req["parameters"] > CPU_MAX_PARAMETERS:
        raise ValueError(
            f"preset {preset!r} has {req['parameters'] / 1e9:.1f} B parameters: a CPU sweep would take hours; "
            f"run it on a GPU (--device cuda) or pick a smaller preset"
        )
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if skipped:
        print(
            f"preset {preset}: skipping n_l {skipped} (its fusion decoder has {cfg_model.fusion.max_queries} query tokens)"
        )

    if model is None:
        model = load_model(args)
    if args.flops_table:
        from fusedvlm.benchmark.flop_table import flop_report
        from fusedvlm.benchmark.sweep import QUESTIONS

        name, image = images[0]
        print(f"preset {preset}, image {name}, n_l {n_ls[0]}: FLOPs of one first-question prefill")
        print(flop_report(model, image, QUESTIONS[0], n_ls[0], sweep_cfg.n_s_at(n_ls[0])))
        return 0
    env = environment(device)
    log(
        f"fusedvlm bench: preset {preset} ({req['parameters'] / 1e6:.1f} M parameters) on {env['device_name']}, "
        f"{env['torch_threads']} thread(s), {dtype_name}; n_l {n_ls}; {len(images)} image(s) x {sweep_cfg.repeats} repeat(s), "
        f"{sweep_cfg.max_new_tokens} new tokens"
    )
    sweep = run_sweep(model, images, sweep_cfg, log)
    decode_paths = None
    if decode_batches:
        from fusedvlm.benchmark.decode import DecodeBenchConfig, prompt_embeds, run_decode_bench
        from fusedvlm.decode.engine import compile_default

        decode_cfg = DecodeBenchConfig(
            new_tokens=args.decode_new_tokens or (256 if device.type == "cuda" else 64),
            repeats=3,
            batches=decode_batches,
            compile=not args.no_compile and compile_default(),
            prefill_tokens=0,  # the sweep above times the prefill at every n_l
        )
        bw = sweep["bandwidth"]
        decode_paths = run_decode_bench(
            model.llm,
            prompt_embeds(model.llm, model.layout),
            decode_cfg,
            log,
            bandwidth=(bw["bytes_per_s"], bw["source"]),
            engine_for=model.decode_engine,
        )
    payload = {
        "environment": env,
        "config": {
            "preset": preset,
            "n_l": n_ls,
            "n_s": args.n_s,
            "questions": args.questions,
            "images": [name for name, _ in images],
            "image_sizes": [list(im.size) for _, im in images],
            "max_new_tokens": sweep_cfg.max_new_tokens,
            "repeats": sweep_cfg.repeats,
            "warmup": sweep_cfg.warmup,
            "dtype": dtype_name,
            "llm_dtype": dtype_name if llm_dtype is None else str(llm_dtype).removeprefix("torch."),
            "seed": args.seed,
            "parameters": req["parameters"],
            "ignore_eos": True,
        },
        **sweep,
        "decode_paths": decode_paths,
        "wall_time_s": time.perf_counter() - t_start,
    }
    print()
    print("\n".join(table_lines(payload["results"])))
    worst = max(abs(r["fusion_llm_flops_rel_diff"]) for r in payload["results"])
    print(
        f"\nFLOP check: fusion + projection + LLM prefill counted vs closed form, worst relative difference {worst:.2e}"
    )
    print(
        f"decode path of the sweep: {sweep['decode_path']} ({sweep['decode_reason']}); compile {sweep['compile_s']:.1f} s, paid once, not in any timing"
    )
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
