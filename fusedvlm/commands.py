"""CLI commands ``chat`` and ``info``."""

from __future__ import annotations

import argparse
import json

from fusedvlm.config import PRESETS

# Chat's decoding defaults where they differ from GenerationConfig's (short answers; mild
# sampling when --do-sample; a fixed seed, which also seeds random initialisation).
CHAT_GENERATION_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 0}


def register(sub) -> None:
    from fusedvlm.cli_args import add_decode_args, add_max_image_pixels, add_model_arguments, add_query_counts
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.options import add_options

    p = sub.add_parser("chat", help="ask questions about an image", description="Multi-turn chat about one image.")
    p.add_argument("--image", required=True, help="image file, or sample:NAME for a bundled photo (fusedvlm.samples)")
    add_max_image_pixels(p)
    p.add_argument("--question", action="append", required=True, help="repeat for several questions (one turn each)")
    add_query_counts(p)
    add_options(
        p,
        GenerationConfig,
        exclude=("ignore_eos",),
        defaults=CHAT_GENERATION_DEFAULTS,
        helps={"seed": "%(default)s; also seeds random initialisation"},
    )
    p.add_argument("--system", default=None, help="system prompt (default: the preset's)")
    p.add_argument("--timings", action="store_true", help="print per-stage timings of every turn")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per turn: question, answer, answer_ids "
        "(generated LLM ids), prompt_ids (the turn's whole LLM prompt, each fused slot -1), prefill_start "
        "(how many of those came from the LLM cache), num_fused",
    )
    add_decode_args(p)
    add_model_arguments(p, seed=False)  # GenerationConfig's --seed
    p.set_defaults(func=run_chat)

    p = sub.add_parser("info", help="parameter counts and token budgets of a preset")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    add_query_counts(p)
    p.add_argument("--questions", type=int, default=1)
    p.add_argument("--width", type=int, default=640, help="image width for the vision-token budget")
    p.add_argument("--height", type=int, default=480)
    p.set_defaults(func=run_info)

    p = sub.add_parser(
        "build",
        help="build the C++ CPU kernels and compile the decode step ahead of the first chat",
        description="Build csrc/ and compile the LLM decode step for a model's first cache buckets, so that "
        "the first chat answers at once. Both are cached (fusedvlm info says where and whether they are warm).",
    )
    p.add_argument(
        "--positions",
        type=int,
        default=1024,
        help="compile the decode step for every cache bucket up to this many LLM positions (default %(default)s)",
    )
    p.add_argument("--kernels-only", action="store_true", help="build the C++ kernels only; compile nothing")
    add_decode_args(p)
    add_model_arguments(p)
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from fusedvlm import native
    from fusedvlm.cli_args import load_model

    if args.positions < 1:
        raise ValueError(f"--positions must be >= 1, got {args.positions}")
    print(f"C++ CPU kernels: {native.status()}", flush=True)
    if args.kernels_only:
        return 0
    model = load_model(args)
    engine = model.decode_engine(args.decode, False if args.no_compile else None)
    if not engine.compiled:
        print(f"decode path {engine.path} ({engine.reason}): nothing to compile")
        return 0
    cache = engine.new_cache(1)
    seconds, buckets = 0.0, []
    while True:
        seconds += engine.prepare(cache, cache.capacity)
        buckets.append(cache.capacity)
        if cache.capacity >= min(args.positions, cache.max_capacity):
            break
        cache.reserve(cache.capacity + 1)
    print(f"decode path {engine.path}: cache buckets {buckets} ready ({seconds:.1f} s of compiling)")
    return 0


def open_image(spec: str, max_pixels: int | None = None):
    """An image file, or ``sample:NAME`` (fusedvlm.samples); files above ``max_pixels`` (default
    fusedvlm.preprocess.DEFAULT_MAX_PIXELS) are refused before decoding."""
    from fusedvlm.preprocess import DEFAULT_MAX_PIXELS, load_image

    if spec.startswith("sample:"):
        from fusedvlm.samples import sample_image

        return sample_image(spec[len("sample:") :])
    return load_image(spec, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)


