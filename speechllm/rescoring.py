"""Choosing among Whisper's n-best (config.ger_decoding="rescore"): each hypothesis scored by the model's LLM and
by Whisper itself, the best one kept, nothing generated.

A model that generates can rewrite a right hypothesis into fluent other words, and one that loops can write more
than was said (docs/results.md). Choosing cannot leave Whisper's n-best. Hypothesis y of clip x scores

    log P_llm(y | the model's prompt and the audio) + rescore_whisper_weight * log P_whisper(y | x)

each summed over the model's own tokens of y and its end token, both teacher-forced on the hypotheses the prompt
shows. An error-correction prompt lists the n-best; a recognition prompt (no <nbest>) does not, so that a
recognition model scores each hypothesis from the audio alone. A weight of 0 trusts the LLM alone; a large one
keeps the hypothesis of highest total log-probability under Whisper, which can differ from its first: its beam
search ranks by the mean per token. Sums favour short texts, but an n-best's hypotheses are alike in length, and on
dev sums chose better than means (docs/results.md). Whisper scores a text against one 30 s window only, so a clip
of several windows keeps its first hypothesis.
"""

import numpy as np
import torch
from transformers import DynamicCache

from .nbest import error_correction_inputs, fill_missing_nbest, listed_hypotheses, window_features

GER_DECODINGS = ("generate", "rescore")


@torch.no_grad()
def whisper_logprobs(decoder, features: torch.Tensor, texts: list[list[str]]) -> list[list[float]]:
    """log P(text and end of text | window) under Whisper's decoder, for each window's texts: the score its beam
    search gives the same tokens, whose filters rule out some tokens (non-speech symbols, a blank start) and spread
    their probability over the rest. A text re-tokenised into one of those (a quote, a colon) keeps its own
    probability there instead of none."""
    task = decoder.decoding_task()
    tokenizer, prefix = task.tokenizer, list(task.initial_tokens)
    rows = [
        (w, prefix + (tokenizer.encode(" " + text) if text else []) + [tokenizer.eot])
        for w, window in enumerate(texts)
        for text in window
    ]
    if not rows:
        return [[] for _ in texts]
    length = max(len(ids) for _, ids in rows)
    tokens = torch.tensor([ids + [tokenizer.eot] * (length - len(ids)) for _, ids in rows], device=features.device)
    targets = tokens[:, 1:]
    logits = decoder.decoder(tokens, features[[w for w, _ in rows]])[:, :-1].float()
    ruled_out = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)  # (position, vocabulary)
    ruled_out[:, list(task._get_suppress_tokens())] = True  # its SuppressTokens filter
    ruled_out[len(prefix) - 1, tokenizer.encode(" ") + [tokenizer.eot]] = True  # and SuppressBlank
    vocabulary = torch.arange(logits.shape[-1], device=logits.device)
    logits = logits.masked_fill(ruled_out & (vocabulary != targets[..., None]), -torch.inf)
    picked = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    position = torch.arange(length - 1, device=tokens.device)
    lengths = torch.tensor([len(ids) for _, ids in rows], device=tokens.device)
    scored = (position >= len(prefix) - 1) & (position < lengths[:, None] - 1)  # the text's tokens and its end
    sums = iter(picked.masked_fill(~scored, 0).sum(-1).tolist())
    return [[next(sums) for _ in window] for window in texts]


@torch.no_grad()
def llm_logprobs(model, audios, prompts, nbest, audio_features=None) -> list[list[float]]:
    """log P(hypothesis and end of turn | the model's prompt, audio) for each clip's hypotheses in its prompt
    (audio_features: the encoder's output on the clips' windows, where the model reads those, so it is not rerun).

    The prompt pass runs once a clip, and its KV cache is copied for each of the clip's hypotheses, whose answer
    tokens alone are then run: the prompt (n-best and audio) is most of each row."""
    config, llm, processor = model.config, model.llm, model.processor
    shown = [listed_hypotheses(config, hypotheses) for hypotheses in nbest]
    audios, prompts = error_correction_inputs(config, audios, prompts, nbest)
    batch = {name: tensor.to(llm.device) for name, tensor in processor(audios, prompts).items()}
    mask = batch.pop("attention_mask")
    cache = DynamicCache(config=llm.config)
    prompt = llm(
        inputs_embeds=model.embed(**batch, audio_features=audio_features),
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # left padding must not shift positions
        cache=cache,
        logits_to_keep=1,
    )
    rows = torch.tensor([clip for clip, texts in enumerate(shown) for _ in texts], device=llm.device)
    answers = [processor.response_ids(p, text) for p, texts in zip(prompts, shown) for text in texts]
    length = max(len(ids) for ids in answers)
    answer_ids = torch.tensor([ids + [processor.pad_token_id] * (length - len(ids)) for ids in answers])
    answer_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in answers])
    answer_ids, answer_mask = answer_ids.to(llm.device), answer_mask.to(llm.device)
    cache.batch_select_indices(rows)
    answer = llm(
        input_ids=answer_ids,
        attention_mask=torch.cat([mask[rows], answer_mask], -1),
        position_ids=mask[rows].sum(-1, keepdim=True) + torch.arange(length, device=llm.device),
        cache=cache,
    )
    # the prompt's last position predicts each answer's first token, answer position t the token at t + 1
    logits = torch.cat([prompt.logits[rows], answer.logits[:, :-1]], 1).float()
    picked = logits.log_softmax(-1).gather(-1, answer_ids[..., None])[..., 0]
    sums = iter((picked * answer_mask).sum(-1).tolist())
    return [[next(sums) for _ in texts] for texts in shown]


def hypothesis_scores(model, audios, prompts, nbest):
    """Each clip's hypotheses as its prompt shows them, with the LLM's and Whisper's log-probability of each
    (Whisper's None for a clip of several windows). nbest: cached lists, or None a clip to decode."""
    config, decoder = model.config, model.whisper_decoder
    features, counts = window_features(model.encoder, audios, next(decoder.parameters()).device)
    nbest = fill_missing_nbest(decoder, config.nbest, nbest, features, counts)
    shown = [listed_hypotheses(config, hypotheses) for hypotheses in nbest]
    single = [i for i, count in enumerate(counts) if count == 1]
    first_windows = [int(start) for start in np.cumsum([0] + counts)[single]]
    whisper_scores = [None] * len(audios)
    for i, scores in zip(single, whisper_logprobs(decoder, features[first_windows], [shown[i] for i in single])):
        whisper_scores[i] = scores
    shared = features if config.ger_audio and config.audio_mode == "window" else None  # as the projector reads them
    return shown, llm_logprobs(model, audios, prompts, nbest, shared), whisper_scores


def choose(texts: list[str], llm_scores: list[float], whisper_scores: list[float] | None, whisper_weight: float):
    """The text of highest combined score; without Whisper's scores (several windows), Whisper's first."""
    if whisper_scores is None:
        return texts[0]
    total = [llm + whisper_weight * own for llm, own in zip(llm_scores, whisper_scores)]
    return texts[max(range(len(texts)), key=total.__getitem__)]


def rescore_batch(model, audios, prompts, nbest) -> list[tuple[str, float]]:
    """Each clip's best hypothesis by the combined score, at the model's rescore_whisper_weight, with the LLM's
    log-probability of it."""
    weight, chosen = model.config.rescore_whisper_weight, []
    for texts, llm, own in zip(*hypothesis_scores(model, audios, prompts, nbest)):
        text = choose(texts, llm, own, weight)
        chosen.append((text, llm[texts.index(text)]))
    return chosen
