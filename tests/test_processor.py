import datetime

import numpy as np
import pytest
import torch

from speechllm import AUDIO_PLACEHOLDER
from speechllm.audio import SAMPLE_RATE, WINDOW_SAMPLES, num_audio_tokens
from speechllm.nbest import DEFAULT_NBEST_PROMPT, render_prompt
from speechllm.processor import IGNORE_INDEX, PROMPT_CACHE_SIZE


def clip(seconds):
    return np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32) * 0.1


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_placeholder_expands_to_each_clips_token_count(make_model, llm):
    model = make_model(llm)
    seconds = [0.3, 1.0, 4.2, 31.0]  # the last spans two windows
    batch = model.processor([clip(s) for s in seconds], [None] * 4)
    counts = [num_audio_tokens(int(s * SAMPLE_RATE), model.config.projector_kernel_size) for s in seconds]
    assert batch["audio_mask"].sum(1).tolist() == counts
    window = num_audio_tokens(WINDOW_SAMPLES, model.config.projector_kernel_size)
    assert batch["audio_tokens"].tolist() == [counts[0], counts[1], counts[2], window, counts[3] - window]
    before, after = model.processor.prompt_ids(model.config.prompt)
    for row, count in zip(range(4), counts):
        real = batch["attention_mask"][row].bool()
        ids, is_audio = batch["input_ids"][row][real].tolist(), batch["audio_mask"][row][real].tolist()
        assert ids[: len(before)] == before and ids[len(before) + count :] == after  # the audio sits in the user turn
        assert is_audio == [False] * len(before) + [True] * count + [False] * len(after)
    assert not batch["audio_mask"][~batch["attention_mask"].bool()].any()  # padding is never audio


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_labels_cover_the_answer_and_its_end_of_turn_only(make_model, llm):
    model = make_model(llm)
    processor = model.processor
    batch = processor([clip(1.0), clip(2.0)], [None, None], ["hello world", "one two three"])
    for row, answer in enumerate(["hello world", "one two three"]):
        labels = batch["labels"][row]
        supervised = labels[labels != IGNORE_INDEX].tolist()
        assert processor.tokenizer.decode(supervised[:-1]) == answer
        assert supervised[-1] == processor.stop_token_ids[0]  # the end-of-turn token is learned...
        assert batch["attention_mask"][row][-1] == 1  # ...and attended to, although for qwen2 pad == eos
        n = len(supervised)
        assert (labels[:-n] == IGNORE_INDEX).all() and (labels[-n:] != IGNORE_INDEX).all()  # prompt and audio masked


def test_text_before_and_after_the_audio(make_model):
    model = make_model()
    prompt = f"Hypotheses: hello word | hello world\n{AUDIO_PLACEHOLDER}\nCorrect the transcript."
    batch = model.processor([clip(1.0)], [prompt], ["hello world"])
    text = model.tokenizer.decode(batch["input_ids"][0][~batch["audio_mask"][0]])
    assert "Hypotheses: hello word | hello world\n" in text and "\nCorrect the transcript." in text
    assert text.index("Hypotheses") < text.index("Correct")


def test_each_example_may_bring_its_own_prompt(make_model):
    model = make_model()
    batch = model.processor([clip(1.0), clip(1.0)], ["Summarise: " + AUDIO_PLACEHOLDER, None])
    first, second = (model.tokenizer.decode(batch["input_ids"][i][~batch["audio_mask"][i]]) for i in range(2))
    assert "Summarise: " in first and "Summarise" not in second
    assert "Transcribe the audio." in second


def test_prompt_without_placeholder_is_an_error(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="exactly once"):
        model.processor([clip(1.0)], ["no audio here"])


@pytest.mark.parametrize("kernel_size", [7, 8])
def test_kernel_sizes_that_do_not_divide_the_window(make_model, kernel_size):
    """Dynamic batches are padded to a multiple of both strides, never past Whisper's 1,500 positions."""
    model = make_model(projector_kernel_size=kernel_size)
    seconds = [30.0, 45.0, 2.0]
    batch = model.processor([clip(s) for s in seconds], [None] * 3)
    assert batch["mel"].shape[-1] == 3000
    with torch.no_grad():
        embeds = model.embed(*(batch[k] for k in ("input_ids", "audio_mask", "mel", "mel_frames", "audio_tokens")))
    counts = [num_audio_tokens(int(s * SAMPLE_RATE), kernel_size) for s in seconds]
    assert batch["audio_mask"].sum(1).tolist() == counts and embeds.shape[1] == batch["input_ids"].shape[1]
    assert counts[0] == -(-1500 // kernel_size)  # a whole window's frames, the last group part-filled


class Clock:
    """datetime for the chat template's strftime_now: today, until midnight() moves it a day on."""

    def __init__(self, midnight_after_calls=None):
        self.day, self.calls, self.midnight_after_calls = (
            datetime.datetime(2025, 12, 31, 23, 59),
            0,
            midnight_after_calls,
        )

    def now(self):
        if self.calls == self.midnight_after_calls:
            self.midnight()
        self.calls += 1
        return self.day

    def midnight(self):
        self.day += datetime.timedelta(days=1)


DATED_LLAMA3 = (
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + strftime_now('%d %b %Y') + '<|eot_id|>' }}"
)


@pytest.mark.parametrize("midnight_after_calls", [None, 1])
def test_a_chat_template_that_renders_the_date_survives_midnight(make_model, monkeypatch, midnight_after_calls):
    """Llama-3.x templates write today's date into the system turn: a run crossing midnight must go on."""
    clock = Clock(midnight_after_calls)  # 1: midnight falls between the two renders of the first prompt
    monkeypatch.setattr("transformers.utils.chat_template_utils.datetime", clock)
    model = make_model("llama")
    processor = model.processor
    processor.tokenizer.chat_template = DATED_LLAMA3 + processor.tokenizer.chat_template
    first = processor([clip(1.0)], [None], ["hello world"])
    clock.midnight()
    second = processor([clip(1.0)], [None], ["hello world"])
    for name in ("input_ids", "labels"):
        assert torch.equal(first[name], second[name])  # one chat for the whole run
    text = processor.tokenizer.decode(second["input_ids"][0])
    assert f"Today Date: {(clock.day - datetime.timedelta(days=1)).strftime('%d %b %Y')}" in text
    labels = second["labels"][0]
    assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "hello world<|eot_id|>"


def test_the_models_own_prompt_is_checked_when_it_is_built(make_model):
    with pytest.raises(ValueError, match="exactly once"):
        make_model(prompt="Transcribe this.")


def test_the_prompt_cache_does_not_grow_with_the_data(make_model):
    """Error correction renders a prompt a clip (its n-best written in): memory must not grow with the dataset."""
    processor = make_model().processor
    prompts = [
        render_prompt(DEFAULT_NBEST_PROMPT, [f"hypothesis {i}", f"another {i}"]) for i in range(2 * PROMPT_CACHE_SIZE)
    ]
    first = processor.prompt_ids(prompts[0])
    for prompt in prompts:
        processor.prompt_ids(prompt)
        processor.prompt_ids(processor.prompt)  # the model's own prompt, used all along
    assert len(processor._prompt_cache) == PROMPT_CACHE_SIZE
    assert processor.prompt in processor._prompt_cache and prompts[0] not in processor._prompt_cache
    assert processor.prompt_ids(prompts[0]) == first  # rendered again, alike
