"""Audio in: decode any file to 16 kHz mono, cut it into Whisper windows, and turn a batch into log-mel features."""

import math
import os
import subprocess

import numpy as np
import soundfile
import soxr
import torch
import whisper

from .errors import InputError

SAMPLE_RATE = whisper.audio.SAMPLE_RATE  # 16 kHz, what every Whisper expects
HOP_LENGTH = whisper.audio.HOP_LENGTH  # samples per mel frame
WINDOW_SAMPLES = whisper.audio.N_SAMPLES  # Whisper's 30 s receptive window
WINDOW_FRAMES = whisper.audio.N_FRAMES  # its mel frames: as many as the encoder has positions, times its stride
MIN_STFT_SAMPLES = whisper.audio.N_FFT // 2 + 1  # the STFT reflect-pads N_FFT / 2 a side, which needs more samples
ENCODER_STRIDE = 2  # Whisper's second conv halves the frame rate


class AudioError(InputError):
    """An audio file that cannot be read, named in the message."""


def load_audio(path: str) -> np.ndarray:
    """Decode a file to float32 mono at 16 kHz: soundfile for wav/flac/ogg/opus/mp3, ffmpeg for anything else."""
    _check_exists(path)
    try:
        audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
    except soundfile.SoundFileError as error:
        command = [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-i",
            path,
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            str(SAMPLE_RATE),
            "-",
        ]
        output = _ffmpeg(path, error, command)
        audio, sample_rate = np.frombuffer(output, np.int16).astype(np.float32) / 32768.0, SAMPLE_RATE
    if audio.size == 0:
        raise AudioError(f"{path}: the file holds no audio")
    if sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)


def audio_duration(path: str) -> float:
    """Seconds of audio in a file, from its header (soundfile, else ffprobe), without decoding it."""
    _check_exists(path)
    try:
        info = soundfile.info(path)
        return info.frames / info.samplerate if info.samplerate else 0.0
    except soundfile.SoundFileError as error:
        command = ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", path]
        output = _ffmpeg(path, error, command)
    try:
        return float(output)
    except ValueError:
        raise AudioError(f"{path}: ffprobe gives no duration ({output.decode(errors='replace').strip()!r})") from None


def _check_exists(path: str):
    # Checked first: soundfile reports a missing file like an unknown format, which would send it on to ffmpeg.
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such audio file")


def _ffmpeg(path: str, soundfile_error: Exception, command: list[str]) -> bytes:
    """What an ffmpeg command (ffmpeg or ffprobe) writes about a file soundfile cannot read."""
    try:
        return subprocess.run(command, capture_output=True, check=True).stdout
    except FileNotFoundError:
        raise AudioError(f"{path}: cannot decode ({soundfile_error}); install ffmpeg for this format") from None
    except subprocess.CalledProcessError as error:
        raise AudioError(f"{path}: cannot decode: {error.stderr.decode(errors='replace').strip()}") from None


def split_windows(audio: np.ndarray) -> list[np.ndarray]:
    """Cut audio longer than Whisper's window into consecutive windows, so nothing is ever truncated."""
    return [audio[start : start + WINDOW_SAMPLES] for start in range(0, max(len(audio), 1), WINDOW_SAMPLES)]


def window_lengths(num_samples: int) -> list[int]:
    """Samples in each of split_windows' windows of a clip this long."""
    return [min(WINDOW_SAMPLES, num_samples - start) for start in range(0, max(num_samples, 1), WINDOW_SAMPLES)]


def num_frames(num_samples: int) -> int:
    """Mel frames of a window (Whisper's STFT drops the last frame), at least one."""
    return max(1, min(num_samples, WINDOW_SAMPLES) // HOP_LENGTH)


def num_audio_tokens(num_samples: int, kernel_size: int) -> int:
    """LLM positions one clip takes: mel frames, halved by Whisper's conv, divided by the projector's stride."""
    tokens = 0
    for start in range(0, max(num_samples, 1), WINDOW_SAMPLES):
        encoder_frames = math.ceil(num_frames(num_samples - start) / ENCODER_STRIDE)
        tokens += math.ceil(encoder_frames / kernel_size)
    return tokens


def batch_frames(frames: list[int], pad_frames_to: int | None) -> int:
    """Mel frames of a batch of windows with these real frames: Whisper's full window (pad_frames_to=None), or the
    longest window's rounded up to a multiple of pad_frames_to, never past a full window: the encoder has no
    positions beyond it (a kernel that does not divide them gets a part group, which the projector pads itself)."""
    if pad_frames_to is None:
        return WINDOW_FRAMES
    return min(math.ceil(max(frames) / pad_frames_to) * pad_frames_to, WINDOW_FRAMES)


def log_mel_batch(windows: list[np.ndarray], n_mels: int, pad_frames_to: int | None):
    """Log-mel features (windows, n_mels, frames) and each window's own frame count.

    pad_frames_to=None is Whisper's native input: every window padded with silence to 30 s, all frames real.
    Otherwise each window's features cover just its own audio, and the batch is zero-padded to its longest window,
    rounded up to a multiple of pad_frames_to so the strides tile it; the encoder masks what lies past a window's
    frames, so a clip is encoded the same whatever batch it is in.
    """
    if pad_frames_to is None:
        mels = [
            whisper.log_mel_spectrogram(torch.from_numpy(w), n_mels, padding=WINDOW_SAMPLES - len(w)) for w in windows
        ]
        mel = torch.stack([m[:, :WINDOW_FRAMES] for m in mels])
        return mel, torch.full((len(windows),), mel.shape[-1])
    frames = [num_frames(len(window)) for window in windows]
    mel = torch.zeros(len(windows), n_mels, batch_frames(frames, pad_frames_to))
    for i, (window, n) in enumerate(zip(windows, frames)):
        padding = max(0, MIN_STFT_SAMPLES - len(window))  # zeros after a very short window: it still makes its frame
        mel[i, :, :n] = whisper.log_mel_spectrogram(torch.from_numpy(window), n_mels, padding=padding)[:, :n]
    return mel, torch.tensor(frames)
