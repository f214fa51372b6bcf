"""What to transcribe: audio files, folders and jsonl files for the command line; paths, arrays and tensors for
transcribe(). Everything ends as 16 kHz mono float32 clips."""

import os

import numpy as np
import soundfile
import soxr
import torch

from .audio import SAMPLE_RATE, load_audio
from .data import DataError, Example, load_example_audio, read_jsonl

PCM_TYPES = (np.int16, np.int32)  # integer samples taken as PCM, scaled by their full range
# What a folder is searched for: what soundfile reads, and the common formats only ffmpeg does.
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac", ".wma", ".aiff", ".aif", ".au", ".webm"}
GUESSED_BYTES_PER_SECOND = 16000  # 128 kb/s: a length guess for ordering clips only ffmpeg can read


def read_inputs(inputs: list[str]) -> list[Example]:
    """Audio files, folders (every audio file under them, sorted) and jsonl files, in the order given; a file's key
    is its path as given (under a folder: joined to the folder as given), a jsonl line's its own."""
    if not inputs:
        raise DataError("nothing to transcribe: give audio files, folders or jsonl files")
    examples, where = [], {}
    for item in inputs:
        if is_jsonl(item):
            found = read_jsonl(item, require_text=False)
        elif os.path.isdir(item):
            found = [file_example(path) for path in audio_files(item)]
            if not found:
                raise DataError(f"{item}: no audio files in this folder ({', '.join(sorted(AUDIO_SUFFIXES))})")
        elif os.path.isfile(item):
            found = [file_example(item)]
        else:
            raise DataError(f"{item}: no such file or folder")
        for example in found:
            if example.key in where:
                raise DataError(
                    f"{example.where}: key {example.key!r} already used by {where[example.key]} (a jsonl line's key "
                    'is its line number unless it has a "key")'
                )
            where[example.key] = example.where
        examples += found
    return examples


def is_jsonl(path: str) -> bool:
    """A file of jsonl lines: named .jsonl, or whatever its name (WeST's data.list), starting with "{", which no
    audio format does."""
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".jsonl"):
        return True
    with open(path, "rb") as file:
        return file.read(4096).lstrip()[:1] == b"{"


def audio_files(folder: str) -> list[str]:
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in AUDIO_SUFFIXES]
    return found


def file_example(path: str) -> Example:
    return Example(key=path, wav=path, txt=None, prompt=None, transcript=None, duration=None, where=path)


def load_input_audio(example: Example) -> np.ndarray:
    """An example's audio; an error names the jsonl line, or only the file where the file itself was the input."""
    return load_audio(example.wav) if example.where == example.wav else load_example_audio(example)


def input_seconds(example: Example) -> float:
    """A clip's length without decoding it: the jsonl's duration, the file's header, or a guess from its size."""
    if example.duration is not None:
        return float(example.duration)
    try:
        info = soundfile.info(example.wav)
        return info.frames / info.samplerate
    except soundfile.LibsndfileError:
        return os.path.getsize(example.wav) / GUESSED_BYTES_PER_SECOND


def as_clips(audio, sampling_rate: int = SAMPLE_RATE) -> tuple[list[np.ndarray], bool]:
    """transcribe()'s input as 16 kHz mono clips, and whether it was a single clip (not a list or tuple).

    A clip is a file path (read at its own rate), or samples at sampling_rate in a numpy array or torch tensor:
    (samples,), or (channels, samples), mixed down. A list is a batch; a 2-D array is one clip, never a batch.
    """
    single = not isinstance(audio, (list, tuple))
    return [as_clip(clip, sampling_rate) for clip in ([audio] if single else audio)], single


def as_clip(audio, sampling_rate: int) -> np.ndarray:
    if isinstance(audio, (str, os.PathLike)):
        return load_audio(os.fspath(audio))
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu()
        audio = (audio if not (audio.is_floating_point() or audio.is_complex()) else audio.float()).numpy()
    audio = np.asarray(audio)
    if np.issubdtype(audio.dtype, np.integer):  # PCM samples: full scale is the type's range
        if audio.dtype not in PCM_TYPES:  # int64 holds no PCM format's full scale; unsigned ones are offset
            raise ValueError(f"integer samples are 16- or 32-bit PCM, not {audio.dtype}: give floats in [-1, 1]")
        audio = audio / float(np.iinfo(audio.dtype).max + 1)
    audio = audio.astype(np.float32)
    if audio.ndim == 2:
        if audio.shape[0] > audio.shape[1]:
            raise ValueError(
                f"a 2-D clip is (channels, samples), not shape {tuple(audio.shape)}: transpose (samples, channels)"
            )
        audio = audio.mean(axis=0)
    elif audio.ndim != 1:
        raise ValueError(f"a clip is (samples,) or (channels, samples), not shape {tuple(audio.shape)}")
    if audio.size == 0:
        raise ValueError("a clip holds no samples")
    if sampling_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, sampling_rate, SAMPLE_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)
