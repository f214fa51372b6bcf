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

Nor does a sum see a hypothesis that stops early: Whisper's beam search ends some beams after a word or a few, which
its mean per token never puts first, but whose short sums, under both models, beat the whole sentence by tens of
nats. On LibriSpeech-length clips that deleted whole sentences (docs/results.md), so a hypothesis of fewer words than
config.rescore_min_word_ratio times Whisper's first is not chosen.

That score is the weighted sum of rescore_features.FEATURES at their initial weights; a model trained to rank
(ranking.py, config.learned_rescore_weights) weighs them all by the weights it learned.

A chooser may have a second Whisper (config.second_whisper_model_name_or_path, SecondWhisper): two Whispers of
different sizes err in different places, so its n-best adds hypotheses the first has not (on dev_ood, tiny.en's
5-best and base's hold the reference for all but 2.4% of the words, tiny.en's alone 3.6%), and log P_whisper(y | x)
becomes the mean of the two's, both scored against the clip's audio on their own encoders (system combination:
docs/error_correction.md).
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from .encoder import load_whisper_encoder
from .errors import InputError
from .metrics import wer_words
from .nbest import (
    SECOND_WHISPER_LISTED,
    decode_nbest,
    error_correction_inputs,
    fill_missing_nbest,
    joined_nbest,
    listed_hypotheses,
    load_whisper_decoder,
    window_features,
)
from .processor import NBEST_PLACEHOLDER
from .rescore_features import FEATURES, agreement, feature_matrix

GER_DECODINGS = ("generate", "rescore")
CHOOSER_OPTIONS = (  # config fields only a chooser reads
    "rescore_whisper_weight",
    "rescore_min_word_ratio",
    "second_whisper_model_name_or_path",
)


def check_error_correction(config):
    """The config's error-correction settings are ones the model can use."""
    if config.ger_decoding not in GER_DECODINGS:
        raise InputError(f"ger_decoding must be one of {', '.join(GER_DECODINGS)}, not {config.ger_decoding!r}")
    if config.ger_decoding == "rescore" and not config.nbest:
        raise InputError("ger_decoding 'rescore' chooses among Whisper's n-best: it needs nbest > 0")
    if config.second_whisper_model_name_or_path:
        if config.ger_decoding != "rescore":
            raise InputError(
                "a second Whisper joins a chooser's n-best: it needs ger_decoding 'rescore' (or "
                "second_whisper_model_name_or_path '' to write)"
            )
        if NBEST_PLACEHOLDER in config.prompt:
            raise InputError(SECOND_WHISPER_LISTED)
        if config.learned_rescore_weights:
            raise InputError("the chooser's weights were learned on one Whisper's features: a second would change them")
    if not 0 <= config.rescore_min_word_ratio <= 1:
        raise InputError(
            f"rescore_min_word_ratio is a share of the first hypothesis' words, in [0, 1], not "
            f"{config.rescore_min_word_ratio}"
        )


class SecondWhisper(nn.Module):
    """The chooser's second Whisper, encoder and decoder, frozen: it decodes its own n-best and scores every
    hypothesis the chooser picks from."""

    def __init__(self, name_or_path: str, dtype: torch.dtype, language: str):
        super().__init__()
        self.encoder = load_whisper_encoder(name_or_path, dtype)
        self.decoder = load_whisper_decoder(name_or_path, dtype, language)


def second_whisper_for(config, dtype: torch.dtype) -> SecondWhisper | None:
    """The second Whisper a chooser's config names (None where it names none)."""
    name = config.second_whisper_model_name_or_path
    return SecondWhisper(name, dtype, config.whisper_language) if name else None


@dataclass
class HypothesisScores(ModelOutput):
    """SpeechLLM.forward's output on a batch of hypotheses (hypothesis_batch), each hypothesis' row: the chooser's
    combined score, the LLM's log-probability and the features (rescore_features.FEATURES); and the loss that training
    to rank (ranking.py) adds."""

    scores: torch.Tensor | None = None
    llm_logprobs: torch.Tensor | None = None
    features: torch.Tensor | None = None
    loss: torch.Tensor | None = None


def whisper_text_tokens(tokenizer, text: str) -> list[int]:
    """A hypothesis' tokens as Whisper's decoder reads them after its prompt (its end of text not included)."""
    return tokenizer.encode(" " + text) if text else []


