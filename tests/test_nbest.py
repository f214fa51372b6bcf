"""Error correction (speechllm/nbest.py): Whisper's n-best in the prompt, cached or decoded, with or without audio."""

import json
import re
from pathlib import Path

import pytest
import torch
import whisper
from repo_scripts import load_script
from tiny_models import write_jsonl

from speechllm import AUDIO_PLACEHOLDER, NBEST_PLACEHOLDER, SpeechLLM, SpeechLLMConfig
from speechllm.audio import log_mel_batch
from speechllm.data import DataError, SpeechDataset, read_jsonl
from speechllm.encoder import load_whisper_encoder
from speechllm.errors import InputError
from speechllm.model import DEFAULT_PROMPT
from speechllm.nbest import (
    DEFAULT_NBEST_PROMPT,
    ErrorCorrectionCollator,
    WhisperDecoder,
    add_missing_nbest,
    decode_nbest,
    error_correction_batch,
    error_correction_collator,
    load_whisper_decoder,
)
from speechllm.packaged_models import whisper_tiny_en
from speechllm.whisper_formats import load_whisper_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_JSONL = str(EXAMPLES / "audio" / "data.jsonl")
HYPOTHESES = ["hello word", "hello world", "yellow world", "hollow whirled"]


@pytest.fixture
def cached_jsonl(tiny, tmp_path):
    """The tiny dataset with a cached 4-best on every line (each line's own, so rows can be told apart)."""
    rows = [
        {"wav": e.wav, "txt": e.txt, "nbest": [f"{h} {i}" for h in HYPOTHESES]}
        for i, e in enumerate(read_jsonl(tiny["jsonl"]))
    ]
    return write_jsonl(str(tmp_path / "cached.jsonl"), rows)


@pytest.fixture(scope="module")
def tiny_en():
    return whisper_tiny_en()


def items(path):
    dataset = SpeechDataset(path)
    return [dataset[i] for i in range(len(dataset))]


def prompt_text(model, batch, row):
    real = batch["attention_mask"][row].bool() & ~batch["audio_mask"][row]
    return model.tokenizer.decode(batch["input_ids"][row][real])


def test_nbest_appears_in_the_prompt_in_order(make_model, cached_jsonl):
    model = make_model(nbest=3)
    batch = ErrorCorrectionCollator(model)(items(cached_jsonl))
    for row in range(len(batch["input_ids"])):
        text = prompt_text(model, batch, row)
        listed = "\n".join(f"{k}. {h} {row}" for k, h in enumerate(HYPOTHESES[:3], 1))
        assert "Speech recognition hypotheses, best first:\n" + listed + "\n" in text
        assert HYPOTHESES[3] not in text  # the cache holds 4, the model reads its first N = 3
        ids, is_audio = batch["input_ids"][row].tolist(), batch["audio_mask"][row].tolist()
        first_audio = is_audio.index(True)
        before = model.tokenizer.decode(ids[:first_audio])
        assert before.endswith(f"3. {HYPOTHESES[2]} {row}\n")  # the audio follows the list, as the template says


def test_hypotheses_that_differ_only_in_case_or_punctuation_are_listed_once(make_model, tiny, tmp_path):
    spellings = ["Hello, world.", "hello world", "Hello world!", "Yellow world.", "yellow, world"]
    rows = [{"wav": e.wav, "txt": e.txt, "nbest": spellings} for e in read_jsonl(tiny["jsonl"])]
    model = make_model(nbest=2)
    batch = ErrorCorrectionCollator(model)(items(write_jsonl(str(tmp_path / "spellings.jsonl"), rows)))
    text = prompt_text(model, batch, 0)
    # each the first of its spellings, and no other between them and the (unlisted) audio positions
    assert "best first:\n1. Hello, world.\n2. Yellow world.\nWrite the correct transcript." in text


def test_without_audio_the_prompt_has_no_audio_positions(make_model, cached_jsonl):
    with_audio, text_only = make_model(nbest=3), make_model(nbest=3, ger_audio=False)
    batch = ErrorCorrectionCollator(text_only)(items(cached_jsonl))
    assert not batch["audio_mask"].any() and batch["mel"].shape[0] == batch["audio_tokens"].numel() == 0
    reference = ErrorCorrectionCollator(with_audio)(items(cached_jsonl))
    assert reference["audio_mask"].any()
    for row in range(len(batch["input_ids"])):
        assert prompt_text(text_only, batch, row) == prompt_text(with_audio, reference, row)  # the same text, no audio
    assert torch.isfinite(text_only(**batch).loss)
    nbest = [[f"{h} {i}" for h in HYPOTHESES] for i in range(2)]
    clips = [item["audio"] for item in items(cached_jsonl)[:2]]
    assert len(text_only.transcribe_batch(clips, nbest=nbest, max_new_tokens=3)) == 2


