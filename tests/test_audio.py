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
    load_audio,
    log_mel_batch,
    num_audio_tokens,
    split_windows,
)


@pytest.mark.parametrize("suffix", ["wav", "flac", "ogg"])
def test_load_audio_resamples_and_mixes_down(tmp_path, suffix):
    path = write_tone(str(tmp_path / f"a.{suffix}"), 1.0, 440, sample_rate=8000, channels=2)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) <= 2
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(audio) - 440) < 5  # still a 440 Hz tone after resampling


def test_missing_and_corrupt_audio_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav"):
        load_audio(str(tmp_path / "nope.wav"))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 3)
    with pytest.raises(AudioError, match="corrupt.wav"):
        load_audio(str(corrupt))
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="empty.wav"):
        load_audio(str(empty))


def test_long_audio_is_split_not_truncated():
    audio = np.zeros(int(2.5 * WINDOW_SAMPLES), np.float32)
    windows = split_windows(audio)
    assert [len(w) for w in windows] == [WINDOW_SAMPLES, WINDOW_SAMPLES, WINDOW_SAMPLES // 2]
    assert num_audio_tokens(len(audio), 5) == 2 * num_audio_tokens(WINDOW_SAMPLES, 5) + num_audio_tokens(
        WINDOW_SAMPLES // 2, 5
    )


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
