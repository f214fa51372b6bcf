import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
import whisper
from tiny_models import make_tokenizer, make_whisper
from transformers import GenerationConfig

from speechllm import SpeechLLM
from speechllm.audio import SAMPLE_RATE, load_audio, num_audio_tokens
from speechllm.data import Collator, SpeechDataset
from speechllm.decoding import stop_token_ids
from speechllm.encoder import load_whisper_encoder
from speechllm.errors import InputError
from speechllm.llm import load_llm


def tones(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_only_the_projector_learns(make_model, tiny):
    model = make_model()
    batch = Collator(model.processor)(tones(SpeechDataset(tiny["jsonl"])))
    model(**batch).loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"projector.{name}" for name, _ in model.projector.named_parameters()}
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("projector."))
    assert all(p.grad.abs().sum() > 0 for p in model.projector.parameters())


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_overfits_a_few_examples(make_model, tiny, llm):
    model = make_model(llm, projector_hidden_size=128, projector_kernel_size=2)
    dataset = SpeechDataset(tiny["jsonl"])
    batch = Collator(model.processor)(tones(dataset))
    optimizer = torch.optim.Adam(model.projector.parameters(), lr=5e-3)
    steps = 300
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    if llm == "qwen2":  # where pad == eos: the answers come back whole and nothing follows them
        assert model.transcribe([e.wav for e in dataset.examples]) == tiny["texts"]


def test_save_and_from_pretrained_give_identical_outputs(make_model, tiny, tmp_path):
    model = make_model(projector_kernel_size=4)
    torch.nn.init.normal_(model.projector.linear2.weight)  # not the initialisation a fresh model would get
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert set(saved) == {f"projector.{k}" for k in model.projector.state_dict()}
    loaded = SpeechLLM.from_pretrained(tmp_path, llm_model_name_or_path=None)  # None keeps the saved value
    assert loaded.config.projector_kernel_size == 4
    assert loaded.config.llm_model_name_or_path == model.config.llm_model_name_or_path
    batch = Collator(model.processor)(tones(SpeechDataset(tiny["jsonl"])))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_a_save_cut_short_leaves_the_previous_one_whole(make_model, tmp_path, monkeypatch):
    make_model(projector_kernel_size=4).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    retrained = make_model(projector_kernel_size=2, prompt="<speech>Write it down.")

    def disk_full(state, path, metadata=None):
        with open(path, "wb") as file:
            file.write(b"\x00" * 100)  # the first bytes of the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        retrained.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no torn weights, no new config, no debris
    assert SpeechLLM.from_pretrained(tmp_path).config.projector_kernel_size == 4


@pytest.mark.parametrize("renamed", [1, 2])
def test_a_save_cut_between_its_renames_is_refused_not_loaded_with_the_other_saves_weights(
    make_model, tmp_path, monkeypatch, renamed
):
    make_model(projector_kernel_size=4).save_pretrained(tmp_path)
    retrained = make_model(projector_kernel_size=4, prompt="<speech>Write it down.")
    torch.nn.init.normal_(retrained.projector.linear2.weight)
    done, rename = [], os.replace

    def killed_after(source, destination):
        if len(done) == renamed:
            raise KeyboardInterrupt  # a kill between two of the renames that move the new files in
        done.append(os.path.basename(destination))
        rename(source, destination)

    monkeypatch.setattr(os, "replace", killed_after)
    with pytest.raises(KeyboardInterrupt):
        retrained.save_pretrained(tmp_path)
    monkeypatch.setattr(os, "replace", rename)
    with pytest.raises(ValueError, match=f"^{tmp_path}: its config.json was saved with another model.safetensors"):
        SpeechLLM.from_pretrained(tmp_path)
    retrained.save_pretrained(tmp_path)  # saved again, whole
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert loaded.config.prompt == retrained.config.prompt
    assert torch.equal(loaded.projector.linear2.weight, retrained.projector.linear2.weight)


