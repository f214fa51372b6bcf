"""From a batch of clips to hypotheses, the model's two ways: writing the transcript (the LLM generates it, stopping
on its end-of-turn tokens, with loop guards) or choosing it among Whisper's n-best (rescoring.py, nothing
generated); and transcribe(), files, arrays or tensors to text. SpeechLLM binds decode_batch, transcribe_batch and
transcribe as its methods (as openai-whisper's model binds its decode and transcribe); nothing here imports the
model."""

import time

import torch
from transformers import DynamicCache, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from .audio import SAMPLE_RATE
from .errors import InputError
from .hypothesis import Hypothesis, check_batch, loop_guards, token_budgets, within_budget
from .inputs import as_clips
from .llama_engine import engine_decoder
from .logprobs import token_logprobs
from .nbest import prompt_batch
from .rescoring import rescore_batch


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """Where an answer ends: the LLM's own end-of-turn tokens (the tokenizer's eos first, then any its generation
    config adds), then the special tokens that open a turn, so an answer that skips its end of turn and starts the
    next one ("... the end. assistant Mary said") stops there instead of leaking the role into the text."""
    extra = generation_config.eos_token_id
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    ends = [i for i in [tokenizer.eos_token_id, *extra] if i is not None]
    if not ends:
        raise InputError("the LLM names no end-of-turn (eos) token, in its tokenizer nor in its generation config")
    return list(dict.fromkeys([*ends, *turn_token_ids(tokenizer)]))


def turn_token_ids(tokenizer) -> list[int]:
    """The special tokens of the assistant's turn header, as the chat template writes it."""
    messages = [{"role": "user", "content": "?"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False)
    header = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)[len(chat) :]
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return [i for i in tokenizer(header, add_special_tokens=False)["input_ids"] if i in special]


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


def decode_batch(
    model, audios, prompts=None, num_beams=1, max_new_tokens=None, nbest=None, with_logprobs=False, **options
) -> list[Hypothesis]:
    """One batch of 16 kHz arrays to hypotheses, greedy (num_beams=1) or beam search. Without max_new_tokens, the
    model's own prompt gets room for the longest clip's words; any other prompt at least answer_max_new_tokens.
    options: generate()'s, e.g. repetition_penalty and no_repeat_ngram_size (defaults: model.generation_config).
    nbest: error correction's cached hypotheses, a list or None a clip (None: decoded); plain models ignore it.
    with_logprobs: fill in avg_logprob (generation then keeps every step's scores, batch x beams x vocabulary).
    A model with ger_decoding "rescore" chooses among Whisper's n-best instead (rescoring.py): no generation, so
    num_beams, max_new_tokens and options do not apply, and avg_logprob is the LLM's of the chosen text."""
    check_batch(audios, prompts, nbest)
    started = time.perf_counter()
    prompts = prompts or [None] * len(audios)
    if model.config.ger_decoding == "rescore":  # nothing generated: no loop, no token budget
        hypotheses = chosen_hypotheses(model, audios, prompts, nbest)
    else:
        hypotheses = written_hypotheses(
            model, audios, prompts, nbest, num_beams, max_new_tokens, with_logprobs, **options
        )
    seconds = (time.perf_counter() - started) / len(audios)  # decoded together: each clip its share
    for hypothesis in hypotheses:
        hypothesis.decoding_seconds = seconds
    return hypotheses


def chosen_hypotheses(model, audios, prompts, nbest) -> list[Hypothesis]:
    """Each clip's hypothesis chosen among Whisper's n-best by the LLM's and Whisper's scores (rescoring.py)."""
    hypotheses = []
    for text, avg_logprob in rescore_batch(model, audios, prompts, nbest or [None] * len(audios)):
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        hypotheses.append(Hypothesis(text, ids, True, avg_logprob))
    return hypotheses


