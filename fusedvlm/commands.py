"""CLI commands ``chat`` and ``info``."""

from __future__ import annotations

import argparse

from fusedvlm.config import PRESETS


def register(sub) -> None:
    p = sub.add_parser("chat", help="ask questions about an image", description="Multi-turn chat about one image.")
    p.add_argument("--preset", default="smol", choices=sorted(PRESETS))
    p.add_argument("--image", required=True, help="image file, or sample:NAME for a bundled photo (fusedvlm.samples)")
    p.add_argument("--question", action="append", required=True, help="repeat for several questions (one turn each)")
    p.add_argument("--checkpoint", help="trained weights (safetensors from fusedvlm.checkpoint.save_trainable)")
    p.add_argument("--n-l", type=int, default=None, help="fused tokens for the first question")
    p.add_argument("--n-s", type=int, default=None, help="fused tokens for later questions (default: SPEC rule)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="seeds random initialisation and sampling")
    p.add_argument("--system", default=None, help="system prompt (default: the preset's)")
    p.add_argument("--timings", action="store_true", help="print per-stage timings of every turn")
    p.set_defaults(func=run_chat)

    p = sub.add_parser("info", help="parameter counts and token budgets of a preset")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--n-l", type=int, default=None)
    p.add_argument("--n-s", type=int, default=None)
    p.add_argument("--questions", type=int, default=1)
    p.add_argument("--width", type=int, default=640, help="image width for the vision-token budget")
    p.add_argument("--height", type=int, default=480)
    p.set_defaults(func=run_info)


def _open_image(spec: str):
    from fusedvlm.preprocess import load_image

    if spec.startswith("sample:"):
        from fusedvlm.samples import sample_image

        return sample_image(spec[len("sample:"):])
    return load_image(spec)


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from fusedvlm.checkpoint import load_trainable, read_config
    from fusedvlm.config import get_preset
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.model import FusedVLM
    from fusedvlm.session import ChatSession

    image = _open_image(args.image)
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    torch.manual_seed(args.seed)
    cfg = read_config(args.checkpoint) if args.checkpoint else get_preset(args.preset)
    model = FusedVLM(cfg).eval()
    if args.checkpoint:
        load_trainable(model, args.checkpoint)
    session = ChatSession(model, image, system=args.system, n_l=args.n_l, n_s=args.n_s)
    for q in args.question:
        answer = session.ask(q, gen)
        print(f"Q: {q}\nA: {answer.text}")
        if args.timings:
            stages = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in answer.timings.items())
            print(f"   [{answer.num_fused} fused tokens; ttft {answer.ttft_s * 1e3:.1f} ms; {stages}; "
                  f"{answer.decode_tokens_per_s:.1f} tok/s]")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import torch

    from fusedvlm.config import get_preset
    from fusedvlm.model import FusedVLM
    from fusedvlm.model.llm import meta_llm
    from fusedvlm.preprocess import num_views

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
    """Which implementation each fusedvlm:: op runs here (CPU, and CUDA when present)."""
    import importlib

    import torch

    from fusedvlm import native

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("kernels (" + ", ".join(devices) + "):")
    # By module path: fusedvlm.kernels re-exports functions under the submodules' names.
    for name, module in (("packed_attention", "packed_attention"), ("local_merge", "local_merge"),
                         ("pairwise_cosine_stats", "pairwise_cosine")):
        implementation = importlib.import_module(f"fusedvlm.kernels.{module}").implementation
        impls = [implementation(torch.empty(0, device=d)) for d in devices]
        print(f"  {name:<40s} {' / '.join(impls):>12s}")
    print(f"  C++ CPU kernels: {native.status()}")
