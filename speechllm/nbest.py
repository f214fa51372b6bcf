"""Generative error correction: Whisper's n-best hypotheses written into the prompt, beside (or instead of) the audio.

A model configured with nbest=N keeps Whisper's decoder, loaded from the same weights as its encoder. For each clip
it runs Whisper's own beam search (beam N) on the encoder's 30 s window features and keeps the distinct
hypotheses, best first; the prompt's <nbest> placeholder becomes the numbered list of those that differ in words.
A jsonl line may bring its n-best cached ("nbest": [...], written by examples/make_error_correction_data.py), so a
training set is decoded once.

Whisper's decoder needs its native 30 s windows (it does not stop on dynamic-length features:
docs/error_correction.md), so the hypotheses always come from window features; in audio_mode "window" the projector
reads those same features, cropped, and each clip is encoded once. ger_audio=False is the text-only ablation: no
audio positions at all.
"""

import numpy as np
import torch
import whisper
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn
from tqdm import tqdm
from whisper.normalizers import BasicTextNormalizer

from .audio import log_mel_batch, split_windows
from .data import Collator, load_example_audio
from .errors import InputError
from .processor import AUDIO_PLACEHOLDER, NBEST_PLACEHOLDER, check_prompt
from .whisper_formats import load_whisper_checkpoint

_normalize = BasicTextNormalizer()  # lower case, no punctuation; for any language
DEFAULT_NBEST_PROMPT = (
    f"Speech recognition hypotheses, best first:\n{NBEST_PLACEHOLDER}\n{AUDIO_PLACEHOLDER}Write the correct transcript."
)


class WhisperDecoder(nn.Module):
    """Whisper's text decoder, with the few members of whisper.model.Whisper that its DecodingTask reads."""

    is_multilingual = whisper.model.Whisper.is_multilingual
    num_languages = whisper.model.Whisper.num_languages
    install_kv_cache_hooks = whisper.model.Whisper.install_kv_cache_hooks

    def __init__(self, dims: whisper.model.ModelDimensions, language: str = "en"):
        super().__init__()
        self.dims, self.language = dims, language
        if language not in whisper.tokenizer.LANGUAGES:
            raise InputError(f"whisper_language must be a code Whisper knows (en, de, zh, ...), not {language!r}")
        if language != "en" and not self.is_multilingual:
            raise InputError(f"whisper_language {language!r}: these Whisper weights are English-only")
        self.decoder = whisper.model.TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
        )

    def decoding_task(self, beam_size: int | None = None) -> whisper.decoding.DecodingTask:
        """openai-whisper's decoding of text in the decoder's language without timestamps: its tokenizer, prompt and
        token filters."""
        options = whisper.DecodingOptions(
            language=self.language, without_timestamps=True, beam_size=beam_size, fp16=False
        )
        return whisper.decoding.DecodingTask(self, options)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, beam_size: int) -> list[list[str]]:
        """Each window's distinct beam-search hypotheses, best first, from encoder features (windows, n_audio_ctx,
        n_audio_state).

        This is openai-whisper's DecodingTask.run with two changes: the audio features are repeated for the beams
        as the tokens are (run, in 20250625, repeats the tokens only, so a batch of several windows fails in
        attention: 10 beams against 2 windows), and every finished beam is kept, not only the best.
        """
        task = self.decoding_task(beam_size)
        task.decoder.reset()
        n_windows = len(features)
        tokens = torch.tensor([task.initial_tokens], device=features.device).repeat(n_windows * beam_size, 1)
        tokens, sum_logprobs, _ = task._main_loop(features.repeat_interleave(beam_size, 0), tokens)
        candidates, scores = task.decoder.finalize(
            tokens.reshape(n_windows, beam_size, -1), sum_logprobs.reshape(n_windows, beam_size)
        )
        eot = task.tokenizer.eot
        results = []
        for window_candidates, window_scores in zip(candidates, scores):
            texts = {}  # text -> score: beams that differ only in tokenisation are one hypothesis
            for sequence, score in zip(window_candidates, window_scores):
                sampled = sequence[task.sample_begin :].tolist()
                sampled = sampled[: sampled.index(eot)] if eot in sampled else sampled
                text = task.tokenizer.decode(sampled).strip()
                # Whisper's MaximumLikelihoodRanker (length_penalty None): log-probability per token
                texts[text] = max(texts.get(text, -np.inf), score / max(len(sampled), 1))
            results.append(sorted(texts, key=texts.get, reverse=True))
        return results


def load_whisper_decoder(name_or_path: str, dtype: torch.dtype = torch.float32, language: str = "en") -> WhisperDecoder:
    """Whisper's decoder from any checkpoint format the encoder is read from, decoding in language."""
    dims, state_dict = load_whisper_checkpoint(name_or_path)
    prefix = "decoder."
    decoder_state = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not decoder_state:
        raise ValueError(f"{name_or_path}: no Whisper decoder weights here, and error correction (nbest) needs them")
    try:
        model = WhisperDecoder(dims, language)
    except InputError as error:  # name the weights: a chooser may load two Whispers
        raise InputError(f"{name_or_path}: {error}") from None
    model.decoder.load_state_dict(decoder_state, strict=True)
    return model.to(dtype).requires_grad_(False).eval()


