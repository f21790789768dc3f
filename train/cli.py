"""``fusedvlm train stage1|stage2``: the two training stages of design §7 from the
command line, single process or under torchrun. Every field of
:class:`~fusedvlm.train.config.TrainConfig` (and, for stage 1,
:class:`~fusedvlm.train.config.Stage1Config`) is a flag generated from the dataclass
(:mod:`fusedvlm.options`); the defaults are the paper's, except the global batch of the
presets smaller than the paper's (:func:`fusedvlm.train.config.training_defaults`).

Under torchrun the objective is wrapped in DDP; ``--fsdp`` shards the trainable sides (CLIP
vision blocks, fusion decoder layers, the rest of the trainable weights) with FSDP2 instead,
keeping the frozen LLM replicated. Both give the same gradients as one process over the same
global batch, and write the same checkpoint format (``--resume`` works across the two)."""

from __future__ import annotations

import argparse

DESCRIPTION = "Train stage 1 (contrastive alignment) or stage 2 (answers through the frozen LLM) of design §7."


def _common(p: argparse.ArgumentParser, stage: str) -> None:
    from fusedvlm.cli_args import add_model_arguments
    from fusedvlm.config import PRESETS, ModelConfig
    from fusedvlm.options import add_options
    from fusedvlm.train.config import STAGE_DEFAULTS, TrainConfig, training_defaults

    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="LLaVA-style JSON or JSONL records")
    g.add_argument("--image-root", required=True, help="directory that relative image paths start from")
    g.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, model.safetensors")
    g.add_argument(
        "--on-error",
        choices=("skip", "raise"),
        default="skip",
        help="malformed records, missing or corrupt images: report and skip, or stop",
    )
    g = add_model_arguments(p, default_preset="tiny", for_training=True)
    # The preset's values unless given (ModelConfig's fields, overridden for this run).
    add_options(
        g,
        ModelConfig,
        only=("n_l", "n_s", "drop_question", "hd_num"),
        defaults={"n_l": None, "hd_num": None},
        helps={"n_l": "the preset's", "n_s": "the design §5 rule", "hd_num": "the preset's"},
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="view size in pixels (preset default; a multiple of the patch size)",
    )
    g.add_argument(
        "--freeze-vision",
        action="store_true",
        help="keep the CLIP vision encoder fixed (its new LayerNorm still trains)",
    )
    g.add_argument(
        "--llm-path",
        default=None,
        help="a local Hugging Face causal LM directory to use (frozen) instead of the preset's LLM",
    )
    g.add_argument("--system", default=None, help="system prompt of the chat layout (default: the preset's)")
    g.add_argument("--init", default=None, help="start from trainable weights (model.safetensors of an earlier run)")
    g = p.add_argument_group("optimisation and runtime (TrainConfig)")
    batches = ", ".join(f"{preset} {training_defaults(stage, preset)['batch_size']}" for preset in sorted(PRESETS))
    add_options(
        g,
        TrainConfig,
        defaults={**STAGE_DEFAULTS[stage], "batch_size": None},
        helps={"batch_size": f"per preset: {batches}"},
    )
    g.add_argument(
        "--resume", nargs="?", const=True, default=False, help="continue from the newest checkpoint in --out (or PATH)"
    )


def register(sub) -> None:
    from fusedvlm.options import add_options
    from fusedvlm.train.config import Stage1Config

    p = sub.add_parser("train", help="train stage 1 (contrastive) or stage 2 (answers)", description=DESCRIPTION)
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    s1 = stages.add_parser(
        "stage1", help="contrastive alignment: fusion EOS outputs vs CLIP text embeddings of the answers"
    )
    _common(s1, "stage1")
    add_options(s1.add_argument_group("stage 1 (Stage1Config)"), Stage1Config)
    s1.set_defaults(func=run_train)
    s2 = stages.add_parser(
        "stage2", help="answer generation through the frozen LLM (stage 3: the same on a subset with --init)"
    )
    _common(s2, "stage2")
    s2.set_defaults(func=run_train)


def build_trainer(
    stage: int,
    cfg,
    data: str,
    image_root: str,
    out: str,
    train_cfg,
    ctx=None,
    *,
    on_error: str = "skip",
    init: str | None = None,
    freeze_vision: bool = False,
    stage1=None,
    run_info: dict | None = None,
    llm_dtype=None,
):
    """(trainer, model, problems found while reading the data) for one stage; the model is
    initialised from the current torch seed (or ``init``). ``stage1``: a Stage1Config, or a
    dict of its fields (the rest keep their defaults). ``llm_dtype``: the frozen LLM's
    weights (the trained sides stay fp32 master weights; ``precision`` autocasts them)."""
    from fusedvlm.checkpoint import load_trainable
    from fusedvlm.model.vlm import FusedVLM
    from fusedvlm.train.config import Stage1Config
    from fusedvlm.train.data import Collator, ConversationDataset, SampleEncoder, read_records
    from fusedvlm.train.loop import Trainer
    from fusedvlm.train.objectives import Stage1Objective, Stage2Objective, build_text_tower

    model = FusedVLM(cfg, load_language_model=(stage == 2))
    if llm_dtype is not None and model.llm is not None:
        model.llm.to(llm_dtype)
    if init:
        load_trainable(model, init)
    records, problems = read_records(data, image_root, on_error)
    encoder = SampleEncoder(
        stage=stage,
        hd_num=cfg.hd_num,
        view_size=cfg.view_size,
        n_l=cfg.n_l,
        n_s=cfg.resolved_n_s,
        drop_question=cfg.drop_question,
        max_question_tokens=cfg.max_question_tokens,
        layout=model.layout,
    )
    if stage == 1:
        o = stage1 if isinstance(stage1, Stage1Config) else Stage1Config(**(stage1 or {}))
        text = build_text_tower(
            o.embed_dim,
            o.text_width or cfg.fusion.hidden_size,
            o.text_layers,
            o.text_heads,
            model_name=o.text_model or cfg.vision.model_name,
            checkpoint=o.text_checkpoint,
        )
        objective = Stage1Objective(
            model,
            text,
            embed_dim=o.embed_dim,
            temperature=o.temperature,
            orthogonality_weight=o.orthogonality_weight,
            freeze_vision=freeze_vision,
        )
    else:
        objective = Stage2Objective(model, freeze_vision=freeze_vision)
    dataset = ConversationDataset(records, encoder, on_error)
    trainer = Trainer(objective, dataset, Collator(encoder, cfg.tokens_per_view), train_cfg, out, ctx, run_info)
    return trainer, model, problems


