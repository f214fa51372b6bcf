"""Decoding work that HF generate would repeat: beam search's prompt pass, once per clip instead of once per beam."""

import torch
from transformers import DynamicCache


@torch.no_grad()
def shared_prompt_cache(llm, inputs_embeds, attention_mask, num_beams: int) -> DynamicCache:
    """The KV cache of every prompt position but the last, computed once per clip and repeated for each beam.

    generate(cache=..., inputs_embeds=...) computes only the positions past the cache: the last one, whose logits
    start the search, for every beam. Without it, generate expands the batch to beams first and runs the whole
    prompt pass num_beams times over identical rows."""
    cache = DynamicCache(config=llm.config)
    mask = attention_mask[:, :-1]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    llm(
        inputs_embeds=inputs_embeds[:, :-1],
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(num_beams)
    return cache
