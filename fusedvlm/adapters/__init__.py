"""Drop-in adapters: the question-aware fusion module in front of the LLM of an existing VLM.

An adapter wraps a host VLM (a Hugging Face model, left unmodified and frozen) and a
:class:`fusedvlm.FusionModule`. The host's own image-token path is bypassed; the host's vision
features and the question text go through the fusion module instead, and n_l + (k - 1) * n_s
fused tokens for k questions reach the LLM, n_l in front of the first question and n_s in
front of each later one::

    adapter = attach(host, FusionConfig(...), n_l=64)          # the family's adapter (adapter_for)
    inputs = adapter.prepare_inputs(tokenizer, [[("What is this?", None)]],
                                    images=[image], image_processor=processor.image_processor)
    out_ids = adapter.generate(**inputs, max_new_tokens=32)   # host.generate, KV cache and all
    loss = adapter(**inputs_with_answers).loss                  # stage-2 loss; only fusion params train
    adapter.save_pretrained("ckpt/")                            # the fusion module (+ adapter.json)
    adapter = type(adapter).from_pretrained(host, "ckpt/")

Families (``config.model_type`` -> file): ``llava`` (LLaVA-1.5, :mod:`.llava`), ``qwen2_vl`` and
``qwen2_5_vl`` (:mod:`.qwen2_vl`), ``idefics3`` and ``smolvlm`` (:mod:`.idefics3`),
``llava_onevision`` (:mod:`.llava_onevision`), ``gemma3`` (:mod:`.gemma3`). Each file's
docstring says which features it hands over. Training-free baselines at the same token
budget (FastV, VisionZip) are in :mod:`.baselines`.

What the generic part (:class:`~fusedvlm.adapters.base.FusionAdapter`) needs from any host:
``get_input_embeddings()``, ``forward(inputs_embeds=, attention_mask=, position_ids=, labels=)``
and ``generate(input_ids=, inputs_embeds=, attention_mask=)`` of a Hugging Face causal LM. It
builds the prompt itself (one placeholder id per fused token, placed before each question,
between the host's image markers where it has them),
embeds it, scatters the fused tokens over the placeholders in order, and hands the embeddings
to the host, so the host's image path never runs. Several images of one conversation
(``images_per_sample``) give one vision prefix, their prefixes back to back.

Contract of a model family (one small file): subclass ``FusionAdapter`` and define

* ``family`` (str) and ``model_types`` (the ``config.model_type`` values it serves);
* ``default_prompt``: a :class:`~fusedvlm.adapters.base.PromptFormat` (the family's chat layout,
  built by :class:`fusedvlm.chat.ChatLayout`, the one prompt builder; ``template=None`` is the
  host tokenizer's own chat template);
* ``vision_inputs``: the image processor's outputs it takes, ``pixel_values`` first (e.g.
  ``("pixel_values", "image_grid_thw")``), and ``count_images(**those)`` if the images are not
  the rows of ``pixel_values``;
* ``check_host(host)`` (classmethod): raise a ValueError naming what the host lacks
  (:func:`~fusedvlm.adapters.base.require_host_parts` does it in one line);
* ``host_vision_layout(host)`` (classmethod) -> ``(width, grid)``: the width of the vision
  features the adapter hands over and the ``(H, W)`` token grid of each view (None if they are
  not a grid, e.g. a kept CLS token: then only ``merge=False`` works); ``dynamic_grid = True``
  when the grid follows the image size (then ``vision_features`` gives it per image);
* ``host_llm_width(host)`` and ``host_image_token_id(host)`` (classmethods; the defaults read
  ``config.text_config.hidden_size`` and ``config.image_token_id``);
* ``vision_features(pixel_values, **other vision_inputs)`` ->
  :class:`~fusedvlm.adapters.base.VisionFeatures`: the features, packed one image per segment;
* the host's image markers, written around every run of fused tokens (default none), from
  where the host names them: ``host_fused_markers(host)`` (classmethod) -> ids its config
  holds (Qwen's ``<|vision_start|>``/``<|vision_end|>``, Gemma 3's ``<start_of_image>``/
  ``<end_of_image>``), or ``image_markers(tokenizer)``
  (classmethod) -> ``(before, after)`` text its processor writes (Idefics3's
  ``<fake_token_around_image><global-img>``), which the prompt layout tokenises;
* ``host_positions`` where the LLM's position ids are not one per token (Qwen's M-RoPE);
* ``host_generate`` only where the host's ``generate`` refuses ``inputs_embeds`` (Gemma 3).

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
