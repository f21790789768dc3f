"""The training loop shared by both stages.

Per optimiser step: ``grad_accum`` micro-batches per rank; each micro-batch's summed loss is
divided by the step's global target count (all micro-batches, all ranks), so the gradient
equals that of one big batch (DDP averages over ranks, hence the ``world`` factor). Then
gradient clipping, AdamW, and a linear warm-up + cosine schedule evaluated from the step
number alone (its whole state is the step).

Checkpoints (:mod:`fusedvlm.train.checkpoint`) hold the trainable weights, the optimiser, the
RNG states and the data position (global micro-batches consumed): ``resume`` continues with
the same batches and bit-identical losses on the same hardware and thread count. The metrics
JSONL gets one row per step (step, loss, lr, grad_norm, tokens_per_s, ...); on resume, rows
after the checkpoint are dropped so the file reads as one uninterrupted run.

``precision="fp16"`` adds dynamic loss scaling (``torch.amp.GradScaler``): the gradients are
unscaled before clipping, so ``grad_norm`` is the true one. A step whose gradients hold inf/NaN
is skipped by the optimiser; its row says ``overflow: true`` (``grad_norm`` null) and
``overflow_skips`` counts them. The schedule follows the optimiser's updates, not the data
steps, so a skipped step does not advance it. The scaler's state goes into the checkpoints.
Under FSDP the scaler is ``ShardedGradScaler``, which all-reduces the overflow check: each rank
sees only its gradient shard, and every rank must skip the same steps.

``TrainConfig.fsdp`` (``--fsdp``, under torchrun) shards the trainable sides with FSDP2
instead of wrapping the objective in DDP (:func:`fusedvlm.train.distributed.shard_trainable`):
weights, gradients and AdamW state are split over ranks, the frozen LLM stays replicated. The
gradient is the same as DDP's. Checkpoints gather the full (unsharded) weights and optimiser
state, so their format is the one a single process writes: a run saved under FSDP resumes
with or without it, and the reverse.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fusedvlm.train.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_optimizer,
    load_training_checkpoint,
    save_training_checkpoint,
    set_rng_state,
)
from fusedvlm.train.config import TrainConfig
from fusedvlm.train.data import ResumableBatchSampler
from fusedvlm.train.distributed import DistContext, all_reduce_sum, average_replicated_grads, barrier, shard_trainable


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ceil(warmup_ratio * steps) steps, then cosine to min_lr_ratio * lr."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on GPUs that support it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _model_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The objective's state: objectives leave their frozen LLM or host out of it
    (:func:`fusedvlm.checkpoint.leave_frozen_out_of_state_dict`)."""
    return objective.state_dict()