def test_the_folder_a_killed_save_left_is_removed_by_the_next_save(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    left = tmp_path / ".saving-k1ll3d"  # a save killed (SIGKILL) before its renames: no finally ran
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\x00" * 100)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_checkpoint_that_does_not_fit_the_models_is_refused(make_model, tiny, tmp_path):
    make_model().save_pretrained(tmp_path)
    wider = make_whisper(str(tmp_path / "wider.pt"), n_state=64)
    with pytest.raises(ValueError, match=r"encoder_dim=48.*wider\.pt.*64"):
        SpeechLLM.from_pretrained(tmp_path, whisper_model_name_or_path=wider)
    with pytest.raises(ValueError, match=r"linear1\.bias has shape \(32,\).*needs \(16,\)"):
        SpeechLLM.from_pretrained(tmp_path, projector_hidden_size=16)
    weights = tmp_path / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    state["projector.extra"] = torch.zeros(1)
    del state["projector.conv.bias"]
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ValueError, match="config.json was saved with another model.safetensors"):  # replaced
        SpeechLLM.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["file_sha256"]  # loaded as they are: what the error says to do
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \['projector.conv.bias'\], unexpected \['projector.extra'\]"):
        SpeechLLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not_a_field"):
        SpeechLLM.from_pretrained(tmp_path, not_a_field=1)


def test_unknown_model_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no-such-llm"):
        load_llm(str(tmp_path / "no-such-llm"), torch.float32)
    with pytest.raises(ValueError, match="no-such-whisper"):
        load_whisper_encoder("no-such-whisper")


def test_a_pt_file_that_is_not_a_whisper_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"other.pt: not an openai-whisper checkpoint \(no 'dims' and"):
        load_whisper_encoder(str(tmp_path / "other.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint at all")
    with pytest.raises(InputError, match=r"text.pt: not a readable PyTorch checkpoint"):
        load_whisper_encoder(str(tmp_path / "text.pt"))


def test_placeholders_where_the_model_cannot_fill_them_are_refused(make_model, tiny):
    model = make_model()
    clip = str(tiny["root"] / "utt0.wav")
    with pytest.raises(InputError, match="'<nbest>' in a prompt for a model without error correction"):
        model.transcribe(clip, prompt="Hypotheses: <nbest>\n<speech>", max_new_tokens=2)  # not sent as text
    with pytest.raises(InputError, match="the system prompt holds '<speech>'"):
        make_model(system_prompt="You hear <speech>.")


def test_batched_greedy_equals_one_at_a_time(make_model, tiny):
    model = make_model()
    torch.nn.init.normal_(model.projector.linear2.weight, std=0.5)  # audio that actually moves the output
    paths = [e.wav for e in SpeechDataset(tiny["jsonl"]).examples]
    batched = model.transcribe(paths, batch_size=4, max_new_tokens=12)
    single = [model.transcribe(path, max_new_tokens=12) for path in paths]
    assert batched == single
    assert len(set(batched)) > 1  # distinct clips, distinct outputs: the comparison means something


@pytest.mark.parametrize("mode", ["dynamic", "window"])
def test_beam_search_batched_equals_one_at_a_time(make_model, tiny, mode):
    model = make_model(audio_mode=mode)
    torch.nn.init.normal_(model.projector.linear2.weight, std=0.5)  # audio that actually moves the output
    paths = [e.wav for e in SpeechDataset(tiny["jsonl"]).examples]
    batched = model.transcribe(paths, num_beams=3, batch_size=4, max_new_tokens=8)
    assert batched == [model.transcribe(path, num_beams=3, max_new_tokens=8) for path in paths]
    assert len(set(batched)) > 1  # distinct clips, distinct outputs: the comparison means something
    assert batched != model.transcribe(paths, batch_size=4, max_new_tokens=8)  # and beam search is not greedy


def test_window_mode_is_whispers_own_30s_input(make_model, tiny):
    """Each clip padded with silence to 30 s, through Whisper's own encoder, cropped to the clip's own tokens."""
    model = make_model(audio_mode="window").eval()
    dims = model.encoder.dims
    whispers = whisper.model.AudioEncoder(
        dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
    )
    whispers.load_state_dict(model.encoder.state_dict())
    audios = [load_audio(e.wav) for e in SpeechDataset(tiny["jsonl"]).examples[:2]]
    batch = model.processor(audios, [None, None])
    assert batch["mel"].shape[-1] == 3000
    with torch.no_grad():
        embeds = model.embed(*(batch[k] for k in ("input_ids", "audio_mask", "mel", "mel_frames", "audio_tokens")))
        for row, audio in enumerate(audios):
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), dims.n_mels)
            tokens = num_audio_tokens(len(audio), model.config.projector_kernel_size)
            expected = model.projector(whispers(mel[None]))[0, :tokens]
            torch.testing.assert_close(embeds[row][batch["audio_mask"][row]], expected, atol=1e-5, rtol=1e-5)