@torch.no_grad()
def whisper_logprobs(decoder, features: torch.Tensor, texts: list[list[str]]) -> list[list[float]]:
    """log P(text and end of text | window) under Whisper's decoder, for each window's texts: the score its beam
    search gives the same tokens, whose filters rule out some tokens (non-speech symbols, a blank start) and spread
    their probability over the rest. A text re-tokenised into one of those (a quote, a colon) keeps its own
    probability there instead of none."""
    task = decoder.decoding_task()
    tokenizer, prefix = task.tokenizer, list(task.initial_tokens)
    rows = [
        (w, prefix + whisper_text_tokens(tokenizer, text) + [tokenizer.eot])
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


def clip_whisper_logprobs(decoder, features, counts: list[int], shown: list[list[str]]) -> list[list[float] | None]:
    """whisper_logprobs of each clip's shown hypotheses, from the clips' window features (counts: each clip's
    windows); None for a clip of several windows: Whisper scores a text against one window."""
    single = [i for i, count in enumerate(counts) if count == 1]
    first_windows = [int(start) for start in np.cumsum([0] + counts)[single]]
    scores = [None] * len(counts)
    for i, own in zip(single, whisper_logprobs(decoder, features[first_windows], [shown[i] for i in single])):
        scores[i] = own
    return scores


def hypothesis_batch(config, processor, whisper_tokenizer, audios, prompts, nbest, whisper_scores) -> dict:
    """The Processor's batch of the clips' prompts (their n-best written in where a prompt lists it) and, under
    "hypotheses", the hypotheses the prompts show, the clips' in turn, for SpeechLLM.forward to score: answer_ids and
    answer_mask (hypotheses, longest answer: the LLM's answer tokens and end of turn), clip (the row of its clip),
    whisper_logprob and whisper_tokens (its tokens and end of text), and agreement. whisper_scores: each clip's
    clip_whisper_logprobs; a clip's None (several windows) gives 0. Choosing and training to rank (ranking.py) both
    build their batches here, so that what is trained is what chooses."""
    shown = [listed_hypotheses(config, hypotheses) for hypotheses in nbest]
    for texts, own in zip(shown, whisper_scores, strict=True):
        if own is not None and len(own) != len(texts):
            raise ValueError(f"{len(own)} Whisper scores for {len(texts)} hypotheses: {texts}")
    audios, prompts = error_correction_inputs(config, audios, prompts, nbest)
    batch = processor(audios, prompts)
    answers = [processor.response_ids(prompt, text) for prompt, texts in zip(prompts, shown) for text in texts]
    length = max(len(ids) for ids in answers)
    hypotheses = {
        "answer_ids": torch.tensor([ids + [processor.pad_token_id] * (length - len(ids)) for ids in answers]),
        "answer_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in answers]),
        "clip": torch.tensor([clip for clip, texts in enumerate(shown) for _ in texts]),
        "whisper_logprob": torch.tensor(
            [s for texts, own in zip(shown, whisper_scores) for s in own or [0.0] * len(texts)]
        ),
        "whisper_tokens": torch.tensor(
            [len(whisper_text_tokens(whisper_tokenizer, text)) + 1 for texts in shown for text in texts]
        ),
        "agreement": torch.tensor([share for texts in shown for share in agreement(texts)]),
    }
    return batch | {"hypotheses": hypotheses}


def score_hypotheses(
    model, inputs_embeds, attention_mask, answer_ids, answer_mask, clip, whisper_logprob, whisper_tokens, agreement
) -> HypothesisScores:
    """SpeechLLM.forward on a hypothesis_batch, its prompts embedded: log P(hypothesis and end of turn | the model's
    prompt, audio) for each hypothesis, teacher-forced, then the features and their combined score.

    The prompt pass runs once a clip, and its KV cache is selected for each of the clip's hypotheses, whose answer
    tokens alone are then run: the prompt (n-best and audio) is most of each row. It runs with gradients where the
    model has trained weights, as training to rank (ranking.py) needs them."""
    llm = model.llm
    cache = DynamicCache(config=llm.config)
    prompt = llm(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),  # left padding must not shift positions
        cache=cache,
        logits_to_keep=1,
    )
    length = answer_ids.shape[1]
    cache.batch_select_indices(clip)
    answer = llm(
        input_ids=answer_ids,
        attention_mask=torch.cat([attention_mask[clip], answer_mask], -1),
        position_ids=attention_mask[clip].sum(-1, keepdim=True) + torch.arange(length, device=answer_ids.device),
        cache=cache,
    )
    # the prompt's last position predicts each answer's first token, answer position t the token at t + 1
    logits = torch.cat([prompt.logits[clip], answer.logits[:, :-1]], 1).float()
    picked = logits.log_softmax(-1).gather(-1, answer_ids[..., None])[..., 0]
    logprobs = (picked * answer_mask).sum(-1)
    features = feature_matrix(logprobs, answer_mask.sum(-1), whisper_logprob, whisper_tokens, agreement)
    return HypothesisScores(scores=model.rescore_weights(features), llm_logprobs=logprobs, features=features)