def written_hypotheses(model, audios, prompts, nbest, num_beams, max_new_tokens, with_logprobs, **options):
    """Each clip's transcript (or answer) as the LLM generates it, cut at its first stop token."""
    budgets = [max_new_tokens] * len(audios) if max_new_tokens else token_budgets(model, audios, prompts)
    options = penalty_over_generated_tokens(loop_guards(model, options))
    batch = {name: tensor.to(model.llm.device) for name, tensor in prompt_batch(model, audios, prompts, nbest).items()}
    scores = {"return_dict_in_generate": True, "output_scores": True} if with_logprobs else {}
    output = model.generate(
        **batch, num_beams=num_beams, do_sample=False, max_new_tokens=max(budgets), **options, **scores
    )
    rows = output.sequences if with_logprobs else output
    logprobs = token_logprobs(model.llm, output).tolist() if with_logprobs else None
    stops = set(model.processor.stop_token_ids)
    hypotheses = []
    for n, row in enumerate(rows.tolist()):
        end = next((i for i, token in enumerate(row) if token in stops), None)
        ids, finished = within_budget(row if end is None else row[:end], end is not None, budgets[n])
        text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
        # The stop token is part of the answer's probability: how sure the LLM was that it had ended.
        scored = logprobs[n][: len(ids) + finished] if logprobs else None
        avg_logprob = sum(scored) / len(scored) if scored else None
        hypotheses.append(Hypothesis(text, ids, finished, avg_logprob))
    return hypotheses


def penalty_over_generated_tokens(options: dict) -> dict:
    """generate()'s options with repetition_penalty as a logits processor over each row's generated tokens (all of
    them, as the llama.cpp engine applies it). generate()'s own skips a left-padded row's first tokens: it takes the
    row's padding for a prompt to leave out of input_ids, which from inputs_embeds hold only generated tokens, so a
    clip's answer would depend on the batch it is padded in (transformers 5.25)."""
    penalty = options.get("repetition_penalty")
    if penalty is None or penalty == 1.0:
        return options
    processors = LogitsProcessorList(
        [*(options.get("logits_processor") or []), RepetitionPenaltyLogitsProcessor(float(penalty))]
    )
    return {**options, "repetition_penalty": 1.0, "logits_processor": processors}


def transcribe_batch(model, audios, prompts=None, num_beams=1, max_new_tokens=None, **options) -> list[str]:
    return [h.text for h in model.decode_batch(audios, prompts, num_beams, max_new_tokens, **options)]


def transcribe(
    model,
    audio,
    prompt=None,
    num_beams=1,
    batch_size=8,
    max_new_tokens=None,
    sampling_rate=SAMPLE_RATE,
    return_details=False,
    engine="torch",
    nbest=None,
    **options,
):
    """One clip or a list of clips to text (a string or a list of strings). A clip is a file path, or a numpy
    array or torch tensor of samples at sampling_rate (resampled), (samples,) or (channels, samples) (mixed
    down). return_details: Hypothesis objects (text, token_ids, finished, avg_logprob, decoding_seconds)
    instead. options: generate()'s, e.g. repetition_penalty=1.1 or no_repeat_ngram_size=3 (defaults:
    model.generation_config). engine: "torch", or "llama.cpp" for the LLM's steps in llama.cpp (greedy, CPU;
    llama_engine.py). nbest: an error-correction model's cached n-best, one list (or None: decoded) a clip."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    clips, single = as_clips(audio, sampling_rate)
    nbest = [nbest] if single and nbest is not None else nbest
    check_batch(clips, None, nbest)
    decoder = engine_decoder(model, engine)
    results = []
    for start in range(0, len(clips), batch_size):
        batch = clips[start : start + batch_size]
        hypotheses = decoder.decode_batch(
            batch,
            [prompt] * len(batch),
            num_beams,
            max_new_tokens,
            nbest=nbest and nbest[start : start + batch_size],
            with_logprobs=return_details,
            **options,
        )
        results += hypotheses if return_details else [h.text for h in hypotheses]
    return results[0] if single else results
