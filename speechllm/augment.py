"""Data variety for training, off unless asked for. SpecAugment zeroes random bands of mel bins and of frames in each
window's log-mel, so a projector trained on a few hours of speech cannot lean on any one band or instant; it draws
from torch's global generator, which the Trainer seeds and restores on resume. Speed perturbation plays each clip at
a speed drawn from (seed, epoch, clip) alone, tempo and pitch together as Kaldi's does: new voices and speaking rates
from the same recordings, and a resumed run draws what the uninterrupted one drew."""

from dataclasses import dataclass, field

import numpy as np
import soxr
import torch

from .audio import SAMPLE_RATE


@dataclass
class AugmentArguments:
    spec_augment: bool = field(default=False, metadata={"help": "mask random mel bands and frames while training"})
    freq_masks: int = field(default=2, metadata={"help": "bands of mel bins masked per window"})
    freq_mask_fraction: float = field(default=0.15, metadata={"help": "a band's most bins, as a share of n_mels"})
    time_masks: int = field(default=2, metadata={"help": "runs of frames masked per window"})
    time_mask_fraction: float = field(
        default=0.05, metadata={"help": "a run's most frames, as a share of the window's"}
    )

    speed_perturb: str | None = field(
        default=None,
        metadata={"help": "comma-separated speeds, one drawn per training clip and epoch, e.g. 0.9,1.0,1.1"},
    )

    def __post_init__(self):
        self.speeds = _speeds(self.speed_perturb) if self.speed_perturb else []
        if not (0 <= self.freq_mask_fraction <= 1 and 0 <= self.time_mask_fraction <= 1):
            raise ValueError("--freq_mask_fraction and --time_mask_fraction are shares, between 0 and 1")
        if self.freq_masks < 0 or self.time_masks < 0:
            raise ValueError("--freq_masks and --time_masks count masks: 0 or more")


def spec_augment(mel: torch.Tensor, mel_frames: torch.Tensor, args: AugmentArguments) -> torch.Tensor:
    """mel (windows, n_mels, frames) with masked bands set to 0, each window its own masks, within its real frames."""
    windows, n_mels, _ = mel.shape
    keep = torch.ones_like(mel, dtype=torch.bool)
    bins, frames = torch.arange(n_mels, device=mel.device), torch.arange(mel.shape[-1], device=mel.device)
    for window in range(windows):
        length = int(mel_frames[window])
        for _ in range(args.freq_masks):
            keep[window] &= ~_band(bins, n_mels, int(args.freq_mask_fraction * n_mels))[:, None]
        for _ in range(args.time_masks):
            keep[window] &= ~_band(frames, length, int(args.time_mask_fraction * length))[None, :]
    return mel * keep


def _band(positions: torch.Tensor, size: int, most: int) -> torch.Tensor:
    """A random run of 0..most positions within the first size ones."""
    width = int(torch.randint(0, most + 1, ()))
    start = int(torch.randint(0, max(size - width, 0) + 1, ()))
    return (positions >= start) & (positions < start + width)


def _speeds(option: str) -> list[float]:
    try:
        speeds = [float(speed) for speed in option.split(",")]
    except ValueError:
        speeds = []
    if not speeds or not all(0 < speed < float("inf") for speed in speeds):
        raise ValueError(f"--speed_perturb takes speeds above 0, comma-separated (e.g. 0.9,1.0,1.1), not {option!r}")
    return speeds


def change_speed(audio: np.ndarray, speed: float) -> np.ndarray:
    """The clip played speed times as fast: read as if recorded at SAMPLE_RATE * speed, resampled to SAMPLE_RATE."""
    return soxr.resample(audio, SAMPLE_RATE * speed, SAMPLE_RATE) if speed != 1 else audio


class SpeedPerturbation(torch.utils.data.Dataset):
    """A training dataset's clips, each at a speed drawn from (seed, epoch, index); set_epoch before each epoch."""

    def __init__(self, dataset, speeds: list[float], seed: int):
        self.dataset, self.speeds, self.seed = dataset, speeds, seed
        # In shared memory: DataLoader workers that persist across epochs (--dataloader_persistent_workers) keep the
        # copy of the dataset they started with, and must still see each epoch set_epoch sets in the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.dataset)

    @property
    def lengths(self) -> list[int]:  # group_by_length sorts by the recorded durations
        return self.dataset.lengths

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int):
        self._epoch.fill_(epoch)

    def speed(self, index: int) -> float:
        return self.speeds[np.random.default_rng([self.seed, self.epoch, index]).integers(len(self.speeds))]

    def __getitem__(self, index):
        item = self.dataset[index]
        return item | {"audio": change_speed(item["audio"], self.speed(index))}
