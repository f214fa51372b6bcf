"""speechllm.whisper_formats: each supported format must give weights that act like the source."""

import json
from dataclasses import asdict
from pathlib import Path

import ctranslate2
import jiwer
import numpy as np
import pytest
import soundfile
import torch
import transformers
import whisper
from whisper.model import ModelDimensions, Whisper

from speechllm.packaged_models import WHISPER_BASE, resolve, whisper_tiny_en
from speechllm.whisper_formats import load_whisper_checkpoint, read_ctranslate2_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "audio"
MAX_WER = 0.2
# Enough for the examples (about 20 words each); keeps a broken model from babbling for minutes.
MAX_TOKENS = 64


def _examples():
    lines = (EXAMPLES / "data.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def _mels(n_mels: int) -> torch.Tensor:
    mels = []
    for row in _examples():
        audio, rate = soundfile.read(EXAMPLES / row["wav"], dtype="float32")
        assert rate == whisper.audio.SAMPLE_RATE
        audio = whisper.pad_or_trim(torch.from_numpy(audio))
        mels.append(whisper.log_mel_spectrogram(audio, n_mels))
    return torch.stack(mels)


def _wer(model: Whisper, mels: torch.Tensor) -> float:
    from whisper.normalizers import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=MAX_TOKENS)
    results = whisper.decode(model, mels, options)
    hypotheses = [normalize(r.text) for r in results]
    references = [normalize(row["txt"]) for row in _examples()]
    return jiwer.wer(references, hypotheses)


def _model(dims: ModelDimensions, state_dict) -> Whisper:
    model = Whisper(dims)
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def tiny_en_dir() -> Path:
    return Path(whisper_tiny_en())


@pytest.fixture(scope="module")
def tiny_en(tiny_en_dir):
    return load_whisper_checkpoint(str(tiny_en_dir))


def test_ctranslate2_tiny_en_encoder_matches_ctranslate2(tiny_en_dir, tiny_en):
    dims, state_dict = tiny_en
    assert (dims.n_audio_head, dims.n_text_head, dims.n_audio_layer) == (6, 6, 4)
    assert (dims.n_mels, dims.n_audio_state, dims.n_vocab) == (80, 384, 51864)
    mel = _mels(dims.n_mels)[:1]
    reference = ctranslate2.models.Whisper(str(tiny_en_dir), device="cpu", intra_threads=1)
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(mel.numpy())))
    with torch.no_grad():
        ours = _model(dims, state_dict).encoder(mel).numpy()
    assert ours.shape == expected.shape == (1, dims.n_audio_ctx, dims.n_audio_state)
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=1e-3)


def test_ctranslate2_tiny_en_transcribes(tiny_en):
    dims, state_dict = tiny_en
    model = _model(dims, state_dict)
    assert not model.is_multilingual
    assert _wer(model, _mels(dims.n_mels)) < MAX_WER


def test_ctranslate2_split_whisper_base_transcribes():
    # Its two parts ship in two packages: the name joins their folders with "+", so a saved config can name it
    dims, state_dict = load_whisper_checkpoint(WHISPER_BASE)
    assert (dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer) == (512, 8, 6)
    assert (dims.n_text_head, dims.n_text_layer, dims.n_vocab) == (8, 6, 51865)
    model = _model(dims, state_dict)
    assert model.is_multilingual
    assert _wer(model, _mels(dims.n_mels)) < MAX_WER


def test_a_split_model_missing_a_part_is_refused_by_name(tmp_path):
    first, second = (resolve(folder) for folder in WHISPER_BASE.split("+"))
    with pytest.raises(ValueError, match=r"parts \[2\], not 1..N"):
        load_whisper_checkpoint(second + "+" + str(tmp_path))
    with pytest.raises(ValueError, match="ends at byte .*: a part is missing or cut short"):
        load_whisper_checkpoint(first + "+" + str(tmp_path))  # part 1 alone: nothing says a part 2 exists
    with pytest.raises(ValueError, match="missing is not a folder"):
        load_whisper_checkpoint(first + "+" + str(tmp_path / "missing"))


def _tiny_hf_config():
    return transformers, transformers.WhisperConfig(
        vocab_size=300,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        decoder_layers=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_source_positions=50,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    # Fresh models have zero biases and unit norms, which would hide mapping mistakes.
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def hf_whisper(tmp_path_factory):
    transformers, config = _tiny_hf_config()
    model = _perturb(transformers.WhisperForConditionalGeneration(config))
    directory = tmp_path_factory.mktemp("hf_whisper")
    model.save_pretrained(directory)
    features = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions)
    return model, directory, features


def test_huggingface_encoder_and_decoder_match(hf_whisper):
    hf, directory, features = hf_whisper
    dims, state_dict = load_whisper_checkpoint(str(directory))
    assert (dims.n_audio_head, dims.n_text_layer, dims.n_vocab, dims.n_text_ctx) == (4, 2, 300, 32)
    model = _model(dims, state_dict)
    tokens = torch.tensor([[1, 5, 17, 42, 99], [1, 7, 8, 250, 3]])
    with torch.no_grad():
        expected_audio = hf.model.encoder(features).last_hidden_state
        expected_logits = hf(input_features=features, decoder_input_ids=tokens).logits
        audio = model.encoder(features)
        logits = model.logits(tokens, audio)
    torch.testing.assert_close(audio, expected_audio, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_huggingface_encoder_only(tmp_path):
    transformers, config = _tiny_hf_config()
    hf = _perturb(transformers.WhisperForAudioClassification(config))
    hf.save_pretrained(tmp_path)
    dims, state_dict = load_whisper_checkpoint(str(tmp_path))
    assert all(key.startswith("encoder.") for key in state_dict)
    assert (dims.n_text_head, dims.n_text_layer, dims.n_vocab) == (4, 2, 300)
    encoder = Whisper(dims).encoder.eval()
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in state_dict.items()}, strict=True)
    features = torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions)
    with torch.no_grad():
        torch.testing.assert_close(encoder(features), hf.encoder(features).last_hidden_state, atol=1e-4, rtol=1e-4)


