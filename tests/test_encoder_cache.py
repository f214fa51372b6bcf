"""The encoder cache (speechllm/encoder_cache.py, train.py --encoder_cache_dir): a hit gives the batch the encoder
would have made, no audio decoded; training with it takes exactly the steps training without it takes."""

import os

import pytest
import torch
from test_training import OutputDtypes, assert_same, data, train, train_args, weights  # noqa: F401 (data: a fixture)
from tiny_models import write_jsonl, write_tone
from transformers import TrainerCallback

from speechllm import data as data_module
from speechllm import training
from speechllm.audio import WINDOW_SAMPLES, load_audio, log_mel_batch
from speechllm.data import Collator, SpeechDataset
from speechllm.encoder_cache import CachedAudioDataset, CachingCollator, EncoderCache
from speechllm.errors import InputError


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    """Clips of different lengths, one longer than Whisper's 30 s window (two windows)."""
    root = tmp_path_factory.mktemp("cache_clips")
    seconds = [0.7, 31.0, 1.9, 0.3]
    rows = [
        {"key": f"c{i}", "wav": os.path.basename(write_tone(str(root / f"c{i}.wav"), s, 300 + 90 * i)), "txt": f"c {i}"}
        for i, s in enumerate(seconds)
    ]
    return write_jsonl(str(root / "data.jsonl"), rows)


def test_a_clip_is_encoded_alike_whatever_its_batchmates(make_model, clips):
    """Dynamic mode masks each window's padding: a clip batched with longer ones gets its encoding alone, to float
    rounding (not bit for bit: the matrix products of a longer batch round differently)."""
    model = make_model()
    examples = SpeechDataset(clips).examples
    short, long = load_audio(examples[2].wav), load_audio(examples[1].wav)[:WINDOW_SAMPLES]  # 1.9 s, a full window
    n_mels, pad_frames_to = model.encoder.dims.n_mels, model.processor.pad_frames_to
    alone = model.encoder(*log_mel_batch([short], n_mels, pad_frames_to))[0]
    batched = model.encoder(*log_mel_batch([long, short], n_mels, pad_frames_to))[1]
    torch.testing.assert_close(batched[: alone.shape[0]], alone)
    assert not batched[alone.shape[0] :].any()  # the longer batch's extra frames are zero for this clip


def fill(cache_dataset, collator, model, batch_size):
    """One pass over the data as the trainer makes it: every miss batch encoded and cached."""
    batches = []
    for start in range(0, len(cache_dataset), batch_size):
        batch = collator([cache_dataset[i] for i in range(start, min(start + batch_size, len(cache_dataset)))])
        if "cache_keys" in batch:
            features = model.encoder(batch["mel"], batch["mel_frames"])
            cache_dataset.cache.save_batch(batch["cache_keys"], batch["clip_samples"], features, batch["mel_frames"])
        batches.append(batch)
    return batches


@pytest.mark.parametrize("audio_mode", ["dynamic", "window"])
def test_a_cache_hit_is_the_batch_the_encoder_would_make(make_model, clips, tmp_path, monkeypatch, audio_mode):
    model = make_model(audio_mode=audio_mode)
    dataset, batch_size = SpeechDataset(clips), 2
    plain = [Collator(model.processor)([dataset[i] for i in (s, s + 1)]) for s in range(0, len(dataset), batch_size)]
    cache = EncoderCache(str(tmp_path), model.encoder, audio_mode, "no")
    cached, collator = CachedAudioDataset(dataset, cache), CachingCollator(Collator(model.processor))
    with torch.no_grad():
        first = fill(cached, collator, model, batch_size)
        assert all("cache_keys" in batch for batch in first)  # an empty cache: every batch is encoded

        monkeypatch.setattr(data_module, "load_audio", lambda path: pytest.fail(f"decoded {path} on a cache hit"))
        hits = fill(cached, collator, model, batch_size)
        for hit, batch in zip(hits, plain, strict=True):
            assert "cache_keys" not in hit and hit["mel"] is None
            assert hit.keys() - {"audio_features"} == batch.keys()
            for name in batch.keys() - {"mel"}:
                assert torch.equal(hit[name], batch[name]), name
            assert torch.equal(hit["audio_features"], model.encoder(batch["mel"], batch["mel_frames"]))
            assert torch.equal(model(**hit).logits, model(**batch).logits)