def decoder_for(config, dtype: torch.dtype) -> WhisperDecoder | None:
    """The decoder a model configured for error correction needs (None for plain recognition), its config checked."""
    if not config.nbest:
        return None
    if config.nbest < 1:
        raise ValueError(f"nbest must be 0 (plain recognition) or the number of hypotheses, not {config.nbest}")
    if config.ger_decoding != "rescore":  # choosing may score the hypotheses against the audio alone (below)
        check_template(config.prompt)
    return load_whisper_decoder(config.whisper_model_name_or_path, dtype, config.whisper_language)


def check_template(prompt: str):
    if prompt.count(NBEST_PLACEHOLDER) != 1:
        raise InputError(
            f"an error correction prompt must contain {NBEST_PLACEHOLDER!r} exactly once: {prompt!r} "
            f"(the default one: {DEFAULT_NBEST_PROMPT!r})"
        )


SECOND_WHISPER_LISTED = "a second Whisper doubles the n-best, which a prompt that lists it was not trained on"


def check_task_prompt(config, prompt: str):
    """A prompt fits the model's task (config: nbest, ger_decoding and second_whisper_model_name_or_path): <speech>
    once, and <nbest> once for error correction (at most once for a model that only chooses, and never beside a
    second Whisper), never for plain recognition, which has no hypotheses to write there (its LLM would read
    "<nbest>" as text). Checked before the models load."""
    check_prompt(prompt)
    if not config.nbest:
        if NBEST_PLACEHOLDER in prompt:
            raise InputError(
                f"{NBEST_PLACEHOLDER!r} in a prompt for a model without error correction (nbest 0): {prompt!r}"
            )
    elif config.ger_decoding != "rescore" or NBEST_PLACEHOLDER in prompt:
        check_template(prompt)
        if config.second_whisper_model_name_or_path:
            raise InputError(SECOND_WHISPER_LISTED)


def render_prompt(template: str, hypotheses: list[str]) -> str:
    """The template with its <nbest> placeholder replaced by the numbered hypotheses, one a line."""
    check_template(template)
    return template.replace(NBEST_PLACEHOLDER, "\n".join(f"{i}. {text}" for i, text in enumerate(hypotheses, 1)))


def distinct_hypotheses(hypotheses: list[str]) -> list[str]:
    """The hypotheses that differ in words, each the first (best) of its spellings: Whisper's beams often differ
    only in case or punctuation (dev: 5 hypotheses a clip, 2.8 distinct), which would lengthen the prompt and say
    nothing the first spelling does not."""
    words = {}
    for text in hypotheses:
        words.setdefault(" ".join(_normalize(text).split()), text)
    return list(words.values())


def listed_hypotheses(config, hypotheses: list[str]) -> list[str]:
    """The hypotheses a prompt lists and a chooser picks from: the model's first N that differ in words (2N for a
    chooser with a second Whisper: joined_nbest's)."""
    whispers = 2 if config.second_whisper_model_name_or_path else 1
    return distinct_hypotheses(hypotheses)[: config.nbest * whispers]


def joined_nbest(config, first: list[str], second: list[str]) -> list[str]:
    """A clip's hypotheses from two Whispers: the first's N that differ in words, then those of the second's N that
    differ from them."""
    return distinct_hypotheses(distinct_hypotheses(first)[: config.nbest] + distinct_hypotheses(second)[: config.nbest])


def shows_nbest(config, template: str) -> bool:
    """Whether a prompt lists the n-best: always for a model that writes the transcript; one that only chooses among
    them (ger_decoding "rescore") may also score them against the audio alone, as a recognition model reads it."""
    if config.ger_decoding == "rescore" and NBEST_PLACEHOLDER not in template:
        return False
    check_template(template)
    return True


def error_correction_inputs(config, audios, prompts, nbest):
    """What the Processor gets for a GER model: prompts with each clip's listed_hypotheses (where the prompt lists
    them), audio only if used."""
    templates = [prompt or config.prompt for prompt in prompts]
    prompts = [
        render_prompt(template, listed_hypotheses(config, hypotheses)) if shows_nbest(config, template) else template
        for template, hypotheses in zip(templates, nbest)
    ]
    return (audios if config.ger_audio else [None] * len(audios)), prompts


def window_features(encoder, audios: list[np.ndarray], device) -> tuple[torch.Tensor, list[int]]:
    """The encoder's output on each clip's 30 s windows, as Whisper's decoder reads them, and each clip's count."""
    windows = [split_windows(audio) for audio in audios]
    mel, frames = log_mel_batch([w for clip in windows for w in clip], encoder.dims.n_mels, None)
    with torch.no_grad():
        return encoder(mel.to(device), frames.to(device)), [len(clip) for clip in windows]


