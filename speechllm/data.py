"""jsonl datasets: one {"wav", "txt", "key"?, "prompt"?, "transcript"?, "nbest"?} object a line; every error names
the file and line."""

import contextlib
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property

import torch

from .audio import audio_duration, load_audio
from .errors import InputError
from .processor import check_prompt


class DataError(InputError):
    """A jsonl line that cannot be used, named by file and line."""


@dataclass
class Example:
    key: str
    wav: str  # absolute path
    txt: str | None
    prompt: str | None
    transcript: str | None  # what is said in the audio, when txt is something else (distillation's teacher reads it)
    duration: float | None  # seconds, when the jsonl says
    where: str  # "file:line", for error messages
    nbest: list[str] | None = None  # cached Whisper hypotheses, best first, for error correction (nbest.py)
    # Whisper's cached log-probability of each of them (a clip of one window), so ranking need not score them again
    nbest_logprobs: list[float] | None = None
    nbest_whisper: str | None = None  # the Whisper weights the cache was decoded and scored with, as named there
    # Whisper's log-probability of each hypothesis the model lists (None: a clip of several windows), computed before
    # training the chooser to rank (ranking.py)
    whisper_logprobs: list[float] | None = None


def read_jsonl(path: str, require_text: bool = True, require_transcript: bool = False) -> list[Example]:
    """Parse and check every line up front, so a bad line fails before hours of work, not during them."""
    folder = os.path.dirname(os.path.abspath(path))
    examples, keys = [], {}
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected a JSON object")
            fields = ["wav"] + ["txt"] * require_text + ["transcript"] * require_transcript
            for field in fields:
                if not isinstance(item.get(field), str):
                    raise DataError(f"{where}: missing string field {field!r}")
            for field in ("txt", "transcript"):  # optional where not required, but text where given
                if item.get(field) is not None and not isinstance(item[field], str):
                    raise DataError(f"{where}: {field!r} must be a string, not {item[field]!r}")
            wav = os.path.normpath(os.path.join(folder, item["wav"]))  # an absolute "wav" stays absolute
            if not os.path.isfile(wav):
                raise DataError(f"{where}: audio file not found: {wav}")
            key = str(item.get("key", number))
            if key in keys:
                raise DataError(f"{where}: key {key!r} already used on line {keys[key]}")
            keys[key] = number
            prompt, duration, nbest = item.get("prompt"), item.get("duration"), item.get("nbest")
            if prompt is not None:
                if not isinstance(prompt, str):
                    raise DataError(f"{where}: 'prompt' must be a string")
                with _naming(where):
                    check_prompt(prompt)
            seconds = isinstance(duration, (int, float)) and not isinstance(duration, bool)
            seconds = seconds and math.isfinite(duration) and duration >= 0  # json reads Infinity and NaN
            if duration is not None and not seconds:
                raise DataError(f"{where}: 'duration' must be a number of seconds, not {duration!r}")
            if nbest is not None and not (isinstance(nbest, list) and nbest and all(isinstance(h, str) for h in nbest)):
                raise DataError(f"{where}: 'nbest' must be a non-empty list of strings")
            logprobs = item.get("nbest_logprobs")
            if logprobs is not None and not (
                nbest is not None
                and isinstance(logprobs, list)
                and len(logprobs) == len(nbest)
                and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in logprobs)
            ):
                raise DataError(f"{where}: 'nbest_logprobs' must be a number for each of 'nbest'")
            if not isinstance(item.get("nbest_whisper", ""), str):
                raise DataError(f"{where}: 'nbest_whisper' must be the name of the Whisper weights, a string")
            names = ("txt", "prompt", "transcript", "duration", "nbest", "nbest_logprobs", "nbest_whisper")
            optional = {name: item.get(name) for name in names}
            examples.append(Example(key, wav, **optional, where=where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


@contextlib.contextmanager
def _naming(where: str):
    """Errors about one line's content get the line's file:line in front."""
    try:
        yield
    except InputError as error:
        raise DataError(f"{where}: {error}") from None


def load_example_audio(example: Example):
    with _naming(example.where):
        return load_audio(example.wav)


def sentence_case(text: str) -> str:
    """ALL-CAPS text (LibriSpeech, speechocean762) in sentence case, as Whisper and most written text are; any other
    text as it is. An LLM spells capitals with several times the tokens, and an error-correction model can only learn
    to copy the right hypothesis if the target is written as the hypotheses are."""
    return text.capitalize() if text.isupper() else text


class SpeechDataset(torch.utils.data.Dataset):
    def __init__(
        self, path: str, require_text: bool = True, require_transcript: bool = False, recase_all_caps: bool = False
    ):
        self.examples = read_jsonl(path, require_text, require_transcript)
        if recase_all_caps:
            for example in self.examples:
                example.txt = example.txt and sentence_case(example.txt)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.item(index, load_example_audio(self.examples[index]))

    def item(self, index: int, audio) -> dict:
        """Example index with this audio: its samples, or what stands in for them (an EncodedAudio)."""
        example = self.examples[index]
        return {
            "audio": audio,
            "prompt": example.prompt,
            "txt": example.txt,
            "transcript": example.transcript,
            "nbest": example.nbest,
            "whisper_logprobs": example.whisper_logprobs,
        }

    @cached_property
    def lengths(self) -> list[int]:
        """Audio length in milliseconds, for length-grouped sampling, without decoding any audio."""
        return [round(1000 * _duration(e)) for e in self.examples]


def _duration(example: Example) -> float:
    if example.duration is not None:
        return example.duration
    with _naming(example.where):
        return audio_duration(example.wav)


class Collator:
    """Items from SpeechDataset to a training batch (padded to the batch's own longest text and audio)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items):
        return self.processor([i["audio"] for i in items], [i["prompt"] for i in items], [i["txt"] for i in items])
