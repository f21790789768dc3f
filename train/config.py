"""The training run's typed settings, kept free of heavy imports: ``fusedvlm train`` builds its
options from these dataclasses (:mod:`fusedvlm.options`) without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _opt(default, text: str, **metadata):
    """A TrainConfig field with its command-line help (fusedvlm.options)."""
    return field(default=default, metadata={"help": text, **metadata})


@dataclass
class TrainConfig:
    """One training run's optimisation and runtime settings. Every field is a flag of
    ``fusedvlm train`` (:mod:`fusedvlm.options`); the defaults are design §7's stage 1."""

    steps: int = field(metadata={"help": "optimiser steps"})
    batch_size: int = _opt(256, "global samples per optimiser step")
    grad_accum: int = _opt(1, "micro-batches per optimiser step")
    lr: float = _opt(2e-5, "peak learning rate (AdamW)")
    warmup_ratio: float = _opt(0.1, "fraction of the steps that warm the learning rate up linearly")
    min_lr_ratio: float = _opt(0.0, "cosine floor as a fraction of --lr")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.999, "AdamW beta2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; <= 0 disables clipping (the norm is still logged)")
    precision: str = _opt(
        "auto",
        "autocast dtype; weights stay fp32. auto: bf16 on GPUs that support it, else fp32. "
        "fp16: with dynamic loss scaling (a step whose gradients overflow is skipped and "
        "logged)",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass to save memory")
    fsdp: bool = _opt(
        False,
        "under torchrun (2+ processes): shard the trainable weights, gradients and optimiser "
        "state with FSDP2 instead of replicating them with DDP; the frozen LLM stays replicated",
    )
    seed: int = _opt(0, "seeds the weights' initialisation and the data order")
    save_every: int = _opt(0, "checkpoint every N steps; 0: only at the end (always at the end)")
    keep_checkpoints: int = _opt(2, "newest checkpoints kept in the run directory")
    num_workers: int = _opt(0, "DataLoader worker processes")
    deterministic: bool = _opt(False, "torch.use_deterministic_algorithms(True)")
    progress: bool = _opt(True, "tqdm progress bar")

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.batch_size < 1 or self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum ({self.grad_accum})"
            )
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.save_every < 0 or self.keep_checkpoints < 1 or self.num_workers < 0:
            raise ValueError("save_every and num_workers must be >= 0 and keep_checkpoints >= 1")

    @property
    def micro_batch(self) -> int:
        """Global micro-batch (all ranks together)."""
        return self.batch_size // self.grad_accum


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1's own settings (design §7); each is a flag of ``fusedvlm train stage1``."""

    embed_dim: int = field(default=768, metadata={"help": "joint embedding width (projection C -> this)"})
    temperature: float = field(default=0.07, metadata={"help": "initial InfoNCE temperature (learnable; CLIP's)"})
    orthogonality_weight: float = field(default=1.0, metadata={"help": "weight of MSE(Z Z^T, I)"})
    text_model: str | None = field(
        default=None,
        metadata={"help": "open_clip model config for the text tower (None: the vision tower's, or a small one)"},
    )
    text_checkpoint: str | None = field(
        default=None, metadata={"help": "open_clip CLIP weights for the text tower (local file)"}
    )
    text_width: int | None = field(default=None, metadata={"help": "small text tower width (None: the fusion width)"})
    text_layers: int = field(default=2, metadata={"help": "small text tower layers"})
    text_heads: int = field(default=4, metadata={"help": "small text tower heads"})


# TrainConfig's defaults are design §7's stage 1 (global batch 256, warm-up 10 %); stage 2's differ.
STAGE_DEFAULTS = {"stage1": {}, "stage2": {"batch_size": 2560, "warmup_ratio": 0.03}}
# The paper's global batches assume its data sets (558 K and 665 K records). The smaller presets are
# for tests, demos and small data sets, which such a batch would not even fill once.
PRESET_BATCH_SIZE = {"tiny": 8, "small": 32, "smol": 32}


def training_defaults(stage: str, preset: str) -> dict:
    """The TrainConfig values that ``fusedvlm train STAGE --preset PRESET`` uses unless given."""
    out = {"batch_size": TrainConfig.batch_size, "warmup_ratio": TrainConfig.warmup_ratio, **STAGE_DEFAULTS[stage]}
    if preset in PRESET_BATCH_SIZE:
        out["batch_size"] = PRESET_BATCH_SIZE[preset]
    return out
