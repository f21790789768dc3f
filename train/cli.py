"""``fusedvlm train stage1|stage2``: the two training stages of SPEC section 7 from the
command line, single process or under torchrun. Every hyper-parameter of SPEC section 7 is
a flag whose default is the paper's value.

Under torchrun the objective is wrapped in DDP; ``--fsdp`` shards the trainable sides (CLIP
vision blocks, fusion decoder layers, the rest of the trainable weights) with FSDP2 instead,
keeping the frozen LLM replicated. Both give the same gradients as one process over the same
global batch, and write the same checkpoint format (``--resume`` works across the two)."""

from __future__ import annotations

import argparse

STAGE_DEFAULTS = {
    # SPEC section 7: stage 1 batch 256, warm-up 10 %; stage 2 batch 2560, warm-up 3 %; lr 2e-5, cosine.
    "stage1": {"batch_size": 256, "warmup_ratio": 0.10},
    "stage2": {"batch_size": 2560, "warmup_ratio": 0.03},
}


def _common(p: argparse.ArgumentParser, stage: str) -> None:
    from fusedvlm.config import PRESETS

    d = STAGE_DEFAULTS[stage]
    g = p.add_argument_group("data and output")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    g.add_argument("--data", required=True, help="LLaVA-style JSON or JSONL records")
    g.add_argument("--image-root", required=True, help="directory that relative image paths start from")
    g.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, model.safetensors")
    g.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="malformed records, missing or corrupt images: report and skip, or stop")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--n-l", type=int, default=None, help="fused tokens for the first question (preset default)")
    g.add_argument("--n-s", type=int, default=None, help="fused tokens for later questions (default: SPEC rule)")
    g.add_argument("--hd-num", type=int, default=None, help="max local views per image (preset default)")
    g.add_argument("--image-size", type=int, default=None, help="view size in pixels (preset default; a multiple of the patch size)")
    g.add_argument("--drop-question", action="store_true", help="groups without question text (queries + EOS only)")
    g.add_argument("--freeze-vision", action="store_true", help="keep the CLIP vision encoder fixed (its new LayerNorm still trains)")
    g.add_argument("--llm-path", default=None, help="a local Hugging Face causal LM directory to use (frozen) instead of the preset's LLM")
    g.add_argument("--system", default=None, help="system prompt of the chat layout (default: the preset's)")
    g.add_argument("--init", default=None, help="start from trainable weights (model.safetensors of an earlier run)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, required=True, help="optimiser steps")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="global samples per optimiser step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"])
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0 disables clipping")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 autocast on GPUs that support it")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun (2+ processes): shard the trainable weights, gradients and optimiser state "
                        "with FSDP2 instead of replicating them with DDP; the frozen LLM stays replicated")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    g = p.add_argument_group("checkpoints and runtime")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", nargs="?", const=True, default=False, help="continue from the newest checkpoint in --out (or PATH)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def register(sub) -> None:
    p = sub.add_parser("train", help="train stage 1 (contrastive) or stage 2 (answers)", description=__doc__.split("\n")[0])
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    s1 = stages.add_parser("stage1", help="contrastive alignment: fusion EOS outputs vs CLIP text embeddings of the answers")
    _common(s1, "stage1")
    g = s1.add_argument_group("stage 1")
    g.add_argument("--temperature", type=float, default=0.07, help="initial InfoNCE temperature (learnable)")
    g.add_argument("--orthogonality-weight", type=float, default=1.0, help="weight of MSE(Z Z^T, I)")
    g.add_argument("--embed-dim", type=int, default=768, help="joint embedding width (projection C -> this)")
    g.add_argument("--text-model", default=None, help="open_clip model config for the text tower (default: the vision tower's, or a small one)")
    g.add_argument("--text-checkpoint", default=None, help="open_clip CLIP weights for the text tower (local file)")
    g.add_argument("--text-width", type=int, default=None, help="small text tower width (default: the fusion width)")
    g.add_argument("--text-layers", type=int, default=2)
    g.add_argument("--text-heads", type=int, default=4)
    s1.set_defaults(func=run_train)
    s2 = stages.add_parser("stage2", help="answer generation through the frozen LLM (stage 3: the same on a subset with --init)")
    _common(s2, "stage2")
    s2.set_defaults(func=run_train)


