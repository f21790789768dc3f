"""The model-independent half of every drop-in adapter (contract: :mod:`fusedvlm.adapters`)."""

from __future__ import annotations

import dataclasses
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fusedvlm.chat import IGNORE_INDEX, ChatLayout, Tokens
from fusedvlm.config import FusionConfig
from fusedvlm.model.fusion_module import FusedTokens, FusionModule, FusionModuleConfig, VisionPrefix
from fusedvlm.packing import cu_seqlens_from_lengths, pad_rows

ADAPTER_CONFIG_NAME = "adapter.json"

Turn = tuple[str, str | None]


@dataclass
class VisionFeatures:
    """What a family hands the fusion module: ``tokens`` (T_v, width) of every image back to
    back, ``cu_seqlens`` (n + 1,) int32 with one segment per image, and ``grids``: per image the
    (H, W) token grid of each of its views, for hosts whose grid changes with the image size
    (None: every view has the grid of ``host_vision_layout``)."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    grids: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class PromptFormat:
    """Which :class:`fusedvlm.chat.ChatLayout` builds the host LLM's prompts: ``template``, a
    layout name or None for the host tokenizer's own chat template, and ``system`` (None: the
    layout's default). The default is LLaVA-1.5's prompt
    (``USER: <image>\\nQ ASSISTANT: A</s>USER: ...``)."""

    template: str | None = "llava"
    system: str | None = None

    def layout(self, tokenizer, image_markers: tuple[str, str] = ("", "")) -> ChatLayout:
        return ChatLayout(self.template, tokenizer, self.system, image_markers)


def require_host_parts(
    host: nn.Module, family: str, config: Sequence[str] = (), modules: Sequence[str] = (), methods: Sequence[str] = ()
) -> None:
    """One line naming what ``host`` lacks for ``family``: config fields (None counts as
    missing), submodules (dotted paths) and methods."""
    cfg = getattr(host, "config", None)
    lacks = [f"config.{name}" for name in config if getattr(cfg, name, None) is None]
    for path in modules:
        obj = host
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if not isinstance(obj, nn.Module):
            lacks.append(path)
    lacks += [f"{name}()" for name in ("get_input_embeddings", "generate", *methods) if not hasattr(host, name)]
    if lacks:
        raise ValueError(f"{type(host).__name__} is not a {family} host: it lacks {', '.join(lacks)}")


def run_frozen(module: nn.Module):
    """Grad mode for a host part: a frozen one needs no graph; one unfrozen by the user gets gradients."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))


