"""transcribe()'s inputs (paths, arrays, tensors, any rate, stereo), its per-clip details, and model_dtype "auto"."""

import numpy as np
import pytest
import soxr
import torch

from speechllm import Hypothesis, SpeechLLM, SpeechLLMConfig
from speechllm.audio import SAMPLE_RATE, load_audio
from speechllm.inputs import as_clips
from speechllm.llm import torch_dtype


@pytest.fixture(scope="module")
def model(tiny):
    torch.manual_seed(0)
    config = SpeechLLMConfig(
        whisper_model_name_or_path=tiny["whisper"], llm_model_name_or_path=tiny["qwen2"], projector_hidden_size=32
    )  # model_dtype left at its default, "auto"
    model = SpeechLLM(config)
    torch.nn.init.normal_(model.projector.linear2.weight, std=0.5)  # audio that moves the output
    return model


def stereo(seconds=1.2):
    """Two different channels, so a mix-down differs from either of them."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    left, right = np.sin(2 * np.pi * 330 * t), 0.3 * rng.standard_normal(t.size)
    return np.stack([left, right]).astype(np.float32)


def test_auto_dtype_is_fp32_on_cpu_and_bf16_on_cuda_with_bf16(model, monkeypatch):
    assert model.config.model_dtype == "auto"
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in model.llm.parameters()} == {torch.float32}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert torch_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert torch_dtype("auto") == torch.float32
    assert torch_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="model_dtype must be one of auto, bfloat16, float16, float32, not 'fp8'"):
        torch_dtype("fp8")


def test_paths_arrays_and_tensors_give_the_same_clip(tiny):
    path = tiny["root"] / "utt1.wav"
    audio = load_audio(str(path))
    clips, single = as_clips([path, audio, torch.from_numpy(audio), torch.from_numpy(audio).to(torch.bfloat16)])
    assert not single and len(clips) == 4
    for clip in clips[:3]:
        np.testing.assert_array_equal(clip, audio)
    np.testing.assert_allclose(clips[3], audio, atol=4e-3)  # bf16 rounding only
    pcm = (audio * 32767).astype(np.int16)  # integer PCM is scaled to [-1, 1)
    np.testing.assert_allclose(as_clips(pcm)[0][0], audio, atol=1e-4)
    np.testing.assert_allclose(as_clips(torch.from_numpy(pcm))[0][0], audio, atol=1e-4)  # as a tensor too
    pcm32 = pcm.astype(np.int32) << 16
    for clip in (pcm32, torch.from_numpy(pcm32)):
        np.testing.assert_allclose(as_clips(clip)[0][0], audio, atol=1e-4)


def test_stereo_is_mixed_down_and_other_rates_resampled():
    both = stereo()
    (clip,), single = as_clips(both)
    assert single  # a 2-D array is one clip, not a batch of two
    np.testing.assert_allclose(clip, both.mean(axis=0), atol=1e-7)
    (tensor_clip,), _ = as_clips(torch.from_numpy(both))
    np.testing.assert_array_equal(tensor_clip, clip)
    (resampled,), _ = as_clips(both[0, ::2].copy(), sampling_rate=8000)
    np.testing.assert_array_equal(resampled, soxr.resample(both[0, ::2], 8000, SAMPLE_RATE).astype(np.float32))
    assert len(resampled) == both.shape[1]


def test_unusable_arrays_are_clear_errors():
    with pytest.raises(ValueError, match=r"\(channels, samples\), not shape \(19200, 2\): transpose"):
        as_clips(stereo().T)
    with pytest.raises(ValueError, match=r"not shape \(1, 2, 3\)"):
        as_clips(np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="holds no samples"):
        as_clips(np.zeros(0))
    # no integer type but 16- and 32-bit PCM has a full scale to divide by: int64 became near silence, a torch
    # int64 tensor went in unscaled, uint8 kept an offset of half its range
    for clip in (np.ones(8, np.int64), torch.ones(8, dtype=torch.int64), np.ones(8, np.uint8)):
        with pytest.raises(ValueError, match="integer samples are 16- or 32-bit PCM, not (int64|uint8): give floats"):
            as_clips(clip)


def test_prompts_and_nbest_lists_are_one_a_clip(model, tiny, monkeypatch):
    """A batch's prompts and n-best lists of another length than its clips are refused: zip kept the shorter and
    dropped clips. transcribe() hands each batch its own clips' n-best."""
    paths = [str(tiny["root"] / f"utt{i}.wav") for i in range(3)]
    audios = [load_audio(path) for path in paths]
    with pytest.raises(ValueError, match="3 clips and 1 prompts: give one a clip"):
        model.decode_batch(audios, [model.config.prompt], max_new_tokens=4)
    with pytest.raises(ValueError, match="batch_size must be at least 1, not 0"):
        model.transcribe(paths, batch_size=0)
    with pytest.raises(ValueError, match="3 clips and 2 nbest lists: give one a clip"):
        model.transcribe(paths, max_new_tokens=4, nbest=[["a"], ["b"]])
    given = []

    def decode_batch(audios, *args, nbest=None, **kwargs):
        given.append(nbest)
        return [Hypothesis("", [], True) for _ in audios]

    monkeypatch.setattr(model, "decode_batch", decode_batch)
    model.transcribe(paths, batch_size=2, nbest=[["a"], ["b"], ["c"]])
    model.transcribe(paths[0], nbest=["x", "y"])  # one clip: its own list
    assert given == [[["a"], ["b"]], [["c"]], [["x", "y"]]]


