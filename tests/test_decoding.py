"""Decoding guards: where an answer stops (end of turn, or the start of a new one), whether it ran out of tokens,
and the repetition options that break loops."""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from speechllm import SpeechLLM
from speechllm.audio import load_audio
from speechllm.data import SpeechDataset


class Force(LogitsProcessor):
    """Makes generation write these tokens, then the last one forever."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __call__(self, input_ids, scores):
        step = min(input_ids.shape[1], len(self.tokens) - 1)  # input_ids holds only the generated tokens
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[step]] = 0
        return forced


def audios(tiny, n=4):
    return [load_audio(e.wav) for e in SpeechDataset(tiny["jsonl"]).examples[:n]]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_stops_include_the_tokens_that_open_a_turn(make_model):
    for llm, turn in (("qwen2", ["<|im_start|>"]), ("llama", ["<|start_header_id|>", "<|end_header_id|>"])):
        model = make_model(llm)
        stops = model.processor.stop_token_ids
        assert stops[0] == model.tokenizer.eos_token_id
        assert set(model.tokenizer.convert_tokens_to_ids(turn)) <= set(stops), (llm, stops)
        assert not set(ids(model.tokenizer, "hello world the quick brown fox")) & set(stops)


def test_an_answer_that_opens_a_new_turn_ends_there(make_model, tiny):
    model = make_model()
    tokenizer = model.tokenizer
    text = ids(tokenizer, "hello world")
    leak = text + tokenizer.convert_tokens_to_ids(["<|im_start|>"]) + ids(tokenizer, "assistant\nthe quick")
    (hypothesis,) = model.decode_batch(audios(tiny, 1), logits_processor=LogitsProcessorList([Force(leak)]))
    assert (hypothesis.text, hypothesis.token_ids, hypothesis.finished) == ("hello world", text, True)


def test_an_answer_that_never_ends_is_flagged(make_model, tiny):
    model = make_model()
    loop = ids(model.tokenizer, "one two")
    forced = LogitsProcessorList([Force(loop)])
    (hypothesis,) = model.decode_batch(audios(tiny, 1), max_new_tokens=7, logits_processor=forced)
    assert not hypothesis.finished and len(hypothesis.token_ids) == 7


def repeated_trigrams(token_ids) -> int:
    grams = [tuple(token_ids[i : i + 3]) for i in range(len(token_ids) - 2)]
    return len(grams) - len(set(grams))


def repeats(token_ids) -> int:
    return len(token_ids) - len(set(token_ids))


def copying(model):
    """The LLM with every layer's output zeroed: the residual stream is the input embedding, so each step writes
    the last token again, forever (tied embeddings) - the loop the guards exist for."""
    for layer in model.llm.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


def test_repetition_options_break_loops_and_default_from_the_config(make_model, tiny, tmp_path):
    model = copying(make_model())
    clips = audios(tiny)
    plain = model.decode_batch(clips, max_new_tokens=12)
    assert all(not h.finished and repeated_trigrams(h.token_ids) > 0 for h in plain), "no loop: no test"
    guarded = model.decode_batch(clips, max_new_tokens=12, no_repeat_ngram_size=3)
    assert all(repeated_trigrams(h.token_ids) == 0 for h in guarded)
    penalised = model.decode_batch(clips, max_new_tokens=12, repetition_penalty=5.0)
    assert sum(map(repeats, (h.token_ids for h in penalised))) < sum(map(repeats, (h.token_ids for h in plain)))
    # The model's decoding defaults are its generation_config (saved with it); a call's own option wins.
    model.generation_config.no_repeat_ngram_size = 3
    assert [h.token_ids for h in model.decode_batch(clips, max_new_tokens=12)] == [h.token_ids for h in guarded]
    assert model.transcribe_batch(clips, max_new_tokens=12, no_repeat_ngram_size=0) == [h.text for h in plain]
    model.save_pretrained(tmp_path)
    assert SpeechLLM.from_pretrained(tmp_path).generation_config.no_repeat_ngram_size == 3