class FusionAdapter(nn.Module, ABC):
    """A host VLM whose LLM receives fused tokens instead of its projector's outputs.

    The host is frozen (``requires_grad=False``) and kept in eval mode; only the fusion
    module trains. Families implement the hooks listed in :mod:`fusedvlm.adapters`."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    default_prompt: ClassVar[PromptFormat] = PromptFormat()
    # The image processor's outputs that vision_features takes, pixel_values first.
    vision_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # True when the token grid follows the image size (it then comes with each image's features).
    dynamic_grid: ClassVar[bool] = False

    def __init__(self, host: nn.Module, fusion: FusionModule, prompt: PromptFormat | None = None):
        super().__init__()
        self.check_host(host)
        width, grid = self.host_vision_layout(host)
        if fusion.vision_width != width:
            raise ValueError(
                f"the fusion module takes vision width {fusion.vision_width}, the host's features are {width} wide"
            )
        if fusion.cfg.merge and grid is None and not self.dynamic_grid:
            raise ValueError("the host's vision features are not a token grid: the fusion module needs merge=False")
        if fusion.cfg.merge and self.dynamic_grid and fusion.cfg.grid is not None:
            raise ValueError(
                f"the {self.family} host's token grid follows each image's size: the fusion module must not fix "
                f"grid={fusion.cfg.grid}"
            )
        if fusion.cfg.merge and not self.dynamic_grid and fusion.cfg.grid not in (None, grid):
            raise ValueError(f"the fusion module merges {fusion.cfg.grid} grids, the host's features form {grid}")
        if fusion.cfg.output_size != self.host_llm_width(host):
            raise ValueError(
                f"the fusion module projects to {fusion.cfg.output_size}, the host LLM is {self.host_llm_width(host)} wide"
            )
        host.requires_grad_(False)
        self.host = host.eval()
        self.fusion = fusion
        self.prompt = prompt if prompt is not None else self.default_prompt
        self.image_token_id = self.host_image_token_id(host)
        self.fused_markers = self.host_fused_markers(host)
        self.grid = grid if fusion.cfg.merge else None

    # ------------------------------------------------------------------ family hooks
    @classmethod
    @abstractmethod
    def check_host(cls, host: nn.Module) -> None:
        """Raise a ValueError naming what ``host`` lacks for this family."""

    @classmethod
    @abstractmethod
    def host_vision_layout(cls, host: nn.Module) -> tuple[int, tuple[int, int] | None]:
        """(width of the handed-over vision features, the (H, W) grid of each view, or None when
        they are not a grid or, with ``dynamic_grid``, when the grid comes per image)."""

    @classmethod
    def host_llm_width(cls, host: nn.Module) -> int:
        """Hidden size of the host's LLM (where every transformers 5 VLM config keeps it)."""
        return host.config.text_config.hidden_size

    @classmethod
    def host_image_token_id(cls, host: nn.Module) -> int:
        """The placeholder id whose embeddings the fused tokens replace."""
        return int(host.config.image_token_id)

    @classmethod
    def host_fused_markers(cls, host: nn.Module) -> tuple[list[int], list[int]]:
        """The ids the host's processor writes before and after an image's tokens (Qwen's
        ``<|vision_start|>``/``<|vision_end|>``); each run of fused tokens gets them too."""
        return [], []

    def host_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The position ids of a fused prompt (B, L): left padding skipped, as ``generate``
        counts them. Families whose LLM has other positions (Qwen's M-RoPE) override this."""
        return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    def host_tokens(self, tokens: Tokens) -> tuple[list[int], list[int]]:
        """A layout's tokens as the host reads them: the image placeholder id in every fused
        slot, each run of fused slots between the family's markers (unlabelled), and labels."""
        start, end = self.fused_markers
        ids: list[int] = []
        labels: list[int] = []
        previous = False
        for t, fused, label in zip(tokens.ids, tokens.fused, tokens.labels):
            if fused != previous:
                marker = start if fused else end
                ids += marker
                labels += [IGNORE_INDEX] * len(marker)
            ids.append(self.image_token_id if fused else t)
            labels.append(label)
            previous = fused
        if previous:
            ids += end
            labels += [IGNORE_INDEX] * len(end)
        return ids, labels

    @classmethod
    def image_markers(cls, tokenizer) -> tuple[str, str]:
        """The text the host's processor writes before and after an image's tokens, written
        around every run of fused tokens (default: none)."""
        return "", ""

    def layout(self, tokenizer) -> ChatLayout:
        """The prompt builder of this adapter: its prompt format with the host's image markers."""
        return self.prompt.layout(tokenizer, self.image_markers(tokenizer))

    @abstractmethod
    def vision_features(self, pixel_values: torch.Tensor, **vision) -> VisionFeatures:
        """The image processor's outputs named in ``vision_inputs`` -> one segment per image."""

    @classmethod
    def count_images(cls, pixel_values: torch.Tensor, **vision) -> int:
        """How many images the processor's outputs hold (one per leading row by default)."""
        return pixel_values.shape[0]

    def _vision_kwargs(self, kwargs: dict) -> dict[str, torch.Tensor]:
        """Take this family's vision inputs other than pixel_values out of ``kwargs``."""
        names = self.vision_inputs[1:]
        missing = [n for n in names if kwargs.get(n) is None]
        if missing:
            raise ValueError(
                f"the {self.family} adapter needs {', '.join(missing)} (from the host's image processor) "
                "besides pixel_values"
            )
        return {n: kwargs.pop(n) for n in names}

    # ------------------------------------------------------------------ building
    @classmethod
    def attach(
        cls,
        host: nn.Module,
        fusion: FusionConfig | FusionModuleConfig | FusionModule | None = None,
        *,
        n_l: int | None = None,
        n_s: int | None = None,
        merge: bool | None = None,
        drop_question: bool | None = None,
        max_question_tokens: int | None = None,
        prompt: PromptFormat | None = None,
        dtype: torch.dtype | None = None,
    ) -> FusionAdapter:
        """Wrap ``host`` with a fusion module: a given module as is, else a new one built from
        a :class:`FusionModuleConfig`, or from a :class:`FusionConfig` (default: the paper's
        decoder) plus the host's widths and grid and the options ``n_l`` (default 64), ``n_s``
        (default: the design §5 rule), ``merge`` (True), ``drop_question`` and
        ``max_question_tokens`` (default: :class:`FusionModuleConfig`'s), which apply only there. The module goes to the host's
        device and ``dtype`` (default: the host's)."""
        cls.check_host(host)
        options = dict(
            n_l=n_l, n_s=n_s, merge=merge, drop_question=drop_question, max_question_tokens=max_question_tokens
        )
        given = sorted(k for k, v in options.items() if v is not None)
        if isinstance(fusion, (FusionModule, FusionModuleConfig)):
            if given:
                raise TypeError(
                    f"{', '.join(given)} only apply when building from a FusionConfig; "
                    f"this {type(fusion).__name__} already fixes them"
                )
            module = fusion if isinstance(fusion, FusionModule) else FusionModule(fusion)
        elif fusion is None or isinstance(fusion, FusionConfig):
            merge = True if merge is None else merge
            width, grid = cls.host_vision_layout(host)
            if merge and grid is None and not cls.dynamic_grid:
                raise ValueError(
                    f"the {cls.family} host's vision features are not a token grid; attach with merge=False"
                )
            # Options left unset keep FusionModuleConfig's defaults (n_l: the adapters' own 64).
            chosen = {
                k: v
                for k, v in dict(drop_question=drop_question, max_question_tokens=max_question_tokens).items()
                if v is not None
            }
            module = FusionModule(
                FusionModuleConfig(
                    fusion=fusion if fusion is not None else FusionConfig(),
                    output_size=cls.host_llm_width(host),
                    n_l=64 if n_l is None else n_l,
                    n_s=n_s,
                    merge=merge,
                    grid=grid if merge else None,
                    input_size=width,
                    **chosen,
                )
            )
        else:
            raise TypeError(
                f"fusion must be a FusionModule, FusionModuleConfig, FusionConfig or None, got {type(fusion).__name__}"
            )
        ref = next(host.parameters())
        module.to(device=ref.device, dtype=dtype if dtype is not None else ref.dtype)
        return cls(host, module, prompt)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The fusion module (``config.json``, ``model.safetensors``) and ``adapter.json`` (family
        and prompt format); the host is the user's and is not written."""
        # One directory switch for all three files: never a new module beside an old adapter.json.
        meta = {"family": self.family, "prompt": dataclasses.asdict(self.prompt)}
        self.fusion.save_pretrained(path, extra_json={ADAPTER_CONFIG_NAME: meta})

    @classmethod
    def from_pretrained(
        cls, host: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None
    ) -> FusionAdapter:
        """Attach a saved fusion module to ``host`` (the prompt format saved with it, if any)."""
        path = os.fspath(path)
        cls.check_host(host)
        ref = next(host.parameters())
        module = FusionModule.from_pretrained(path, device=ref.device, dtype=dtype if dtype is not None else ref.dtype)
        prompt = None
        meta_path = os.path.join(path, ADAPTER_CONFIG_NAME)
        if os.path.isfile(meta_path):
            try:
                with open(meta_path, encoding="utf-8") as f:
                    meta = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{meta_path} is not valid JSON (truncated or corrupt?): {e}") from None
            if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), dict):
                raise ValueError(f"{meta_path} is not an adapter config (no 'family' and 'prompt')")
            if meta.get("family") != cls.family:
                raise ValueError(f"{path} holds a {meta.get('family')!r} adapter, not {cls.family!r}")
            try:
                prompt = PromptFormat(**meta["prompt"])
            except TypeError:
                raise ValueError(
                    f"{meta_path}: prompt {meta['prompt']} is not a prompt format (template, system)"
                ) from None
        return cls(host, module, prompt)

    def train(self, mode: bool = True):
        super().train(mode)
        self.host.eval()  # frozen: no dropout whatever the caller does
        return self

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ inputs
    def image_inputs(
        self, pixel_values: torch.Tensor | None, images, image_processor, vision: dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``pixel_values`` and the family's other vision inputs, given either themselves or
        ``images`` with the host's ``image_processor``."""
        if (pixel_values is None) == (images is None):
            raise ValueError("pass exactly one of pixel_values and images (with image_processor)")
        if images is not None:
            if image_processor is None:
                raise ValueError("images need the host's image_processor")
            if vision:
                raise ValueError(f"{', '.join(sorted(vision))} come from the image processor when images are given")
            processed = image_processor(images=images, return_tensors="pt")
            pixel_values = processed["pixel_values"]
            vision = {k: processed[k] for k in self.vision_inputs[1:] if k in processed}
        unknown = sorted(set(vision) - set(self.vision_inputs))
        if unknown:
            raise ValueError(f"the {self.family} adapter takes no vision input {', '.join(unknown)}")
        return pixel_values, self._vision_kwargs(dict(vision))

    def prepare_inputs(
        self,
        tokenizer,
        conversations: Sequence[Sequence[Turn]] | Sequence[Turn],
        pixel_values: torch.Tensor | None = None,
        *,
        images=None,
        image_processor=None,
        images_per_sample: Sequence[int] | None = None,
        n_l: int | None = None,
        n_s: int | None = None,
        padding_side: str = "left",
        **vision,
    ) -> dict[str, torch.Tensor]:
        """Prompts for a batch of conversations, ready for ``self(**inputs)`` and
        ``self.generate(**inputs)``.

        ``conversations``: per sample, its turns ``(question, answer or None)`` (only the last
        answer may be None: that turn is the generation prompt); a single list of turns is one
        conversation. Pass either ``images`` with the host's ``image_processor`` (called as
        ``image_processor(images=images, return_tensors="pt")``; give it the nesting it expects)
        or its outputs: ``pixel_values`` and the family's other ``vision_inputs`` as keywords.
        ``images_per_sample`` (default one each) says how many consecutive images belong to each
        conversation; their vision prefixes are concatenated in front of its questions.
        The prompt is the :class:`~fusedvlm.chat.ChatLayout` of ``self.prompt`` with ``n_l``
        (first question) or ``n_s`` image placeholder ids before each question, inside the
        host's ``image_markers``. Returns
        ``input_ids``, ``attention_mask``, the vision inputs, the fusion inputs
        ``fusion_question_ids``, ``fusion_cu_seqlens``, ``fusion_questions_per_sample``,
        ``fusion_images_per_sample`` and, when some turn has an answer, ``labels``
        (IGNORE_INDEX except answers and their closing EOS)."""
        if conversations and conversations[0] and isinstance(conversations[0][0], str):
            conversations = [conversations]  # one conversation: a sequence of (question, answer) turns
        if not conversations:
            raise ValueError("prepare_inputs needs at least one conversation")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pixel_values, vision = self.image_inputs(pixel_values, images, image_processor, vision)
        num_images = self.count_images(pixel_values, **vision)
        per_image = [1] * len(conversations) if images_per_sample is None else [int(n) for n in images_per_sample]
        if len(per_image) != len(conversations) or any(n < 1 for n in per_image):
            raise ValueError(
                f"images_per_sample must give each of the {len(conversations)} conversations at least one image, "
                f"got {per_image}"
            )
        if sum(per_image) != num_images:
            raise ValueError(
                f"{num_images} images for {len(conversations)} conversations "
                f"({'images_per_sample ' + str(per_image) if images_per_sample is not None else 'one image each'})"
            )
        n_l, n_s = self.fusion.resolve_counts(n_l, n_s)
        layout = self.layout(tokenizer)

        rows, labels, qids, per_sample = [], [], [], []
        for i, turns in enumerate(conversations):
            if not turns:
                raise ValueError(f"conversation {i} has no turns")
            for j, (_, answer) in enumerate(turns):
                if answer is None and j != len(turns) - 1:
                    raise ValueError(f"conversation {i}: only the last turn may be unanswered (turn {j} is)")
            tokens = layout.conversation(list(turns), [n_l] + [n_s] * (len(turns) - 1))
            if any(t == self.image_token_id and not f for t, f in zip(tokens.ids, tokens.fused)):
                raise ValueError(
                    f"conversation {i}: its text tokenizes to the image placeholder id {self.image_token_id}"
                )
            # The host scatters the fused tokens over its image placeholders.
            ids, labelled = self.host_tokens(tokens)
            rows.append(ids)
            labels.append(labelled)
            qids += [self.fusion.question_ids(question) for question, _ in turns]
            per_sample.append(len(turns))

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids, attention = pad_rows(rows, pad, side=padding_side)
        label_t, _ = pad_rows(labels, IGNORE_INDEX, side=padding_side)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pixel_values": pixel_values,
            **vision,
            "fusion_question_ids": torch.tensor([t for q in qids for t in q], dtype=torch.long),
            "fusion_cu_seqlens": cu_seqlens_from_lengths([len(q) for q in qids]),
            "fusion_questions_per_sample": torch.tensor(per_sample, dtype=torch.long),
            "fusion_images_per_sample": torch.tensor(per_image, dtype=torch.long),
        }
        if any(answer is not None for turns in conversations for _, answer in turns):
            inputs["labels"] = label_t
        return inputs

    # ------------------------------------------------------------------ fused path
    def vision_prefix(
        self, pixel_values: torch.Tensor, images_per_sample: torch.Tensor | Sequence[int] | None = None, **vision
    ) -> VisionPrefix:
        """The host's vision features through the fusion module's input projection and local
        merge (each image on its own grid), one prefix per sample (its images back to back)."""
        return self.encode_features(self.vision_features(pixel_values, **vision), images_per_sample)

    def encode_features(
        self, feats: VisionFeatures, images_per_sample: torch.Tensor | Sequence[int] | None = None
    ) -> VisionPrefix:
        """:meth:`vision_prefix` from features already computed."""
        dev = self.fusion.device
        tokens = feats.tokens.to(dev, self.fusion.projection.weight.dtype)
        cu = feats.cu_seqlens.to(dev)
        num_images = cu.numel() - 1
        if not self.fusion.cfg.merge or feats.grids is None or len(set(feats.grids)) <= 1:
            grid = feats.grids[0] if feats.grids else self.grid
            prefix = self.fusion.encode_vision(tokens, cu, grid if self.fusion.cfg.merge else None)
        else:  # grids differ between images: merge each on its own
            bounds = cu.tolist()
            parts = [
                self.fusion.encode_vision(tokens[a:b], cu_seqlens_from_lengths([b - a], device=dev), g)
                for a, b, g in zip(bounds[:-1], bounds[1:], feats.grids)
            ]
            prefix = VisionPrefix(
                torch.cat([p.tokens for p in parts]),
                cu_seqlens_from_lengths([p.tokens.shape[0] for p in parts], device=dev),
                [v for p in parts for v in p.num_views],
            )
        counts = [1] * num_images if images_per_sample is None else [int(n) for n in images_per_sample]
        if sum(counts) != num_images or any(n < 1 for n in counts):
            raise ValueError(f"images_per_sample {counts} does not split the {num_images} images")
        if counts == [1] * num_images:
            return prefix
        # A sample's images are consecutive: its prefix is their prefixes back to back.
        lengths, views = prefix.cu_seqlens.diff().tolist(), prefix.num_views
        sample_lengths, sample_views, start = [], [], 0
        for n in counts:
            sample_lengths.append(sum(lengths[start : start + n]))
            sample_views.append(sum(views[start : start + n]))
            start += n
        return VisionPrefix(prefix.tokens, cu_seqlens_from_lengths(sample_lengths, device=dev), sample_views)

    def fused_tokens(
        self,
        pixel_values: torch.Tensor,
        fusion_question_ids: torch.Tensor,
        fusion_cu_seqlens: torch.Tensor,
        fusion_questions_per_sample: torch.Tensor | Sequence[int] | None = None,
        n_l: int | None = None,
        n_s: int | None = None,
        fusion_images_per_sample: torch.Tensor | Sequence[int] | None = None,
        **vision,
    ) -> FusedTokens:
        """The host's vision features through the fusion module: packed fused tokens in the LLM width."""
        prefix = self.vision_prefix(pixel_values, fusion_images_per_sample, **self._vision_kwargs(dict(vision)))
        n = prefix.cu_seqlens.numel() - 1
        questions = self.fusion.split_questions(fusion_question_ids, fusion_cu_seqlens, fusion_questions_per_sample, n)
        return self.fusion.fuse(prefix, questions, n_l=n_l, n_s=n_s)

    def inputs_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        fusion_question_ids: torch.Tensor,
        fusion_cu_seqlens: torch.Tensor,
        fusion_questions_per_sample: torch.Tensor | Sequence[int] | None = None,
        n_l: int | None = None,
        n_s: int | None = None,
        fusion_images_per_sample: torch.Tensor | Sequence[int] | None = None,
        **vision,
    ) -> torch.Tensor:
        """(B, L, d_llm): the host's token embeddings with the fused tokens scattered, in
        order, over each row's image placeholders."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        fused = self.fused_tokens(
            pixel_values,
            fusion_question_ids,
            fusion_cu_seqlens,
            fusion_questions_per_sample,
            n_l,
            n_s,
            fusion_images_per_sample,
            **vision,
        )
        counts = (input_ids == self.image_token_id).sum(1).tolist()
        expected = fused.cu_seqlens.diff().tolist()
        if len(counts) != len(expected):
            raise ValueError(f"{len(counts)} prompt rows for {len(expected)} samples (one conversation per row)")
        for i, (c, e) in enumerate(zip(counts, expected)):
            if c != e:
                raise ValueError(
                    f"row {i} has {c} image placeholder tokens but the fusion module made {e} fused tokens "
                    f"(n_l + (k-1)*n_s for its questions {fused.group_sizes[i]}); build prompts with prepare_inputs"
                )
        embeds = self.host.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id).unsqueeze(-1).to(embeds.device)
        return embeds.masked_scatter(mask, fused.tokens.to(embeds.device, embeds.dtype))

    def _embeds(self, input_ids, pixel_values, fusion, kwargs: dict) -> torch.Tensor:
        vision = self._vision_kwargs(kwargs)
        return self.inputs_embeds(input_ids, pixel_values, *fusion, **vision)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        fusion_question_ids: torch.Tensor,
        fusion_cu_seqlens: torch.Tensor,
        fusion_questions_per_sample: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        n_l: int | None = None,
        n_s: int | None = None,
        fusion_images_per_sample: torch.Tensor | Sequence[int] | None = None,
        **host_kwargs,
    ):
        """The host's forward on fused embeddings (its output type; ``.loss`` with ``labels``).
        The family's vision inputs (e.g. ``image_grid_thw``) are taken from ``host_kwargs``;
        the rest go to the host."""
        fusion = (fusion_question_ids, fusion_cu_seqlens, fusion_questions_per_sample, n_l, n_s)
        embeds = self._embeds(input_ids, pixel_values, (*fusion, fusion_images_per_sample), host_kwargs)
        if attention_mask is not None and "position_ids" not in host_kwargs:
            # The positions host_generate gives the same prompt, so training and decoding agree.
            host_kwargs["position_ids"] = self.host_positions(input_ids, attention_mask)
        return self.host(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **host_kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        fusion_question_ids: torch.Tensor,
        fusion_cu_seqlens: torch.Tensor,
        fusion_questions_per_sample: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        n_l: int | None = None,
        n_s: int | None = None,
        fusion_images_per_sample: torch.Tensor | Sequence[int] | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """``host.generate`` from the fused prompt: the embeddings feed the prefill, later steps
        run on the host's KV cache. Returns the prompt ids followed by the new ids, as
        ``host.generate`` does. ``labels`` (from prepare_inputs) is accepted and unused."""
        del labels
        fusion = (fusion_question_ids, fusion_cu_seqlens, fusion_questions_per_sample, n_l, n_s)
        embeds = self._embeds(input_ids, pixel_values, (*fusion, fusion_images_per_sample), generate_kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.host_generate(input_ids, embeds, attention_mask, **generate_kwargs)

    def host_generate(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs
    ) -> torch.Tensor:
        """``host.generate`` with the fused embeddings as the prefill's inputs and the prompt's
        :meth:`host_positions` (generate continues them one per new token); families override
        this where their host's generate does not take ``inputs_embeds``."""
        return self.host.generate(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=self.host_positions(input_ids, attention_mask),
            **generate_kwargs,
        )