def test_text_only_error_correction_trains_lora(make_model, cached_jsonl, tmp_path):
    """--ger_audio false with LoRA: the LoRA weights learn from the n-best text, a round trip keeps them; without a
    trainable LLM there is nothing to train, and training says so."""
    with pytest.raises(ValueError, match="nothing to train"):
        error_correction_collator(make_model(nbest=3, ger_audio=False), [], "cpu")
    model = make_model(nbest=3, ger_audio=False, lora_rank=2, lora_target_modules="q_proj,v_proj")
    batch = error_correction_collator(model, [SpeechDataset(cached_jsonl)], "cpu")(items(cached_jsonl))
    model(**batch).loss.backward()
    trained = model.trained_parameters()
    lora_b = [p for n, p in trained.items() if "lora_B" in n]  # lora_A's gradient is 0 while lora_B is at its init 0
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None or not p.grad.any() for p in model.projector.parameters())  # it reads no audio
    model.save_pretrained(tmp_path)
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert (loaded.config.nbest, loaded.config.ger_audio, loaded.config.lora_rank) == (3, False, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_error_correction_settings_round_trip(make_model, tiny, tmp_path):
    model = make_model(nbest=4, ger_audio=False)
    assert model.config.prompt == DEFAULT_NBEST_PROMPT and make_model().config.prompt == DEFAULT_PROMPT
    model.save_pretrained(tmp_path)
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert (loaded.config.nbest, loaded.config.ger_audio, loaded.config.prompt) == (4, False, DEFAULT_NBEST_PROMPT)
    checkpoint = torch.load(tiny["whisper"], weights_only=True)["model_state_dict"]
    for name, tensor in loaded.whisper_decoder.decoder.state_dict().items():  # the decoder of the encoder's weights
        # equal_nan: make_whisper leaves the decoder's positional embedding as torch.empty made it
        torch.testing.assert_close(tensor, checkpoint[f"decoder.{name}"], rtol=0, atol=0, equal_nan=True)
    assert make_model().whisper_decoder is None  # plain recognition keeps no decoder
    with pytest.raises(ValueError, match=NBEST_PLACEHOLDER):
        make_model(nbest=2, prompt=f"{AUDIO_PLACEHOLDER}Transcribe.")
    with pytest.raises(ValueError, match="nbest must be"):
        make_model(nbest=-1)


def test_whisper_decodes_the_n_best_in_the_configured_language(make_model, tiny):
    """whisper_language reaches Whisper's decoding task (its tokenizer and start sequence); before, every n-best was
    decoded in English. English-only weights are refused with one line that names them (a chooser may load two
    Whispers), unknown codes with one line."""
    multilingual = whisper.model.ModelDimensions(80, 1500, 48, 2, 2, 51865, 16, 48, 2, 1)
    task = WhisperDecoder(multilingual, "de").decoding_task(beam_size=2)
    assert task.tokenizer.language == "de"
    assert task.tokenizer.to_language_token("de") in task.initial_tokens
    assert WhisperDecoder(multilingual).decoding_task().tokenizer.language == "en"
    english_only = f"^{re.escape(str(tiny['whisper']))}: whisper_language 'de': these Whisper weights are English-only$"
    with pytest.raises(InputError, match=english_only):
        make_model(nbest=3, whisper_language="de")  # the tiny test Whisper's 128-token vocabulary is English-only
    with pytest.raises(InputError, match="a code Whisper knows .*, not 'deutsch'"):
        WhisperDecoder(multilingual, "deutsch")


def test_nbest_on_a_jsonl_line_is_checked(tiny, tmp_path):
    wav = read_jsonl(tiny["jsonl"])[0].wav
    path = write_jsonl(
        str(tmp_path / "bad.jsonl"), [{"wav": wav, "txt": "a", "nbest": ["a"]}, {"wav": wav, "txt": "b", "nbest": "b"}]
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2: 'nbest' must be a non-empty list of strings"):
        read_jsonl(path)


def test_whisper_nbest_holds_its_own_one_best(tiny_en):
    """On the real tiny.en weights: our batched beam search gives whisper.decode's own 1-best first."""
    audios = [item["audio"] for item in items(EXAMPLE_JSONL)]
    encoder, decoder = load_whisper_encoder(tiny_en), load_whisper_decoder(tiny_en)
    batched, _ = decode_nbest(encoder, decoder, 5, audios)
    assert decode_nbest(encoder, decoder, 5, audios[-1:])[0] == batched[-1:]  # a batch decodes as clips alone do
    whisper_model = load_whisper_model(tiny_en)
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, beam_size=5)
    for audio, hypotheses in zip(audios, batched):
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), whisper_model.dims.n_mels)
        assert hypotheses[0] == whisper.decode(whisper_model, mel, options).text
        assert 2 <= len(hypotheses) <= 5 and len(set(hypotheses)) == len(hypotheses)