def test_a_changed_file_or_another_encoder_setting_misses(make_model, clips, tmp_path):
    model = make_model()
    cache = EncoderCache(str(tmp_path), model.encoder, "dynamic", "no")
    wav = SpeechDataset(clips).examples[0].wav
    cache.save(cache.key(wav), 10, [torch.ones(1, 4)])
    assert cache.load(cache.key(wav)) is not None
    os.utime(wav, ns=(0, os.stat(wav).st_mtime_ns + 1))  # the file was rewritten
    assert cache.load(cache.key(wav)) is None
    others = [
        EncoderCache(str(tmp_path), model.encoder, "window", "no"),
        EncoderCache(str(tmp_path), model.encoder, "dynamic", "bf16"),
        EncoderCache(str(tmp_path), make_model(whisper="whisper128").encoder, "dynamic", "no"),
    ]
    assert len({cache.folder, *(other.folder for other in others)}) == 4


class Calls(TrainerCallback):
    """How often the encoder ran and audio was decoded, and each step's loss."""

    def __init__(self, monkeypatch):
        self.encoder_calls, self.decoded, self.losses = 0, 0, []
        decode = data_module.load_audio

        def counted(path):
            self.decoded += 1
            return decode(path)

        monkeypatch.setattr(data_module, "load_audio", counted)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.encoder.register_forward_hook(lambda *a: setattr(self, "encoder_calls", self.encoder_calls + 1))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses.append(logs["loss"])


@pytest.mark.parametrize("bf16", ["false", "true"])
def test_training_with_the_cache_takes_the_same_steps(tiny, data, tmp_path, monkeypatch, bf16):  # noqa: F811
    # Sequential batches: the second epoch's are the first's, so its cache hits are what the encoder would compute.
    options = ["--train_sampling_strategy", "sequential", "--num_train_epochs", "3", "--save_strategy", "no"]
    options += ["--bf16", bf16, "--eval_data_path", data, "--eval_strategy", "epoch"]
    cache_dir = ["--encoder_cache_dir", str(tmp_path / "cache")]
    runs = {}
    for name, extra in [("plain", []), ("filling", cache_dir), ("warm", cache_dir)]:
        calls = Calls(monkeypatch)
        trainer = train(train_args(tiny, data, tmp_path / name, *options, *extra), [calls])
        evaluations = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
        runs[name] = calls, evaluations, weights(tmp_path / name)
    plain, filling, warm = (runs[name][0] for name in ("plain", "filling", "warm"))
    steps_per_epoch = len(plain.losses) // 3
    assert plain.encoder_calls == 3 * (steps_per_epoch + 1)  # and an evaluation batch an epoch (8 clips, batch 8)
    assert filling.encoder_calls == steps_per_epoch and warm.encoder_calls == 0  # epoch 1's training batches
    assert filling.decoded == 8 and warm.decoded == 0  # each clip once, then never
    assert len(plain.losses) == 3 * steps_per_epoch
    for name in ("filling", "warm"):
        assert runs[name][0].losses == plain.losses, name
        assert runs[name][1] == runs["plain"][1], name
        assert_same(runs[name][2], runs["plain"][2])


def test_the_cache_and_spec_augment_are_one_line_error(tiny, data, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match="--spec_augment"):
        training.main(train_args(tiny, data, tmp_path, "--encoder_cache_dir", str(tmp_path / "c"), "--spec_augment"))


def test_a_run_resumes_with_the_cache_moved(tiny, data, tmp_path):  # noqa: F811
    # Where the encoder's outputs are kept changes no result: it is not one of the options a resume must match.
    options = ["--train_sampling_strategy", "sequential", "--save_steps", "1"]
    train(
        train_args(
            tiny, data, tmp_path / "run", *options, "--max_steps", "1", "--encoder_cache_dir", str(tmp_path / "a")
        )
    )
    resumed = train(
        train_args(
            tiny, data, tmp_path / "run", *options, "--max_steps", "2", "--encoder_cache_dir", str(tmp_path / "b")
        )
    )
    assert resumed.state.global_step == 2 and (tmp_path / "run" / "checkpoint-1").is_dir()