class _FullOptimizerState:
    """An FSDP-sharded AdamW seen as ``torch.optim.Optimizer.state_dict`` /
    ``load_state_dict`` in torch's index-keyed format with full tensors, which is what
    :mod:`fusedvlm.train.checkpoint` stores. ``names``: the optimiser's parameter names, in
    its order (index i is names[i]). ``gather()`` (collective) fills it from the shards on
    rank 0; ``load_state_dict`` (every rank, each with the full state) scatters it back."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]):
        self.module, self.optimizer, self.names = module, optimizer, names
        self.full: dict | None = None

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def gather(self) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.module, self.optimizer, options=self._options(cpu_offload=True))
        if sd:  # rank 0
            index = {n: i for i, n in enumerate(self.names)}
            self.full = {
                "state": {index[n]: v for n, v in sd["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]],
            }

    def state_dict(self) -> dict:
        if self.full is None:
            # Loading only checks the group sizes: the local optimiser has them.
            return self.optimizer.state_dict()
        return self.full

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        full = {
            "state": {self.names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]} for g in sd["param_groups"]],
        }
        set_optimizer_state_dict(self.module, self.optimizer, full, options=self._options())


class Trainer:
    def __init__(
        self,
        objective: nn.Module,
        dataset,
        collator,
        cfg: TrainConfig,
        out_dir: str,
        ctx: DistContext | None = None,
        run_info: dict | None = None,
    ):
        self.objective, self.dataset, self.collator, self.cfg = objective, dataset, collator, cfg
        self.out_dir, self.ctx = out_dir, ctx or DistContext()
        self.run_info = run_info or {}
        if cfg.micro_batch % self.ctx.world:
            raise ValueError(
                f"the global micro-batch {cfg.micro_batch} (batch_size / grad_accum) must be a multiple of the world size {self.ctx.world}"
            )
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        if cfg.fsdp and not self.ctx.enabled:
            raise ValueError("fsdp needs several processes: launch with torchrun --nproc_per_node N (N >= 2)")
        objective.to(self.ctx.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(objective)
        # Names first: fully_shard swaps the parameters for DTensors, and the optimiser keeps
        # the unsharded order so that checkpoints index their state the same way either way.
        names = [n for n, p in objective.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("nothing to train: every parameter is frozen")
        self.replicated: set = set()
        if cfg.fsdp:
            self.replicated = shard_trainable(objective)
        params = dict(objective.named_parameters())
        self.named_params = [(n, params[n]) for n in names]
        decay = [(n, p) for n, p in self.named_params if p.dim() >= 2 and "embed" not in n]
        no_decay = [(n, p) for n, p in self.named_params if not (p.dim() >= 2 and "embed" not in n)]
        self.optim_names = [n for n, _ in decay + no_decay]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
                {"params": [p for _, p in no_decay], "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            foreach=True,
        )
        self.module = objective
        if self.ctx.enabled and not cfg.fsdp:
            # device_ids=None: the objective moves each batch to its device itself.
            self.module = DistributedDataParallel(objective, device_ids=None)
        self.autocast_dtype = resolve_precision(cfg.precision, self.ctx.device)
        # fp16's narrow range underflows small gradients: scale the loss up, and skip the steps
        # whose scaled gradients overflow. bf16 has fp32's range and needs none of this.
        self.scaler = None
        if self.autocast_dtype == torch.float16:
            if cfg.fsdp:  # the ranks must agree on an overflow that only one shard holds
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.ctx.device.type)
            else:
                self.scaler = torch.amp.GradScaler(self.ctx.device.type)
        self.step = 0
        self.overflow_skips = 0  # steps the scaler skipped: the schedule is at step - overflow_skips
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.skipped: list = []

    # ------------------------------------------------------------------ checkpoints
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The objective's state without the LLM, unsharded. Under FSDP every rank must call
        it (it gathers) and only rank 0 gets the tensors, on the CPU."""
        if not self.cfg.fsdp:
            return _model_state(self.objective)
        # get_model_state_dict(full_state_dict=True) would also copy the whole frozen LLM to
        # the CPU at every save only to drop it: gather the trainable side alone.
        state = {}
        for k, v in _model_state(self.objective).items():
            v = v.full_tensor() if isinstance(v, DTensor) else v
            if self.ctx.is_main:
                state[k] = v.cpu()
        return state

    def _full_optimizer(self):
        """What the checkpoint functions save from and load into: the optimiser itself, or
        under FSDP a view of its full state in the optimiser's own index-keyed format."""
        if not self.cfg.fsdp:
            return self.optimizer
        return _FullOptimizerState(self.objective, self.optimizer, self.optim_names)

    def save(self) -> str:
        path = checkpoint_path(self.ckpt_dir, self.step)
        model_state = self.full_model_state()
        optimizer = self._full_optimizer()
        if self.cfg.fsdp:
            optimizer.gather()
        if self.ctx.is_main:
            meta = {
                "step": self.step,
                "data_position": self.step * self.cfg.grad_accum,
                "scheduler": {"kind": "warmup_cosine", "step": self.step - self.overflow_skips},
                "train_config": asdict(self.cfg),
                "world": self.ctx.world,
                **self.run_info,
            }
            if self.scaler is not None:
                meta["grad_scaler"] = self.scaler.state_dict()
            save_training_checkpoint(path, model_state, optimizer, meta)
            for _, old in list_checkpoints(self.ckpt_dir)[: -self.cfg.keep_checkpoints]:
                os.remove(old)
        barrier(self.ctx)
        return path

    def resume(self, path: str | None = None) -> int:
        """Load ``path`` (default: the newest intact checkpoint of the run); returns its step.

        Without ``path``, a checkpoint that cannot be read (a save cut short by a full disk, a
        damaged file) is reported and the next older one is tried; a run that was stopped
        before its first checkpoint starts again from step 0."""
        if path is not None:
            loaded = load_training_checkpoint(path)
        else:
            loaded, path = None, None
            for _, candidate in reversed(list_checkpoints(self.ckpt_dir)):
                try:
                    loaded, path = load_training_checkpoint(candidate), candidate
                    break
                except (ValueError, OSError) as e:
                    if self.ctx.is_main:
                        print(f"fusedvlm train: warning: skipping unreadable checkpoint: {e}", flush=True)
            if loaded is None:
                if self.ctx.is_main:
                    print(
                        f"fusedvlm train: warning: no intact checkpoint in {self.ckpt_dir}; starting from step 0",
                        flush=True,
                    )
                    self._truncate_metrics(0)
                barrier(self.ctx)
                return 0
        model_state, other, meta, opt_meta, rng_meta = loaded
        saved = meta["train_config"]
        for key in ("batch_size", "grad_accum", "seed"):
            if saved[key] != getattr(self.cfg, key):
                raise ValueError(
                    f"cannot resume {path}: it was trained with {key}={saved[key]}, this run has {getattr(self.cfg, key)}"
                )
        expected = _model_state(self.objective)  # a DTensor's shape is the unsharded one
        from fusedvlm.checkpoint import check_state_dict

        check_state_dict(expected, model_state, f"checkpoint {path}")
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(
                self.objective, model_state, options=StateDictOptions(full_state_dict=True, strict=False)
            )
        else:
            self.objective.load_state_dict(model_state, strict=False)
        load_optimizer(self._full_optimizer(), other, opt_meta)
        set_rng_state(other, rng_meta)
        self.step = meta["step"]
        self.overflow_skips = self.step - meta["scheduler"]["step"]
        if self.scaler is not None and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])
        if self.ctx.is_main:
            self._truncate_metrics(self.step)
        barrier(self.ctx)
        return self.step

    def _truncate_metrics(self, step: int) -> None:
        """Keep the rows up to ``step`` and rewrite the file whole. A last line cut short by a
        kill is dropped with a warning; a damaged line anywhere else is an error."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, "rb") as f:
            lines = f.read().splitlines()
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                row_step = row["step"]
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                if n == len(lines):
                    print(
                        f"fusedvlm train: warning: dropping the torn last line {n} of {self.metrics_path} ({e})",
                        flush=True,
                    )
                    continue
                raise ValueError(f"{self.metrics_path}: line {n} is not a metrics row ({e})") from None
            if row_step <= step:
                rows.append(json.dumps(row) + "\n")
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(rows)
        os.replace(tmp, self.metrics_path)

    # ------------------------------------------------------------------ loop
    def _loader(self):
        sampler = ResumableBatchSampler(
            len(self.dataset),
            self.cfg.micro_batch,
            seed=self.cfg.seed,
            rank=self.ctx.rank,
            world=self.ctx.world,
            start=self.step * self.cfg.grad_accum,
        )
        return iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=sampler,
                collate_fn=self.collator,
                num_workers=self.cfg.num_workers,
            )
        )

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def accumulate_gradients(self, micro_batches) -> float | None:
        """Forward and backward over this rank's micro-batches of one step, leaving in
        ``.grad`` the gradient of the step's global mean loss; returns that loss, or None when
        no rank has a usable sample (every record of the step was skipped).

        A micro-batch whose records were all skipped is left out. DDP needs every rank to run
        the same forward/backward sequence, so when any rank has such a hole the step bypasses
        the DDP wrapper and averages the gradients over ranks itself (the same result)."""
        ctx = self.ctx
        usable = [b for b in micro_batches if b.size > 0]
        whole_step = getattr(self.objective, "whole_step", False)
        holes = (not usable) if whole_step else len(micro_batches) - len(usable)
        stats = all_reduce_sum(torch.tensor([float(sum(b.num_targets for b in usable)), float(holes)]), ctx)
        total, holes = float(stats[0]), float(stats[1])
        if total == 0:
            return None
        manual = ctx.enabled and holes > 0
        if manual and self.cfg.fsdp:
            bad = [s.index for b in micro_batches if b.size == 0 for s in b.skipped]
            raise ValueError(
                f"a micro-batch has no usable sample on some rank (skipped records here: {bad}); under --fsdp every rank "
                "must run every micro-batch: fix or remove those records, or train without --fsdp"
            )
        module = self.objective if manual else self.module
        if whole_step:
            with self._autocast():
                objective, loss = module(usable)
            self._backward(objective)
            if manual:
                self._average_grads_by_hand()
            return float(loss)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for k, batch in enumerate(usable):
            last = k == len(usable) - 1
            # FSDP reduce-scatters every micro-batch into the sharded gradients: skipping the
            # sync would hold unsharded gradients, which is what sharding is meant to avoid.
            sync = (
                contextlib.nullcontext()
                if (manual or last or not ctx.enabled or self.cfg.fsdp)
                else self.module.no_sync()
            )
            with sync:
                with self._autocast():
                    loss = module(batch)
                self._backward(loss * (ctx.world / total))
            loss_sum += loss.detach().double().cpu()
        if manual:
            self._average_grads_by_hand()
        return float(all_reduce_sum(loss_sum.reshape(1), ctx)[0]) / total

    def _average_grads_by_hand(self) -> None:
        """What DDP does after the backward, for a step that bypassed it."""
        for _, p in self.named_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(self.ctx.world)

    def train_step(self, micro_batches) -> dict:
        """One optimiser step over this rank's micro-batches; returns the step's metrics. A
        step whose records were all skipped changes no weight but still counts (the data
        position and the schedule move on, so a resumed run sees the same batches)."""
        lr = lr_at(self.step - self.overflow_skips, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.accumulate_gradients(micro_batches)
        if loss is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            return {"step": self.step, "loss": None, "lr": lr, "grad_norm": None, "no_update": True}
        average_replicated_grads(self.replicated, self.ctx)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # before clipping: clip and log the true gradient
        params = [p for _, p in self.named_params]
        if self.cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over sharded gradients
            grad_norm = grad_norm.full_tensor()
        row = {"step": self.step + 1, "loss": loss, "lr": lr, "grad_norm": float(grad_norm)}
        if self.scaler is None:
            self.optimizer.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update when a gradient is inf/NaN
            self.scaler.update()
            # update() backs the scale off exactly when the step was skipped for an overflow.
            overflow = self.scaler.get_scale() < scale
            self.overflow_skips += int(overflow)
            row.update({"loss_scale": scale, "overflow": overflow, "overflow_skips": self.overflow_skips})
            if overflow:
                row["grad_norm"] = None  # inf/NaN, which JSON cannot hold
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return row

    def fit(self, resume: bool | str = False, on_step=None) -> list[dict]:
        """Train to ``cfg.steps``; returns this call's metrics rows. ``on_step(trainer, row)``
        runs after every step (and after its checkpoint, if one is due)."""
        if resume:
            self.resume(resume if isinstance(resume, str) else None)
        self.objective.train()
        os.makedirs(self.out_dir, exist_ok=True)
        rows = []
        if self.step >= self.cfg.steps:
            return rows
        batches = self._loader()
        bar = None
        if self.cfg.progress and self.ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(self.cfg.grad_accum)]
                for b in micro:
                    for s in b.skipped:
                        print(f"fusedvlm train: skipped record {s.index}: {s.reason}", flush=True)
                        self.skipped.append(s)
                row = self.train_step(micro)
                if row.get("no_update") and self.ctx.is_main:
                    print(f"fusedvlm train: step {row['step']}: every record was skipped; no update", flush=True)
                if row.get("overflow") and self.ctx.is_main:
                    print(
                        f"fusedvlm train: step {row['step']}: inf/NaN gradient at loss scale {row['loss_scale']:g}; "
                        f"update skipped, loss scale now {self.scaler.get_scale():g}",
                        flush=True,
                    )
                elapsed = time.perf_counter() - t0
                counts = all_reduce_sum(
                    torch.tensor(
                        [
                            float(sum(b.num_tokens for b in micro)),
                            float(sum(b.size for b in micro)),
                            float(sum(len(b.skipped) for b in micro)),
                        ]
                    ),
                    self.ctx,
                )
                row.update(
                    {
                        "tokens_per_s": float(counts[0]) / elapsed,
                        "samples": int(counts[1]),
                        "skipped": int(counts[2]),
                        "step_s": elapsed,  # all ranks
                    }
                )
                rows.append(row)
                if self.ctx.is_main:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.update(1)
                    if row["loss"] is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                if self.step == self.cfg.steps or (self.cfg.save_every and self.step % self.cfg.save_every == 0):
                    self.save()
                if on_step is not None:
                    on_step(self, row)
        finally:
            if bar is not None:
                bar.close()
        return rows


def enable_gradient_checkpointing(objective: nn.Module) -> None:
    """Recompute activations in the backward pass: fusion decoder layers, the CLIP vision
    blocks and (stage 1) the text tower's blocks."""
    model = objective.model
    model.fuser.decoder.gradient_checkpointing = True
    model.vision.clip.set_grad_checkpointing(True)
    text = getattr(objective, "text", None)
    if text is not None:
        text.set_grad_checkpointing(True)