@pytest.mark.parametrize("audio_mode", ["window", "dynamic"])
def test_cached_and_computed_nbest_give_the_same_batch(tiny, tiny_en, tmp_path, audio_mode):
    config = dict(whisper_model_name_or_path=tiny_en, llm_model_name_or_path=tiny["qwen2"], model_dtype="float32")
    model = SpeechLLM(SpeechLLMConfig(**config, projector_hidden_size=32, nbest=3, audio_mode=audio_mode))
    plain = str(tmp_path / "plain.jsonl")
    write_jsonl(plain, [{"wav": e.wav, "txt": e.txt} for e in read_jsonl(EXAMPLE_JSONL)[:2]])
    cache = str(tmp_path / "cached.jsonl")
    load_script("examples/make_error_correction_data.py").main(["--whisper", tiny_en, "--nbest", "3", plain, cache])
    cached = read_jsonl(cache)
    assert all(e.nbest for e in cached) and not any(e.nbest for e in read_jsonl(plain))
    audios = [item["audio"] for item in items(plain)]

    encoded, decoded = [], []
    model.encoder.register_forward_hook(lambda module, args, output: encoded.append(len(output)))
    model.whisper_decoder.register_forward_hook(lambda module, args, output: decoded.append(len(output)))
    computed = error_correction_batch(model, audios, [None] * 2)
    from_cache = error_correction_batch(model, audios, [None] * 2, [e.nbest for e in cached])
    assert decoded == [2]  # the cached n-best is not decoded again
    assert computed.keys() == from_cache.keys()
    for name in computed:
        assert torch.equal(computed[name], from_cache[name]), name
    if audio_mode == "window":  # the decoder's features go on to the projector
        assert encoded == [2, 2]
        mel, frames = log_mel_batch(audios, model.encoder.dims.n_mels, None)
        torch.testing.assert_close(computed["audio_features"], model.encoder(mel, frames), rtol=0, atol=0)
    else:
        assert encoded == [2] and "audio_features" not in computed  # the cached n-best needs no decoding
    encoded.clear()
    model.transcribe_batch(audios, max_new_tokens=2)
    assert encoded == ([2] if audio_mode == "window" else [2, 2])  # window mode encodes each clip once

    if audio_mode == "window":  # training: the missing n-best decoded once, up front, then the collator
        dataset = SpeechDataset(plain)
        add_missing_nbest(model.encoder, model.whisper_decoder, 3, dataset.examples)
        collator = ErrorCorrectionCollator(model)
        trained, trained_cached = collator([dataset[i] for i in range(2)]), collator(items(cache))
        for name in trained:
            assert torch.equal(trained[name], trained_cached[name]), name


def test_train_and_recognize_a_plain_jsonl(tiny, tiny_en, tmp_path):
    """train.py and recognize.py on {"wav", "txt"} lines: the n-best is decoded inside, no preparation step."""
    from speechllm.recognition import main as recognize
    from speechllm.training import main as train

    output = tmp_path / "ger"
    models = ["--whisper_model_name_or_path", tiny_en, "--llm_model_name_or_path", tiny["qwen2"]]
    train(
        models
        + ["--nbest", "2", "--audio_mode", "window", "--model_dtype", "float32", "--projector_hidden_size", "32"]
        + ["--data_path", EXAMPLE_JSONL, "--output_dir", str(output), "--max_steps", "1", "--report_to", "none"]
        + ["--per_device_train_batch_size", "3", "--use_cpu", "--save_strategy", "no"]
    )
    config = json.loads((output / "config.json").read_text())
    assert (config["nbest"], config["ger_audio"], config["prompt"]) == (2, True, DEFAULT_NBEST_PROMPT)
    result = tmp_path / "hypotheses.txt"
    recognize(
        ["--projector_model_path", str(output), "--data_path", EXAMPLE_JSONL, "--result_path", str(result)]
        + ["--num_beams", "1", "--max_new_tokens", "4"]
    )
    keys = [line.split("\t")[0] for line in result.read_text().splitlines()]
    assert keys == [e.key for e in read_jsonl(EXAMPLE_JSONL)]


def test_nbest_on_a_saved_recognition_model_takes_the_nbest_prompt(tiny, tiny_en, tmp_path):
    """--projector_model_path of an ASR model with --nbest: error correction from its trained weights, with the n-best
    prompt (its own has no <nbest>) unless --prompt gives one."""
    from speechllm.training import ModelArguments, build_model

    config = SpeechLLMConfig(
        whisper_model_name_or_path=tiny_en, llm_model_name_or_path=tiny["qwen2"], projector_hidden_size=32
    )
    saved = SpeechLLM(config)
    saved.save_pretrained(tmp_path)
    model = build_model(ModelArguments(projector_model_path=str(tmp_path), nbest=3))
    assert (model.config.nbest, model.config.prompt) == (3, DEFAULT_NBEST_PROMPT)
    assert model.whisper_decoder is not None
    for name, value in saved.projector.state_dict().items():
        assert torch.equal(model.projector.state_dict()[name], value), name
    prompt = f"{NBEST_PLACEHOLDER}\n{AUDIO_PLACEHOLDER}Fix it."
    assert (
        build_model(ModelArguments(projector_model_path=str(tmp_path), nbest=3, prompt=prompt)).config.prompt == prompt
    )
