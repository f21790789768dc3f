"""``fusedvlm psi`` and ``fusedvlm fit-scaling``."""

from __future__ import annotations

import os

# What psi samples with --generate where GenerationConfig's defaults say otherwise.
PSI_SAMPLING_DEFAULTS = {"top_p": 0.95, "seed": 0}


def register(subparsers) -> None:
    from fusedvlm.chat import TEMPLATES
    from fusedvlm.device import add_device_arguments
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.options import add_options

    p = subparsers.add_parser(
        "psi",
        help="psi / divergence analysis of A/B answer pairs with a causal LM (design §8)",
        description="Hidden states of both answers of every pair (shared prefix computed once), per-prefix "
        "psi statistics and D(n), their means over pairs, lambda, the balance point and alpha(n).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="pairs: .jsonl or .parquet records {system?, question, chosen, rejected}")
    src.add_argument("--generate", type=int, metavar="N", help="generate N pairs by sampling two answers per prompt")
    p.add_argument(
        "--prompts", help="JSONL prompts {system?, question} for --generate (default: the set shipped with fusedvlm)"
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (SmolLM2-135M-Instruct, offline), 'random' (a tiny random Llama) or a local HF model directory",
    )
    p.add_argument(
        "--chat-template",
        choices=TEMPLATES,
        default=None,
        help="prompt layout of a model directory whose tokenizer has no chat template of its own "
        "(default: the tokenizer's template)",
    )
    p.add_argument("--max-n", type=int, default=128, help="answer tokens per branch at most (bounds memory)")
    p.add_argument("--max-pairs", type=int, help="use at most this many pairs of --data")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    p.add_argument("--signed", action="store_true", help="f = identity instead of max(0, .)")
    p.add_argument(
        "--beta", type=float, default=1.0, help="beta of alpha(n) = (beta/2) log_n((1+n_b)/(n+n_b)) - beta/2"
    )
    # --max-n sets the length; every pair is sampled, top-p only.
    add_options(
        p,
        GenerationConfig,
        exclude=("max_new_tokens", "do_sample", "top_k", "ignore_eos"),
        defaults=PSI_SAMPLING_DEFAULTS,
        helps={"seed": "%(default)s; also seeds the analysis"},
    )
    add_device_arguments(
        p,
        dtype_help="the LM's weights; auto: bf16 on a GPU, fp32 on the CPU (psi statistics accumulate in fp32 either way)",
    )
    p.add_argument(
        "--out", default="out/psi", help="directory for psi.json, psi_curves.png, divergence.png (and pairs.jsonl)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_psi)

    f = subparsers.add_parser(
        "fit-scaling",
        help="fit S(n) = c / n^alpha to a CSV of (n, score[, group])",
        description="Least squares in log space (BFGS) per group; prints c and alpha and plots data and fit.",
    )
    f.add_argument("csv", help="CSV with a header: n, score and optionally group")
    f.add_argument("--plot", help="PNG path (default: next to the CSV, <name>_fit.png)")
    f.set_defaults(func=_fit_scaling)


def _load_model(name: str, device, dtype, chat_template: str | None = None):
    """(model, tokenizer, chat layout of its prompts)."""
    from fusedvlm.config import PRESETS, LLMConfig
    from fusedvlm.model.llm import load_llm

    if name == "smollm2":
        cfg = LLMConfig(source="smollm2")
    elif name == "random":
        cfg = PRESETS["tiny"].llm
    elif os.path.isdir(name):
        cfg = LLMConfig(source="pretrained", path=name, chat_template=chat_template)
    else:
        raise ValueError(f"--model {name!r}: expected 'smollm2', 'random' or an existing model directory")
    return (*load_llm(cfg, device=device, dtype=dtype), cfg.chat_template)


def _psi(args) -> int:
    import time

    import torch

    from fusedvlm.analysis.pairs import generate_pairs, load_pairs, load_prompts, save_pairs
    from fusedvlm.analysis.pipeline import run_psi, summary_lines
    from fusedvlm.device import dtype_name, resolve_device, resolve_dtype
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.options import from_options
    from fusedvlm.outputs import check_output_dir

    if args.max_n < 1:
        raise ValueError(f"--max-n must be >= 1, got {args.max_n}")
    if args.generate is not None:
        if args.generate < 1:
            raise ValueError(f"--generate must be >= 1, got {args.generate}")
        # A few tokens of slack: decoded text re-tokenizes to about, not exactly, the sampled length.
        sampling = from_options(GenerationConfig, args, do_sample=True, max_new_tokens=args.max_n + 8)
    check_output_dir(args.out)  # before minutes of loading and generating, not after
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    model, tokenizer, template = _load_model(args.model, device, dtype, args.chat_template)
    t_load = time.perf_counter() - t0
    print(f"model {args.model}: loaded in {t_load:.1f} s ({dtype_name(dtype)} on {device})")
    if args.data:
        pairs = load_pairs(args.data, limit=args.max_pairs)
        source = args.data
    else:
        prompts = load_prompts(args.prompts)
        prompts = [prompts[i % len(prompts)] for i in range(args.generate)]
        t1 = time.perf_counter()
        pairs = generate_pairs(
            model,
            tokenizer,
            prompts,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            batch_size=args.batch_size,
            seed=sampling.seed,
            progress=not args.no_progress,
            template=template,
        )
        print(f"generated {len(pairs)} pairs in {time.perf_counter() - t1:.1f} s")
        save_pairs(pairs, os.path.join(args.out, "pairs.jsonl"))
        source = f"generated ({args.prompts or 'built-in prompts'}, seed {args.seed})"
    torch.manual_seed(args.seed)
    result = run_psi(
        model,
        tokenizer,
        pairs,
        max_n=args.max_n,
        batch_size=args.batch_size,
        positive=not args.signed,
        beta=args.beta,
        out_dir=args.out,
        progress=not args.no_progress,
        template=template,
        meta=dict(
            model=args.model, source=source, load_seconds=round(t_load, 2), device=str(device), dtype=dtype_name(dtype)
        ),
    )
    print("\n".join(summary_lines(result)))
    print(f"total {time.perf_counter() - t0:.1f} s; wrote {args.out}/psi.json, psi_curves.png, divergence.png")
    return 0


def read_scaling_csv(path: str) -> dict[str, tuple]:
    """{group: (n, score)} from a CSV with columns n, score and optionally group."""
    import csv

    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "n" not in cols or "score" not in cols:
            raise ValueError(f"{path}: needs columns 'n' and 'score' (optional 'group'), got {cols}")
        groups: dict[str, tuple[list, list]] = {}
        for lineno, row in enumerate(reader, 2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                n, s = float(row["n"]), float(row["score"])
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: n and score must be numbers, got {row['n']!r}, {row['score']!r}"
                ) from None
            g = groups.setdefault(row.get("group", "") or "all", ([], []))
            g[0].append(n)
            g[1].append(s)
    if not groups:
        raise ValueError(f"{path}: no data rows")
    return {k: (np.array(v[0]), np.array(v[1])) for k, v in groups.items()}


def _fit_scaling(args) -> int:
    from fusedvlm.analysis.plots import plot_scaling_fits
    from fusedvlm.analysis.psi import fit_scaling_law

    fits = {}
    for name, (n, score) in read_scaling_csv(args.csv).items():
        try:
            fits[name] = (n, score, fit_scaling_law(n, score))
        except ValueError as e:
            raise ValueError(f"group {name!r}: {e}") from None
    print(f"{'group':<20} {'points':>6} {'c':>12} {'alpha':>10} {'mse(log)':>10}")
    for name, (n, _, fit) in fits.items():
        print(f"{name:<20} {n.size:>6} {fit.c:>12.6g} {fit.alpha:>10.5f} {fit.loss:>10.3g}")
    plot = args.plot or os.path.splitext(args.csv)[0] + "_fit.png"
    plot_scaling_fits(fits, plot)
    print(f"plot: {plot}")
    return 0