def run_chat(args: argparse.Namespace) -> int:
    from fusedvlm.cli_args import load_model, max_image_pixels
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.options import from_options
    from fusedvlm.session import ChatSession
    from fusedvlm.text import check_text

    # Everything that can be wrong with the input is refused before the model is loaded.
    for q in args.question:
        check_text(q, "question")
    image = open_image(args.image, max_image_pixels(args))
    gen = from_options(GenerationConfig, args)
    model = load_model(args)
    session = ChatSession(
        model,
        image,
        system=args.system,
        n_l=args.n_l,
        n_s=args.n_s,
        decode=args.decode,
        compile=False if args.no_compile else None,
    )
    engine = session.engine
    if not args.json:
        print(f"[decode path: {engine.path} ({engine.reason})]")
    for q in args.question:
        answer = session.ask(q, gen)
        if args.json:
            print(
                json.dumps(
                    {
                        "question": q,
                        "answer": answer.text,
                        "answer_ids": answer.ids,
                        "prompt_ids": answer.prompt.prompt_ids(),
                        "prefill_start": answer.prefill_start,
                        "num_fused": answer.num_fused,
                    }
                ),
                flush=True,
            )
            continue
        print(f"Q: {q}\nA: {answer.text}")
        if args.timings:
            stages = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in answer.timings.items() if k != "compile")
            print(
                f"   [{answer.num_fused} fused tokens; ttft {answer.ttft_s * 1e3:.1f} ms; {stages}; "
                f"{answer.decode_tokens_per_s:.1f} tok/s]"
            )
    return 0


def run_info(args: argparse.Namespace) -> int:
    import torch

    from fusedvlm.config import get_preset
    from fusedvlm.model import FusedVLM
    from fusedvlm.model.llm import meta_llm
    from fusedvlm.preprocess import num_views

    for flag, value in (("--questions", args.questions), ("--width", args.width), ("--height", args.height)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    cfg = get_preset(args.preset)
    n_l, n_s = cfg.n_l if args.n_l is None else args.n_l, args.n_s
    cfg = cfg.with_queries(n_l, n_s)
    llm = meta_llm(cfg.llm)
    with torch.device("meta"):
        model = FusedVLM(cfg, llm=llm, tokenizer=None)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    fuser = model.fuser
    rows = [
        ("vision encoder (CLIP ViT + LayerNorm)", count(model.vision)),
        ("local merge + LF token", count(fuser.merge)),
        ("fusion decoder", count(fuser.decoder)),
        ("projection", count(fuser.projection)),
        ("LLM (frozen)", count(model.llm)),
    ]
    total = sum(n for _, n in rows)
    print(f"preset {args.preset}: {total / 1e6:,.1f} M parameters, {(total - rows[-1][1]) / 1e6:,.1f} M trainable")
    for name, n in rows:
        print(f"  {name:<40s} {n / 1e6:>12,.2f} M")
    print_kernel_implementations()
    views = num_views(args.width, args.height, cfg.hd_num, cfg.view_size)
    k = args.questions
    n_s = cfg.resolved_n_s
    question_budget = sum(len(fuser.group_ids([], first=(j == 0))) for j in range(k))
    print(f"token budget for a {args.width}x{args.height} image, {k} question(s), n_l={n_l}, n_s={n_s}:")
    budget = [
        (f"views (HD-{cfg.hd_num}, {cfg.view_size}px)", views),
        (f"vision tokens ({cfg.tokens_per_view} per view)", views * cfg.tokens_per_view),
        ("fusion stream (+ question text)", views * cfg.tokens_per_view + question_budget),
        ("fused tokens into the LLM", n_l + (k - 1) * n_s),
    ]
    for label, value in budget:
        print(f"  {label:<40s} {value:>12,d}")
    return 0


def print_kernel_implementations() -> None:
    """Which implementation the fusedvlm:: ops run here (CPU, and CUDA when present): one
    decision for all three (fusedvlm.backend.implementation)."""
    import torch

    from fusedvlm import native
    from fusedvlm.backend import implementation
    from fusedvlm.decode.engine import compile_cache_status

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("kernels (" + ", ".join(devices) + "):")
    impls = [implementation(torch.empty(0, device=d)) for d in devices]
    print(f"  {'packed_attention, local_merge, pairwise_cosine_stats':<52s} {' / '.join(impls)}")
    print(f"  C++ CPU kernels: {native.status()}")
    print(f"  decode-step compile cache: {compile_cache_status()}")