def _tiny_dims() -> ModelDimensions:
    return ModelDimensions(
        n_mels=16,
        n_audio_ctx=20,
        n_audio_state=32,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=100,
        n_text_ctx=8,
        n_text_state=32,
        n_text_head=2,
        n_text_layer=1,
    )


def test_openai_checkpoint_round_trip(tmp_path):
    dims = _tiny_dims()
    model = Whisper(dims)
    with torch.no_grad():  # openai-whisper leaves decoder.positional_embedding uninitialized
        for parameter in model.parameters():
            parameter.normal_()
    original = model.state_dict()
    torch.save({"dims": asdict(dims), "model_state_dict": original}, tmp_path / "tiny.pt")
    loaded_dims, loaded = load_whisper_checkpoint(str(tmp_path / "tiny.pt"))
    assert loaded_dims == dims
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key


def test_openai_name_uses_whisper_download(tmp_path, monkeypatch):
    dims = _tiny_dims()
    checkpoint = tmp_path / "t.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, checkpoint)
    requested = []

    def fake_download(url, root, in_memory):
        requested.append(url)
        return str(checkpoint)

    monkeypatch.setattr(whisper, "_download", fake_download)
    assert load_whisper_checkpoint("tiny")[0] == dims
    assert requested == [whisper._MODELS["tiny"]]


@pytest.mark.parametrize("bad", ["tiny.xl", "/nonexistent/whisper-dir", "EMPTY_DIR"])
def test_unknown_input_raises_value_error_naming_it(bad, tmp_path):
    if bad == "EMPTY_DIR":
        bad = str(tmp_path)
    with pytest.raises(ValueError) as error:
        load_whisper_checkpoint(bad)
    assert bad in str(error.value)
    assert "large-v3" in str(error.value) and "CTranslate2" in str(error.value)


@pytest.mark.parametrize(
    "quantization,atol",
    [
        ("float32", 1e-5),
        ("float16", 5e-3),
        ("bfloat16", 5e-2),
        ("int16", 2e-2),
        ("int8", 1e-1),
        ("int8_float16", 1e-1),
    ],
)
def test_ctranslate2_quantized_files(hf_whisper, tmp_path, quantization, atol):
    hf, directory, features = hf_whisper
    ctranslate2.converters.TransformersConverter(str(directory)).convert(
        str(tmp_path / "ct2"), quantization=quantization
    )
    variables = read_ctranslate2_model(tmp_path / "ct2" / "model.bin")
    assert not any(name.endswith("_scale") for name in variables)
    weight = variables["encoder/layer_0/ffn/linear_0/weight"]
    expected_weight = hf.model.encoder.layers[0].fc1.weight.detach().numpy()
    assert weight.dtype in (np.float32, np.float16)
    # Every storage type is within half a step of int8's per-row scale, the coarsest of them.
    step = np.abs(expected_weight).max(axis=1, keepdims=True) / 127
    assert (np.abs(weight.astype(np.float32) - expected_weight) <= step / 2 + 1e-6).all()

    dims, state_dict = load_whisper_checkpoint(str(tmp_path / "ct2"))
    model = _model(dims, state_dict)
    with torch.no_grad():
        expected = hf.model.encoder(features).last_hidden_state
        torch.testing.assert_close(model.encoder(features), expected, atol=atol, rtol=0)


@pytest.fixture
def ct2_bytes(hf_whisper, tmp_path):
    """The tiny HF Whisper converted to CTranslate2 (tmp_path/whole) and its model.bin's bytes."""
    _, directory, _ = hf_whisper
    ctranslate2.converters.TransformersConverter(str(directory)).convert(str(tmp_path / "whole"), quantization="int8")
    return (tmp_path / "whole" / "model.bin").read_bytes()


def test_ctranslate2_reader_streams_parts_and_file_objects(ct2_bytes, tmp_path):
    data = ct2_bytes
    split = tmp_path / "split"
    split.mkdir()
    cuts = [0, 7, len(data) // 2, len(data)]  # one cut falls inside the header
    for i in range(1, len(cuts)):
        (split / f"model.bin.part{i}").write_bytes(data[cuts[i - 1] : cuts[i]])
    whole = read_ctranslate2_model(tmp_path / "whole")
    with open(tmp_path / "whole" / "model.bin", "rb") as f:
        for other in (read_ctranslate2_model(split), read_ctranslate2_model(f)):
            assert other.keys() == whole.keys()
            for name, value in whole.items():
                np.testing.assert_array_equal(other[name], value, err_msg=name)
    assert int(whole["encoder/num_heads"]) == 4
    assert whole["decoder/projection/weight"] is whole["decoder/embeddings/weight"]


def test_a_folder_missing_a_part_or_any_weights_is_refused_by_name(ct2_bytes, tmp_path):
    data = ct2_bytes
    split = tmp_path / "split"
    split.mkdir()
    for i, cut in enumerate([data[:7], data[7:100], data[100:]], start=1):
        (split / f"model.bin.part{i}").write_bytes(cut)
    (split / "model.bin.part2").unlink()  # a middle part: the stream would otherwise run on into part 3
    with pytest.raises(ValueError, match=r"split.*parts \[1, 3\], not 1..N"):
        read_ctranslate2_model(split)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*: no model.bin nor model.bin.part1..N"):
        read_ctranslate2_model(tmp_path / "empty")
