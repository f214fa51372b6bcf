import sys

import numpy as np
import pytest
import soundfile
import torch
import whisper
from tiny_models import write_tone

from speechllm.audio import (
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    AudioError,
    audio_duration,
    load_audio,
    log_mel_batch,
    num_audio_tokens,
    split_windows,
    window_lengths,
)


@pytest.mark.parametrize("suffix", ["wav", "flac", "ogg"])
def test_load_audio_resamples(tmp_path, suffix):
    path = write_tone(str(tmp_path / f"a.{suffix}"), 1.0, 440, sample_rate=8000)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) <= 2
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(audio) - 440) < 5  # still a 440 Hz tone after resampling


def test_channels_are_mixed_to_their_mean(tmp_path):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t + 1.0)  # not alike
    stereo = np.stack([left, right], axis=1).astype(np.float32)
    soundfile.write(tmp_path / "stereo.wav", stereo, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(str(tmp_path / "stereo.wav")), (left + right) / 2, atol=1e-6)


def fake_ffmpeg(folder, program: str = "") -> str:
    """A folder for PATH: empty (no ffmpeg installed), or with ffmpeg and ffprobe stand-ins running this Python."""
    folder.mkdir()
    if program:
        for name in ("ffmpeg", "ffprobe"):
            (folder / name).write_text(f"#!{sys.executable}\nimport os, sys\n{program}\n")
            (folder / name).chmod(0o755)
    return str(folder)


@pytest.mark.parametrize("ffmpeg", ["absent", "present"])
def test_a_missing_file_is_reported_as_missing(tmp_path, monkeypatch, ffmpeg):
    monkeypatch.setenv(
        "PATH", fake_ffmpeg(tmp_path / "bin", 'sys.exit("No such file or directory")' * (ffmpeg == "present"))
    )
    with pytest.raises(AudioError, match=r"nope\.wav: no such audio file"):
        load_audio(str(tmp_path / "nope.wav"))
    with pytest.raises(AudioError, match=r"nope\.m4a: no such audio file"):
        audio_duration(str(tmp_path / "nope.m4a"))


def test_formats_only_ffmpeg_reads(tmp_path, monkeypatch):
    clip = tmp_path / "clip.m4a"
    clip.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))  # not a format soundfile reads
    monkeypatch.setenv("PATH", fake_ffmpeg(tmp_path / "none"))
    for read in (load_audio, audio_duration):
        with pytest.raises(AudioError, match=r"clip\.m4a: cannot decode .*install ffmpeg"):
            read(str(clip))
    # The stand-ins: ffmpeg writes 0.5 s of 16 kHz s16le, ffprobe the duration.
    decode = 'print(0.5) if sys.argv[0].endswith("ffprobe") else sys.stdout.buffer.write(bytes(16000))'
    monkeypatch.setenv("PATH", fake_ffmpeg(tmp_path / "with", decode))
    assert load_audio(str(clip)).shape == (SAMPLE_RATE // 2,)
    assert audio_duration(str(clip)) == 0.5
    monkeypatch.setenv("PATH", fake_ffmpeg(tmp_path / "failing", 'sys.exit("Invalid data found")'))
    for read in (load_audio, audio_duration):
        with pytest.raises(AudioError, match=r"clip\.m4a: cannot decode: Invalid data found"):
            read(str(clip))


def test_corrupt_and_empty_audio_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 3)
    with pytest.raises(AudioError, match="corrupt.wav"):
        load_audio(str(corrupt))
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="empty.wav: the file holds no audio"):
        load_audio(str(empty))


def test_long_audio_is_split_not_truncated():
    audio = np.zeros(int(2.5 * WINDOW_SAMPLES), np.float32)
    windows = split_windows(audio)
    assert [len(w) for w in windows] == [WINDOW_SAMPLES, WINDOW_SAMPLES, WINDOW_SAMPLES // 2]
    assert num_audio_tokens(len(audio), 5) == 2 * num_audio_tokens(WINDOW_SAMPLES, 5) + num_audio_tokens(
        WINDOW_SAMPLES // 2, 5
    )


@pytest.mark.parametrize(
    "samples", [0, 1, WINDOW_SAMPLES - 1, WINDOW_SAMPLES, WINDOW_SAMPLES + 1, 2 * WINDOW_SAMPLES + 7]
)
def test_window_lengths_are_the_split_windows_lengths(samples):
    assert window_lengths(samples) == [len(w) for w in split_windows(np.zeros(samples, np.float32))]


@pytest.mark.parametrize("kernel_size", [1, 4, 5, 8])
def test_token_count_follows_frames_and_strides(kernel_size):
    # 30 s is 3000 mel frames, 1500 encoder frames; the projector divides by its stride, rounding up.
    assert num_audio_tokens(WINDOW_SAMPLES, kernel_size) == -(-1500 // kernel_size)
    assert num_audio_tokens(SAMPLE_RATE, kernel_size) == -(-50 // kernel_size)
    assert num_audio_tokens(1, kernel_size) == 1  # even a click gets a token


def test_window_mode_features_are_whispers_own():
    audio = np.random.default_rng(0).standard_normal(SAMPLE_RATE * 3).astype(np.float32) * 0.1
    mel, frames = log_mel_batch([audio], 80, pad_frames_to=None)
    assert frames.tolist() == [3000]  # all of Whisper's window counts: the silence is part of its input
    expected = whisper.log_mel_spectrogram(torch.from_numpy(whisper.pad_or_trim(audio)), 80)
    assert mel.shape == (1, 80, 3000)
    torch.testing.assert_close(mel[0], expected)


def test_dynamic_mode_pads_batch_to_longest_only():
    short, long = np.ones(SAMPLE_RATE, np.float32) * 0.1, np.ones(int(2.3 * SAMPLE_RATE), np.float32) * 0.1
    mel, frames = log_mel_batch([short, long], 128, pad_frames_to=10)
    assert mel.shape == (2, 128, 230) and frames.tolist() == [100, 230]
    alone, _ = log_mel_batch([short], 128, pad_frames_to=10)
    assert alone.shape == (1, 128, 100)
    torch.testing.assert_close(mel[0, :, :100], alone[0])  # a clip's features do not depend on its batch
    assert (mel[0, :, 100:] == 0).all()  # padding is zeros, which the encoder masks


@pytest.mark.parametrize("samples", [1, 100, 160, 200, 201, 399])
def test_a_very_short_window_still_makes_its_frame(samples):
    """A clip this short, or the last few samples of one just over 30 s, is shorter than the STFT's padding."""
    short = np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.1
    for pad_frames_to in (None, 10):
        mel, frames = log_mel_batch([short], 80, pad_frames_to)
        assert frames.tolist() == [3000 if pad_frames_to is None else max(1, samples // 160)]  # at least one
        assert torch.isfinite(mel).all() and mel[0, :, 0].std() > 0


@pytest.mark.parametrize("kernel_size", [5, 7, 8])
def test_a_full_window_never_pads_past_whispers_positions(kernel_size):
    """Dynamic batches round frames up to the strides' multiple, but a 30 s window has no room left for it."""
    audio = np.random.default_rng(0).standard_normal(WINDOW_SAMPLES + 100).astype(np.float32) * 0.1
    windows = split_windows(audio)
    mel, frames = log_mel_batch(windows, 80, pad_frames_to=2 * kernel_size)
    assert frames.tolist() == [3000, 1] and mel.shape[-1] == 3000