def build_trainer(stage: int, cfg, data: str, image_root: str, out: str, train_cfg, ctx=None, *, on_error: str = "skip",
                  init: str | None = None, freeze_vision: bool = False, stage1: dict | None = None, run_info: dict | None = None):
    """(trainer, model, problems found while reading the data) for one stage; the model is
    initialised from the current torch seed (or ``init``)."""
    from fusedvlm.checkpoint import load_trainable
    from fusedvlm.model.vlm import FusedVLM
    from fusedvlm.train.data import Collator, ConversationDataset, SampleEncoder, read_records
    from fusedvlm.train.loop import Trainer
    from fusedvlm.train.objectives import Stage1Objective, Stage2Objective, build_text_tower

    model = FusedVLM(cfg, load_language_model=(stage == 2))
    if init:
        load_trainable(model, init)
    records, problems = read_records(data, image_root, on_error)
    encoder = SampleEncoder(
        stage=stage, hd_num=cfg.hd_num, view_size=cfg.view_size, n_l=cfg.n_l, n_s=cfg.resolved_n_s,
        drop_question=cfg.drop_question, max_question_tokens=cfg.max_question_tokens, layout=model.layout,
    )
    if stage == 1:
        o = {"embed_dim": 768, "temperature": 0.07, "orthogonality_weight": 1.0, "text_model": None,
             "text_checkpoint": None, "text_width": None, "text_layers": 2, "text_heads": 4, **(stage1 or {})}
        text = build_text_tower(
            o["embed_dim"], o["text_width"] or cfg.fusion.hidden_size, o["text_layers"], o["text_heads"],
            model_name=o["text_model"] or cfg.vision.model_name, checkpoint=o["text_checkpoint"],
        )
        objective = Stage1Objective(
            model, text, embed_dim=o["embed_dim"], temperature=o["temperature"],
            orthogonality_weight=o["orthogonality_weight"], freeze_vision=freeze_vision,
        )
    else:
        objective = Stage2Objective(model, freeze_vision=freeze_vision)
    dataset = ConversationDataset(records, encoder, on_error)
    trainer = Trainer(objective, dataset, Collator(encoder, cfg.tokens_per_view), train_cfg, out, ctx, run_info)
    return trainer, model, problems


def run_train(args) -> int:
    import json
    import os
    from dataclasses import replace

    import torch

    from fusedvlm.checkpoint import CONFIG_KEY, STAGE_KEY, atomic_save_safetensors
    from fusedvlm.config import get_preset
    from fusedvlm.train.distributed import init_distributed
    from fusedvlm.train.loop import TrainConfig

    stage = 1 if args.stage == "stage1" else 2
    train_cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        beta1=args.beta1, beta2=args.beta2, max_grad_norm=args.max_grad_norm, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp, seed=args.seed, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, num_workers=args.num_workers, deterministic=args.deterministic,
        progress=not args.no_progress,
    )
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
    stage1 = None
    if stage == 1:
        stage1 = {k: getattr(args, k) for k in ("embed_dim", "temperature", "orthogonality_weight", "text_model",
                                                 "text_checkpoint", "text_width", "text_layers", "text_heads")}
    run_info = {"stage": args.stage, "preset": args.preset, "model_config": cfg.to_dict()}
    trainer, model, problems = build_trainer(
        stage, cfg, args.data, args.image_root, args.out, train_cfg, ctx, on_error=args.on_error, init=args.init,
        freeze_vision=args.freeze_vision, stage1=stage1, run_info=run_info,
    )
    if ctx.is_main:
        if problems:
            print(f"fusedvlm train: {len(problems)} record(s) skipped while reading {args.data}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({**run_info, "args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=1)
    rows = trainer.fit(resume=args.resume)
    # Gathered on every rank (FSDP shards the weights); the same tensors as save_trainable(model).
    state = trainer.full_model_state()
    if ctx.is_main:
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        atomic_save_safetensors(weights, os.path.join(args.out, "model.safetensors"), {CONFIG_KEY: json.dumps(model.cfg.to_dict()), STAGE_KEY: args.stage})
        skipped = len(problems) + len(trainer.skipped)
        last = next((r for r in reversed(rows) if r["loss"] is not None), None)  # steps of only bad records have none
        summary = f"step {trainer.step}" + (f", loss {last['loss']:.4f}" if last else "") + f", {skipped} record(s) skipped"
        print(f"fusedvlm train {args.stage}: {summary}; weights in {os.path.join(args.out, 'model.safetensors')}", flush=True)
    if ctx.enabled:
        torch.distributed.destroy_process_group()
    return 0