def test_n_mels_comes_from_the_checkpoint_and_long_audio_is_kept(make_model):
    model = make_model(whisper="whisper128")
    long_clip = np.random.default_rng(0).standard_normal(SAMPLE_RATE * 45).astype(np.float32) * 0.1
    batch = model.processor([long_clip], [None])
    assert batch["mel"].shape[:2] == (2, 128)  # two windows of 128-bin features
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]
    assert isinstance(model.transcribe(long_clip, max_new_tokens=3), str)


def test_answers_to_other_prompts_get_their_own_token_budget(make_model, monkeypatch):
    model = make_model(answer_max_new_tokens=40)
    budgets, generate = [], model.llm.generate

    def recording(**kwargs):
        budgets.append(kwargs["max_new_tokens"])
        return generate(**{**kwargs, "max_new_tokens": 1})

    monkeypatch.setattr(model.llm, "generate", recording)
    second, ten_seconds = np.zeros(SAMPLE_RATE, np.float32), np.zeros(10 * SAMPLE_RATE, np.float32)
    other = "Summarise: <speech>"
    model.transcribe_batch([second])  # the model's own prompt: room for the clip's words, 8 a second + 16
    model.transcribe_batch([second], [model.config.prompt])
    model.transcribe_batch([second], [other])  # another prompt: the answer budget
    model.transcribe_batch([second, second], [None, other])  # one other prompt in the batch is enough
    model.transcribe_batch([ten_seconds], [other])  # but never less than the audio's own budget
    model.transcribe_batch([second], [other], max_new_tokens=5)  # and an explicit budget wins
    assert budgets == [24, 24, 40, 40, 96, 5]


@pytest.mark.parametrize("name, value", [("dtype", torch.bfloat16), ("torch_dtype", "bfloat16"), ("dtype", "auto")])
def test_from_pretrained_takes_transformers_dtype_names(make_model, tmp_path, name, value):
    make_model().save_pretrained(tmp_path)  # saved as float32
    loaded = SpeechLLM.from_pretrained(tmp_path, **{name: value})
    expected = torch.float32 if value == "auto" else torch.bfloat16  # auto: the saved one
    assert loaded.config.model_dtype == str(expected).removeprefix("torch.")
    assert loaded.llm.dtype == loaded.encoder.conv1.weight.dtype == expected
    with pytest.raises(ValueError, match="contradicts model_dtype='float16'"):
        SpeechLLM.from_pretrained(tmp_path, dtype=torch.bfloat16, model_dtype="float16")


def test_stop_tokens_leave_out_a_missing_eos():
    tokenizer = make_tokenizer("qwen2")
    im_end, im_start = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=None)) == [im_end, im_start]
    tokenizer.eos_token = None
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=[5, im_end])) == [5, im_end, im_start]
    with pytest.raises(ValueError, match="no end-of-turn"):  # a turn's opening is no end for the labels
        stop_token_ids(tokenizer, GenerationConfig(eos_token_id=None))


def test_a_torn_llm_weights_file_is_one_line(tiny, tmp_path):
    torn = tmp_path / "llm"
    shutil.copytree(tiny["qwen2"], torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InputError, match=f"cannot load the LLM '{torn}'"):
        load_llm(str(torn), torch.float32)


def test_a_clips_default_budget_does_not_depend_on_its_batch(make_model):
    """Decoded beside a longer clip (or one with another prompt), a clip that never ends is cut at its own budget,
    unfinished, as decoded alone: the batch generates to the largest budget, and the text of a looping clip moved
    with --batch_size (up to 7x the words beside a 30 s clip)."""
    model = make_model()
    second, ten_seconds = [
        np.random.default_rng(seed).normal(0, 0.1, n * SAMPLE_RATE).astype(np.float32) for seed, n in ((0, 1), (1, 10))
    ]
    (alone,) = model.decode_batch([second])
    assert not alone.finished and len(alone.token_ids) == 24  # the tiny model runs on: 8 tokens a second + 16
    for together in (
        model.decode_batch([second, ten_seconds])[0],
        model.decode_batch([second, second], [None, "Summarise: <speech>"])[0],
    ):
        assert (together.text, together.token_ids, together.finished) == (alone.text, alone.token_ids, False)
