"""Decoding speed-ups give the outputs of plain HF generate, token for token (fp32)."""

import pytest
import torch

from speechllm.audio import load_audio
from speechllm.data import SpeechDataset


def clips(tiny):
    return [load_audio(e.wav) for e in SpeechDataset(tiny["jsonl"]).examples]  # 4 lengths: left padding


def prompt_pass_rows(model, work):
    """Rows and positions of every LLM call that computes more than one position (a prompt pass)."""
    calls = []

    def record(module, args, kwargs, output):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            calls.append(tuple(embeds.shape[:2]))

    handle = model.llm.register_forward_hook(record, with_kwargs=True)
    try:
        return work(), calls
    finally:
        handle.remove()


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_beam_search_runs_the_prompt_once_per_clip_and_finds_the_same_beams(make_model, tiny, llm):
    model = make_model(llm)
    batch = model.processor(clips(tiny), [None] * 4)
    options = dict(num_beams=3, do_sample=False, max_new_tokens=6, length_penalty=1.0)
    stops = dict(eos_token_id=model.processor.stop_token_ids, pad_token_id=model.processor.pad_token_id)
    with torch.no_grad():
        embeds = model.embed(
            batch["input_ids"], batch["audio_mask"], batch["mel"], batch["mel_frames"], batch["audio_tokens"]
        )
        plain = model.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **options, **stops)
    shared, calls = prompt_pass_rows(model, lambda: model.generate(**batch, **options))
    assert torch.equal(shared, plain)
    rows, length = batch["input_ids"].shape
    assert calls == [(rows, length - 1), (rows * 3, 1)]  # the prompt once a clip, its last position once a beam