def run_train(args) -> int:
    import contextlib
    import os

    from fusedvlm.outputs import check_output_dir, locked_output

    check_output_dir(args.out)
    # One writer per run directory; under torchrun the ranks share it and rank 0 holds the lock.
    lock = locked_output(args.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        return _run_train(args)


def _run_train(args) -> int:
    import json
    import os
    from dataclasses import replace

    import torch

    from fusedvlm.checkpoint import CONFIG_KEY, STAGE_KEY, atomic_save_safetensors
    from fusedvlm.config import get_preset
    from fusedvlm.device import resolve_dtype
    from fusedvlm.options import from_options
    from fusedvlm.train.config import Stage1Config, TrainConfig, training_defaults
    from fusedvlm.train.distributed import init_distributed

    stage = 1 if args.stage == "stage1" else 2
    if args.batch_size is None:
        args.batch_size = training_defaults(args.stage, args.preset)["batch_size"]
    train_cfg = from_options(TrainConfig, args)
    metrics = os.path.join(args.out, "metrics.jsonl")
    if not args.resume and os.path.exists(metrics) and os.path.getsize(metrics):
        raise ValueError(
            f"{args.out} already holds a run (metrics.jsonl): pass --resume to continue it (from its newest intact "
            "checkpoint, or from step 0 if it has none) or choose another --out"
        )
    overrides = {k: v for k, v in (("n_l", args.n_l), ("n_s", args.n_s), ("hd_num", args.hd_num)) if v is not None}
    if args.drop_question:
        overrides["drop_question"] = True
    cfg = get_preset(args.preset, **overrides)
    if args.image_size is not None:
        cfg = replace(cfg, vision=replace(cfg.vision, image_size=args.image_size))
    if args.llm_path or args.system is not None:
        llm = cfg.llm
        if args.llm_path:
            llm = replace(llm, source="pretrained", path=args.llm_path)
        if args.system is not None:
            llm = replace(llm, system_prompt=args.system)
        cfg = replace(cfg, llm=llm)
    ctx = init_distributed(args.device)
    torch.manual_seed(args.seed)
    stage1 = from_options(Stage1Config, args) if stage == 1 else None
    run_info = {"stage": args.stage, "preset": args.preset, "model_config": cfg.to_dict()}
    trainer, model, problems = build_trainer(
        stage,
        cfg,
        args.data,
        args.image_root,
        args.out,
        train_cfg,
        ctx,
        on_error=args.on_error,
        init=args.init,
        freeze_vision=args.freeze_vision,
        stage1=stage1,
        run_info=run_info,
        llm_dtype=resolve_dtype(args.llm_dtype, ctx.device),
    )
    if ctx.is_main:
        if problems:
            print(f"fusedvlm train: {len(problems)} record(s) skipped while reading {args.data}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({**run_info, "args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=1)
    rows = trainer.fit(resume=args.resume)
    if rows and all(r["loss"] is None for r in rows):
        # Every step held only records that failed to encode: weights would be the untrained ones.
        if ctx.enabled:
            torch.distributed.destroy_process_group()
        raise ValueError(
            f"{args.data}: no usable record: {len(problems) + len(trainer.skipped)} record(s) skipped "
            f"(see {os.path.join(args.out, 'metrics.jsonl')}); no model written"
        )
    # Gathered on every rank (FSDP shards the weights); the same tensors as save_trainable(model).
    state = trainer.full_model_state()
    if ctx.is_main:
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        atomic_save_safetensors(
            weights,
            os.path.join(args.out, "model.safetensors"),
            {CONFIG_KEY: json.dumps(model.cfg.to_dict()), STAGE_KEY: args.stage},
        )
        skipped = len(problems) + len(trainer.skipped)
        last = next((r for r in reversed(rows) if r["loss"] is not None), None)  # steps of only bad records have none
        summary = (
            f"step {trainer.step}" + (f", loss {last['loss']:.4f}" if last else "") + f", {skipped} record(s) skipped"
        )
        print(
            f"fusedvlm train {args.stage}: {summary}; weights in {os.path.join(args.out, 'model.safetensors')}",
            flush=True,
        )
    if ctx.enabled:
        torch.distributed.destroy_process_group()
    return 0