def per_clip(values: torch.Tensor, shown: list[list[str]]) -> list[list]:
    """A hypothesis_batch's rows of values, as a list a clip."""
    rows = iter(values.tolist())
    return [[next(rows) for _ in texts] for texts in shown]


def whisper_tokenizer(decoder):
    return decoder.decoding_task().tokenizer


def _on(batch: dict, device) -> dict:
    return {k: _on(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items() if v is not None}


@torch.no_grad()
def score_clips(model, audios, prompts, nbest) -> tuple[list[list[str]], list[list[float] | None], HypothesisScores]:
    """Each clip's hypotheses as its prompt shows them, Whisper's log-probabilities of them (None for a clip of
    several windows) and the model's HypothesisScores of them all (the clips' in turn). nbest: cached lists, or None
    a clip to decode."""
    config, decoder, second = model.config, model.whisper_decoder, model.second_whisper
    device = next(decoder.parameters()).device
    features, counts = window_features(model.encoder, audios, device)
    nbest = fill_missing_nbest(decoder, config.nbest, nbest, features, counts)
    # The second Whisper decodes (never from a cache) and scores the clips of one window alone: a longer clip keeps
    # the first's first hypothesis, as Whisper scores a text against one window.
    single = [i for i, count in enumerate(counts) if count == 1] if second is not None else []
    if single:
        second_nbest, second_features = decode_nbest(
            second.encoder, second.decoder, config.nbest, [audios[i] for i in single]
        )
        for i, other in zip(single, second_nbest):
            nbest[i] = joined_nbest(config, nbest[i], other)
    shown = [listed_hypotheses(config, hypotheses) for hypotheses in nbest]
    whisper_scores = clip_whisper_logprobs(decoder, features, counts, shown)
    if single:  # one window a clip: a row of second_features each
        for i, other in zip(single, whisper_logprobs(second.decoder, second_features, [shown[i] for i in single])):
            whisper_scores[i] = [(a + b) / 2 for a, b in zip(whisper_scores[i], other)]
    batch = hypothesis_batch(
        config, model.processor, whisper_tokenizer(decoder), audios, prompts, nbest, whisper_scores
    )
    shared = features if config.ger_audio and config.audio_mode == "window" else None  # as the projector reads them
    return shown, whisper_scores, model(**_on(batch, model.llm.device), audio_features=shared)


def best_hypothesis(texts: list[str], scores: list[float], min_word_ratio: float) -> int:
    """The index of the text of highest score among those of at least min_word_ratio times the first's words (the
    first always is one)."""
    least = min_word_ratio * len(wer_words(texts[0]))
    eligible = [i for i, text in enumerate(texts) if len(wer_words(text)) >= least]
    return max(eligible, key=scores.__getitem__)


def rescore_batch(model, audios, prompts, nbest) -> list[tuple[str, float]]:
    """Each clip's best hypothesis by the model's combined score (rescore_features: at its learned weights, or at
    rescore_whisper_weight) among those long enough (best_hypothesis), with the LLM's mean log-probability of its
    answer tokens (as scored: the chat template's, the text's and the end of turn); a clip of several windows keeps
    Whisper's first."""
    shown, whisper_scores, scored = score_clips(model, audios, prompts, nbest)
    per_token = per_clip(scored.features[:, FEATURES.index("llm_per_token")], shown)
    chosen = []
    for texts, own, total, llm in zip(shown, whisper_scores, per_clip(scored.scores, shown), per_token):
        best = 0 if own is None else best_hypothesis(texts, total, model.config.rescore_min_word_ratio)
        chosen.append((texts[best], llm[best]))
    return chosen
