"""The frozen encoder's output for each training clip, kept on disk across epochs (train.py --encoder_cache_dir): the
first epoch writes it, later ones decode no audio and run no encoder.

An entry is named by the audio file (path, size, modification time) inside a folder named by everything else the
output depends on: the encoder's weights, the audio mode and the mixed precision it runs under. A file that changes,
or another encoder, precision or mode, misses instead of reading stale features. Entries are written whole (a
temporary file renamed into place), so the folder is always consistent and can be deleted at any time. Augmentation
that changes the mel (SpecAugment, speed perturbation) gives a clip new features each epoch: the cache does not
combine with it.
"""

import hashlib
import json
import math
import os

import safetensors
import safetensors.torch
import torch

from .audio import ENCODER_STRIDE, window_lengths
from .data import SpeechDataset, load_example_audio
from .files import write_atomically
from .processor import EncodedAudio

FORMAT_VERSION = 1  # of the entries: bumped when what they hold changes, so old folders are not read
SAMPLES_KEY = "num_samples"  # in an entry's metadata; its tensors are the windows, "0", "1", ...


class EncoderCache:
    def __init__(self, folder: str, encoder: torch.nn.Module, audio_mode: str, mixed_precision: str):
        identity = {
            "format": FORMAT_VERSION,
            "encoder_weights": weights_digest(encoder),
            "audio_mode": audio_mode,
            "mixed_precision": mixed_precision,
        }
        name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = os.path.join(folder, name)
        os.makedirs(self.folder, exist_ok=True)
        described = os.path.join(self.folder, "identity.json")
        if not os.path.isfile(described):  # for whoever looks in the folder
            write_atomically(described, lambda path: _write_json(path, identity))

    def key(self, wav: str) -> str:
        status = os.stat(wav)
        return hashlib.sha256(f"{os.path.abspath(wav)}\0{status.st_size}\0{status.st_mtime_ns}".encode()).hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.safetensors")

    def load(self, key: str) -> EncodedAudio | None:
        path = self._path(key)
        if not os.path.isfile(path):
            return None
        with safetensors.safe_open(path, "pt") as entry:
            windows = sorted(entry.keys(), key=int)
            features = [entry.get_tensor(window) for window in windows]
            return EncodedAudio(int(entry.metadata()[SAMPLES_KEY]), features)

    def save(self, key: str, num_samples: int, features: list[torch.Tensor]):
        path = self._path(key)
        if os.path.isfile(path):  # another process (a data-parallel rank) encoded the clip too
            return
        tensors = {str(i): window.detach().cpu().contiguous() for i, window in enumerate(features)}
        metadata = {SAMPLES_KEY: str(num_samples)}
        write_atomically(path, lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata))

    def save_batch(self, keys: list[str], clip_samples: list[int], features: torch.Tensor, mel_frames: torch.Tensor):
        """A batch's encoder output (windows, frames, dim), clip by clip: each window's real frames, the rest is the
        zero padding the encoder writes."""
        window = 0
        for key, num_samples in zip(keys, clip_samples):
            windows = range(window, window + len(window_lengths(num_samples)))
            real = [math.ceil(int(mel_frames[w]) / ENCODER_STRIDE) for w in windows]
            self.save(key, num_samples, [features[w, :n] for w, n in zip(windows, real)])
            window = windows.stop


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of every weight's name, shape, dtype and bytes: the same encoder, however it was named or loaded."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_json(path: str, value):
    with open(path, "w") as file:
        json.dump(value, file, indent=1)


class CachedAudioDataset(torch.utils.data.Dataset):
    """A SpeechDataset whose clips come from the cache where it has them (no audio decoded), else from their files;
    every item says which entry it is (cache_key)."""

    def __init__(self, dataset: SpeechDataset, cache: EncoderCache):
        self.dataset, self.cache = dataset, cache

    def __len__(self):
        return len(self.dataset)

    @property
    def lengths(self) -> list[int]:
        return self.dataset.lengths

    def __getitem__(self, index):
        example = self.dataset.examples[index]
        key = self.cache.key(example.wav)
        audio = self.cache.load(key) or load_example_audio(example)
        return self.dataset.item(index, audio) | {"cache_key": key, "example": example}


class CachingCollator:
    """A collator's batch from cached clips (audio_features in place of mel) when the cache has the whole batch;
    otherwise from the audio of every clip, with what the trainer needs to cache the encoder's output: each clip's
    entry (cache_keys) and length (clip_samples)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        if all(isinstance(item["audio"], EncodedAudio) for item in items):
            return self.collator(items)
        items = [
            item | {"audio": load_example_audio(item["example"])} if isinstance(item["audio"], EncodedAudio) else item
            for item in items
        ]
        extra = {"cache_keys": [item["cache_key"] for item in items], "clip_samples": [len(i["audio"]) for i in items]}
        return self.collator(items) | extra
