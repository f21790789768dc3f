"""Drop-in adapters: the question-aware fusion module in front of the LLM of an existing VLM.

An adapter wraps a host VLM (a Hugging Face model, left unmodified and frozen) and a
:class:`fusedvlm.FusionModule`. The host's own projector path (for LLaVA-1.5: 576 projected
patch tokens per image) is bypassed; the host's vision features and the question text go
through the fusion module instead, and n_l + (k - 1) * n_s fused tokens for k questions reach
the LLM, n_l in front of the first question and n_s in front of each later one::

    adapter = LlavaFusionAdapter.attach(llava, FusionConfig(...), n_l=64)
    inputs = adapter.prepare_inputs(tokenizer, [[("What is this?", None)]], pixel_values=px)
    out_ids = adapter.generate(**inputs, max_new_tokens=32)   # host.generate, KV cache and all
    loss = adapter(**inputs_with_answers).loss                  # stage-2 loss; only fusion params train
    adapter.save_pretrained("ckpt/")                            # the fusion module (+ adapter.json)
    adapter = LlavaFusionAdapter.from_pretrained(llava, "ckpt/")

What the generic part (:class:`~fusedvlm.adapters.base.FusionAdapter`) needs from any host:
``get_input_embeddings()``, ``forward(inputs_embeds=, attention_mask=, position_ids=, labels=)``
and ``generate(input_ids=, inputs_embeds=, attention_mask=)`` of a Hugging Face causal LM. It
builds the prompt itself (one placeholder id per fused token, placed before each question),
embeds it, scatters the fused tokens over the placeholders in order, and hands the embeddings
to the host, so the host's image path never runs.

Contract of a model family (one small file, e.g. :mod:`fusedvlm.adapters.llava`): subclass
``FusionAdapter`` and define

* ``family`` (str) and ``model_types`` (the ``config.model_type`` values it serves);
* ``default_prompt``: a :class:`~fusedvlm.adapters.base.PromptFormat` (the family's chat layout,
  built by :class:`fusedvlm.chat.ChatLayout`, the one prompt builder);
* ``check_host(host)`` (classmethod): raise a ValueError naming what the host lacks;
* ``host_vision_layout(host)`` (classmethod) -> ``(width, grid)``: the width of the vision
  features the adapter hands over and their per-image ``(H, W)`` token grid (None if they are
  not a grid, e.g. a kept CLS token: then only ``merge=False`` works);
* ``host_llm_width(host)`` and ``host_image_token_id(host)`` (classmethods);
* ``vision_features(pixel_values)`` -> ``(tokens (T_v, width), cu_seqlens (n + 1,))``: the
  features the host's projector would have seen, packed one image per segment.

Register the class in ``_FAMILIES`` below so that :func:`adapter_for` finds it.
"""

from __future__ import annotations

import importlib

_FAMILIES = {
    "llava": ("fusedvlm.adapters.llava", "LlavaFusionAdapter"),
    "qwen2_vl": ("fusedvlm.adapters.qwen2_vl", "Qwen2VLFusionAdapter"),
    "idefics3": ("fusedvlm.adapters.idefics3", "Idefics3FusionAdapter"),
    "llava_onevision": ("fusedvlm.adapters.llava_onevision", "LlavaOnevisionFusionAdapter"),
    "gemma3": ("fusedvlm.adapters.gemma3", "Gemma3FusionAdapter"),
}


def _classes():
    return [getattr(importlib.import_module(m), c) for m, c in _FAMILIES.values()]


def _model_types() -> list[str]:
    return [t for cls in _classes() for t in cls.model_types]


def adapter_for(host):
    """The adapter class serving ``host.config.model_type``."""
    model_type = getattr(getattr(host, "config", None), "model_type", None)
    for cls in _classes():
        if model_type in cls.model_types:
            return cls
    raise ValueError(f"no fusedvlm adapter for model_type {model_type!r}; supported: {', '.join(_model_types())}")


def attach(host, fusion=None, **kwargs):
    """Attach a new fusion module to ``host`` with the adapter of its family (see ``attach``
    of :class:`~fusedvlm.adapters.base.FusionAdapter` for the arguments)."""
    return adapter_for(host).attach(host, fusion, **kwargs)


def __getattr__(name: str):
    # Lazy, so that importing fusedvlm.adapters does not pull in transformers or torch.
    for module_name, class_name in (
        *_FAMILIES.values(),
        ("fusedvlm.adapters.base", "FusionAdapter"),
        ("fusedvlm.adapters.base", "PromptFormat"),
    ):
        if name == class_name:
            return getattr(importlib.import_module(module_name), class_name)
    raise AttributeError(f"module 'fusedvlm.adapters' has no attribute {name!r}")