def test_transcribe_takes_tensors_stereo_and_other_rates(model, tiny):
    path = str(tiny["root"] / "utt2.wav")
    audio = load_audio(path)
    text = model.transcribe(path, max_new_tokens=6)
    assert model.transcribe(torch.from_numpy(audio), max_new_tokens=6) == text
    both = stereo()
    mixed = model.transcribe(both.mean(axis=0), max_new_tokens=6)
    assert isinstance(mixed, str) and model.transcribe(torch.from_numpy(both), max_new_tokens=6) == mixed
    at_8k = soxr.resample(audio, SAMPLE_RATE, 8000)
    expected = model.transcribe(soxr.resample(at_8k, 8000, SAMPLE_RATE), max_new_tokens=6)
    assert model.transcribe(at_8k, sampling_rate=8000, max_new_tokens=6) == expected
    assert model.transcribe([path, torch.from_numpy(audio)], max_new_tokens=6) == [text, text]


def test_details_hold_the_tokens_and_their_mean_log_probability(model, tiny):
    paths = [str(tiny["root"] / f"utt{i}.wav") for i in range(3)]
    details = model.transcribe(paths, max_new_tokens=8, return_details=True)
    assert all(isinstance(d, Hypothesis) for d in details)
    assert [d.text for d in details] == model.transcribe(paths, max_new_tokens=8)
    stops = model.processor.stop_token_ids
    for path, d in zip(paths, details):
        assert d.text == model.tokenizer.decode(d.token_ids, skip_special_tokens=True).strip()
        assert d.finished or len(d.token_ids) == 8
        assert d.decoding_seconds > 0
        # The answer and its stop token, scored by one teacher-forced forward pass: the same mean log-probability.
        answer = torch.tensor([d.token_ids + ([stops[0]] if d.finished else [])])
        batch = model.processor([load_audio(path)], [None])
        with torch.no_grad():
            logits = model(
                input_ids=torch.cat([batch["input_ids"], answer], 1),
                attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(answer)], 1),
                audio_mask=torch.cat([batch["audio_mask"], torch.zeros_like(answer, dtype=torch.bool)], 1),
                mel=batch["mel"],
                mel_frames=batch["mel_frames"],
                audio_tokens=batch["audio_tokens"],
            ).logits
        start = batch["input_ids"].shape[1] - 1  # the logits at t predict the token at t + 1
        logprobs = logits[0, start : start + answer.shape[1]].log_softmax(-1).gather(-1, answer[0, :, None])
        assert d.avg_logprob == pytest.approx(logprobs.mean().item(), abs=1e-4)
    assert any(d.finished for d in details)  # the stop token's own probability was checked too
    beams = model.transcribe(paths, num_beams=3, max_new_tokens=8, return_details=True)
    assert [b.text for b in beams] == model.transcribe(paths, num_beams=3, max_new_tokens=8)
    assert all(b.avg_logprob <= 0 and (b.finished or len(b.token_ids) == 8) for b in beams)
    assert model.transcribe(paths[0], max_new_tokens=8, return_details=False) == details[0].text


def test_loop_guards_that_cannot_work_are_refused(model, tiny):
    """A repetition penalty of 0 divided the written tokens' scores by zero in the llama.cpp engine (garbage text)
    and failed deep in generate(); a negative n-gram size is no guard."""
    path = str(tiny["root"] / "utt0.wav")
    with pytest.raises(ValueError, match=r"repetition_penalty must be above 0 \(1: none\), not 0$"):
        model.transcribe(path, max_new_tokens=4, repetition_penalty=0)
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size must be 0 \(none\) or more, not -2$"):
        model.transcribe(path, max_new_tokens=4, no_repeat_ngram_size=-2)
