"""Multi-turn chat on a drop-in adapter that reuses earlier turns' work, as
:class:`fusedvlm.session.ChatSession` does for :class:`fusedvlm.FusedVLM`.

The host's vision features and the fusion decoder's keys/values of the vision prefix and of
every earlier question group are computed once (:meth:`FusionModule.prefix_cache`,
:meth:`FusionModule.fuse_next`: attention is causal, so the fused tokens of a later question
are those of recomputing the whole stream), and the host LLM keeps its KV cache across turns,
so a later turn costs only its own tokens::

    chat = AdapterSession(adapter, tokenizer, images=[image], image_processor=processor.image_processor)
    first = chat.ask("What is in the picture?", max_new_tokens=32)    # generated ids
    second = chat.ask("What colour is it?", max_new_tokens=32)
"""

from __future__ import annotations

import torch

from fusedvlm.adapters.base import FusionAdapter


class AdapterSession:
    def __init__(
        self,
        adapter: FusionAdapter,
        tokenizer,
        pixel_values: torch.Tensor | None = None,
        *,
        images=None,
        image_processor=None,
        n_l: int | None = None,
        n_s: int | None = None,
        **vision,
    ):
        """All the given images belong to this one conversation."""
        self.adapter, self.tokenizer = adapter, tokenizer
        self.n_l, self.n_s = adapter.fusion.resolve_counts(n_l, n_s)
        self.layout = adapter.layout(tokenizer)
        pixel_values, vision = adapter.image_inputs(pixel_values, images, image_processor, vision)
        num_images = adapter.count_images(pixel_values, **vision)
        with torch.no_grad():
            prefix = adapter.vision_prefix(pixel_values, [num_images], **vision)
            self._fusion_cache = adapter.fusion.prefix_cache(prefix)
        self.ids: list[int] = []  # the conversation the LLM has read, fused slots as the image placeholder id
        self._llm_cache = None
        self._cached_ids: list[int] = []  # what the LLM cache holds
        self.turns = 0
        self.last_output = None

    @torch.no_grad()
    def ask(self, question: str, **generate_kwargs) -> list[int]:
        """One turn through ``host.generate``; returns the generated ids (the answer), and keeps
        ``host.generate``'s whole output as ``last_output``."""
        adapter, host = self.adapter, self.adapter.host
        first = self.turns == 0
        n = self.n_l if first else self.n_s
        fused, fusion_cache = adapter.fusion.fuse_next(
            self._fusion_cache, [adapter.fusion.question_ids(question)], [first], self.n_l, self.n_s
        )
        ids = self.ids + adapter.host_tokens(self.layout.turn(question, n, first, None))[0]
        # The cache is reused up to the first token where it and the conversation part ways
        # (a generated answer is re-tokenized with its closing piece).
        cached = 0
        while cached < min(len(self._cached_ids), len(ids) - 1) and self._cached_ids[cached] == ids[cached]:
            cached += 1
        cache = self._llm_cache
        if cache is not None and cached < cache.get_seq_length():
            cache.crop(cached)
        todo = torch.tensor([ids[cached:]], device=host.device)
        embeds = host.get_input_embeddings()(todo)
        slots = todo == adapter.image_token_id
        if int(slots.sum()) != n:
            raise RuntimeError(f"{int(slots.sum())} uncached image placeholders for {n} fused tokens")
        embeds = embeds.masked_scatter(slots[..., None], fused.tokens.to(embeds.device, embeds.dtype))
        all_ids = torch.tensor([ids], device=host.device)
        mask = torch.ones_like(all_ids)
        positions = adapter.host_positions(all_ids, mask)
        # Prefill all but the last token on top of the cache; generate embeds that one (text) itself.
        out = host(
            inputs_embeds=embeds[:, :-1],
            cache=cache,
            attention_mask=mask[:, :-1],
            position_ids=positions[..., cached:-1],
            use_cache=True,
            logits_to_keep=1,
        )
        self.last_output = host.generate(
            input_ids=all_ids, attention_mask=mask, cache=out.cache, position_ids=positions, **generate_kwargs
        )
        # With return_dict_in_generate the output also carries scores; last_output keeps them.
        generated = getattr(self.last_output, "sequences", self.last_output)
        answer = generated[0, len(ids) :].tolist()
        self._llm_cache, self._cached_ids = out.cache, ids + answer[:-1]
        self._fusion_cache = fusion_cache
        self.ids = ids + self.layout.answer(answer, labelled=False).ids
        self.turns += 1
        return answer
