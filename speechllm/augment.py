"""SpecAugment for training: zero random bands of mel bins and of frames in each window's log-mel, so a projector
trained on a few hours of speech cannot lean on any one band or instant. Off unless --spec_augment is given; it draws
from torch's global generator, which the Trainer seeds and restores on resume."""

from dataclasses import dataclass, field

import torch


@dataclass
class AugmentArguments:
    spec_augment: bool = field(default=False, metadata={"help": "mask random mel bands and frames while training"})
    freq_masks: int = field(default=2, metadata={"help": "bands of mel bins masked per window"})
    freq_mask_fraction: float = field(default=0.15, metadata={"help": "a band's most bins, as a share of n_mels"})
    time_masks: int = field(default=2, metadata={"help": "runs of frames masked per window"})
    time_mask_fraction: float = field(
        default=0.05, metadata={"help": "a run's most frames, as a share of the window's"}
    )

    def __post_init__(self):
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