def clip_nbest(decoder: WhisperDecoder, beam_size: int, features: torch.Tensor, counts: list[int]):
    """Each clip's distinct hypotheses, best first; a clip of several windows gets, as its k-th hypothesis, the k-th
    of every window joined."""
    per_window, clips, start = decoder(features, beam_size), [], 0
    for count in counts:
        parts, start = per_window[start : start + count], start + count
        joined = [" ".join(part[min(k, len(part) - 1)] for part in parts) for k in range(max(map(len, parts)))]
        clips.append(list(dict.fromkeys(joined)))
    return clips


def fill_missing_nbest(decoder: WhisperDecoder, beam_size: int, nbest: list, features, counts: list[int]) -> list:
    """A copy of nbest with each None replaced by its clip's hypotheses, decoded from the clips' window features."""
    nbest = list(nbest)
    starts, missing = np.cumsum([0] + counts), [i for i, hypotheses in enumerate(nbest) if hypotheses is None]
    if missing:
        own = torch.cat([features[starts[i] : starts[i + 1]] for i in missing])
        for i, hypotheses in zip(missing, clip_nbest(decoder, beam_size, own, [counts[i] for i in missing])):
            nbest[i] = hypotheses
    return nbest


def decode_nbest(encoder, decoder: WhisperDecoder, beam_size: int, audios: list[np.ndarray]):
    """Each clip's n-best (clip_nbest) and the window features it was decoded from."""
    features, counts = window_features(encoder, audios, next(decoder.parameters()).device)
    return clip_nbest(decoder, beam_size, features, counts), features


def prompt_batch(model, audios, prompts, nbest=None) -> dict:
    """The processor's batch for these clips; an error-correction model's prompts with Whisper's n-best written in
    (nbest: cached hypotheses, a list or None a clip)."""
    if model.config.nbest:
        return error_correction_batch(model, audios, prompts, nbest)
    return model.processor(audios, prompts)


def error_correction_batch(model, audios, prompts, nbest=None) -> dict:
    """The Processor's batch for a GER model, with the n-best decoded where not given. In window mode the decoder's
    features go on to the projector (batch["audio_features"]), so each clip is encoded once, cached n-best or not."""
    config = model.config
    nbest = list(nbest) if nbest is not None else [None] * len(audios)
    missing = [i for i, hypotheses in enumerate(nbest) if hypotheses is None]
    share = config.ger_audio and config.audio_mode == "window"
    if share:  # every clip's features, for the projector; the decoder reads those of the clips without n-best
        features, counts = window_features(model.encoder, audios, next(model.whisper_decoder.parameters()).device)
        nbest = fill_missing_nbest(model.whisper_decoder, config.nbest, nbest, features, counts)
    elif missing:
        decoded, _ = decode_nbest(model.encoder, model.whisper_decoder, config.nbest, [audios[i] for i in missing])
        for i, hypotheses in zip(missing, decoded):
            nbest[i] = hypotheses
    batch = model.processor(*error_correction_inputs(config, audios, prompts, nbest))
    if share:
        batch["audio_features"] = features
    return batch


def add_missing_nbest(encoder, decoder: WhisperDecoder, beam_size: int, examples, batch_size: int = 8):
    """Decode the n-best of the examples that have none cached, once, split across processes; set example.nbest."""
    state = PartialState()
    missing = [i for i, example in enumerate(examples) if example.nbest is None]
    if not missing:
        return
    if state.is_main_process:
        print(
            f"decoding Whisper's {beam_size}-best of {len(missing)} clips "
            "(examples/make_error_correction_data.py caches them)"
        )
    with state.split_between_processes(missing) as mine:
        results = []
        for start in tqdm(range(0, len(mine), batch_size), disable=not state.is_main_process, desc="n-best"):
            chunk = mine[start : start + batch_size]
            audios = [load_example_audio(examples[i]) for i in chunk]
            decoded, _ = decode_nbest(encoder, decoder, beam_size, audios)
            results += zip(chunk, decoded)
    if state.num_processes > 1:
        results = gather_object(results)
    for i, hypotheses in results:
        examples[i].nbest = hypotheses


class ErrorCorrectionCollator(Collator):
    """Training batches for a GER model: each item's n-best (decoded before training if not cached) in its prompt."""

    def __init__(self, model):
        super().__init__(model.processor)
        self.config = model.config

    def __call__(self, items):
        if any(item["nbest"] is None for item in items):
            raise ValueError("an example has no n-best: add_missing_nbest decodes them before training")
        audios, prompts = error_correction_inputs(
            self.config, [i["audio"] for i in items], [i["prompt"] for i in items], [i["nbest"] for i in items]
        )
        return self.processor(audios, prompts, [i["txt"] for i in items])


def error_correction_collator(model, datasets, device) -> ErrorCorrectionCollator:
    """For train.py: the n-best every dataset lacks decoded once, up front (on device), then the collator."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("projector.")]
    if not model.config.ger_audio and not trainable:
        raise ValueError("ger_audio=False leaves nothing to train: the projector reads no audio and the LLM is frozen")
    model.encoder.to(device)
    model.whisper_decoder.to(device)
    for dataset in datasets:
        if dataset is not None:
            add_missing_nbest(model.encoder, model.whisper_decoder, model.config.nbest, dataset.examples)
    return ErrorCorrectionCollator(model)
