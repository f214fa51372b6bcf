"""The llama.cpp engine (llama_engine.py, gguf_export.py): the same tokens as the torch path from the same weights,
the same stop tokens and loop guards, GGUF files written, cached and remade, and one-line errors.

llama-cpp-python is in the test extra: where it is missing these tests fail (they do not skip), as CI must."""

import gc
import importlib.metadata
import json
import re
import sys
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from repo_scripts import load_script
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from speechllm import SpeechLLM, SpeechLLMConfig
from speechllm.audio import load_audio
from speechllm.data import read_jsonl
from speechllm.errors import InputError
from speechllm.gguf_export import llm_gguf
from speechllm.llama_engine import (
    LLAMA_CPP_REQUIREMENT,
    LlamaCppDecoder,
    banned_ngram_tokens,
    engine_decoder,
    guarded,
    import_llama_cpp,
)
from speechllm.metrics import word_errors
from speechllm.recognition import main as recognize_main
from speechllm.recognition import parse as recognize_parse

STEPS = 24
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Greedy on the three demo clips (37 words) through SmolLM2's own Q4_1 file + the LoRA adapter: measured 9 errors on
# CPUs without AMX (as the torch path) and 13 on one with AMX, whose int8 kernels round the activations otherwise and
# greedy decoding drifts; with the LoRA left out 56, a misloaded projector 37 or more. At most half the words: it hears.
SHIPPED_GGUF_THREE_CLIPS_MAX_ERRORS = 18


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def clips(n=3, seconds=(0.7, 1.3, 2.1)):
    """Noisy tones, a pitch each: distinct clips."""
    rng = np.random.default_rng(0)
    audios = []
    for i, length in enumerate(seconds[:n]):
        t = np.arange(int(16000 * length)) / 16000
        audios.append((0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t) + 0.1 * rng.standard_normal(t.size)))
    return [audio.astype(np.float32) for audio in audios]


def steered(model):
    """Distinct clips, distinct answers: a projector whose output the tiny LLM reads."""
    torch.manual_seed(1)
    torch.nn.init.normal_(model.projector.linear2.weight, std=0.5)
    return model


def with_lora(make_model, llm):
    model = make_model(llm, lora_rank=4, lora_alpha=8.0)
    torch.manual_seed(2)
    for name, parameter in model.trained_parameters().items():
        if "lora_B" in name:  # peft starts B at zero, which would hide a misplaced delta
            torch.nn.init.normal_(parameter, std=0.3)
    return steered(model).eval()


def same_hypotheses(torch_path, engine):
    assert [h.token_ids for h in engine] == [h.token_ids for h in torch_path]
    assert [h.finished for h in engine] == [h.finished for h in torch_path]
    assert [h.text for h in engine] == [h.text for h in torch_path]


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_writes_the_torch_paths_tokens_from_the_same_weights(make_model, llm):
    model = with_lora(make_model, llm)  # LoRA merged into an f32 GGUF, llama's q/k rows permuted
    expected = model.decode_batch(clips(), max_new_tokens=STEPS, with_logprobs=True)
    decoder = engine_decoder(model, "llama.cpp", weights="f32")
    got = decoder.decode_batch(clips(), max_new_tokens=STEPS, with_logprobs=True)
    same_hypotheses(expected, got)
    assert len({tuple(h.token_ids) for h in got}) == 3  # the audio steers each clip's answer
    # llama.cpp keeps keys and values in f16: the log-probabilities agree to that precision
    np.testing.assert_allclose([h.avg_logprob for h in got], [h.avg_logprob for h in expected], rtol=2e-3)
    # one clip after a batch: the cached chat prefix is reused, the batch's sequences are gone
    same_hypotheses(expected[1:2], decoder.decode_batch(clips()[1:2], max_new_tokens=STEPS))


def test_the_llms_own_gguf_file_with_the_lora_as_an_adapter(make_model, tiny):
    """weights "gguf": the LLM's file as it is (here one written from the tiny llama), LoRA added by llama.cpp."""
    gguf_file, _ = llm_gguf(make_model("llama"), "f32")
    config = SpeechLLMConfig(
        whisper_model_name_or_path=tiny["whisper"], llm_model_name_or_path=gguf_file, projector_hidden_size=32,
        model_dtype="float32", lora_rank=4, lora_alpha=8.0,
    )  # fmt: skip
    model = SpeechLLM(config)
    model.load_state_dict(with_lora(make_model, "llama").state_dict())  # the same projector and LoRA
    model.eval()
    expected = model.decode_batch(clips(), max_new_tokens=STEPS)
    decoder = engine_decoder(model, "llama.cpp", weights="gguf")
    assert decoder.llm.files[0] == gguf_file and decoder.llm.files[1].endswith(".gguf")
    same_hypotheses(expected, decoder.decode_batch(clips(), max_new_tokens=STEPS))


GUARDS = [
    {"no_repeat_ngram_size": 1},
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 0.5, "no_repeat_ngram_size": 2},  # a penalty under 1 makes loops, which the n-grams break
]


@pytest.mark.parametrize("guards", GUARDS)
def test_loop_guards_act_as_in_the_torch_path(make_model, guards):
    model = steered(make_model("llama")).eval()
    decoder = engine_decoder(model, "llama.cpp", weights="f32")
    audios = clips()  # of three lengths: the torch path pads the shorter rows, the engine does not
    unguarded = model.decode_batch(audios, max_new_tokens=STEPS)
    expected = model.decode_batch(audios, max_new_tokens=STEPS, **guards)
    assert [h.token_ids for h in expected] != [h.token_ids for h in unguarded]  # the guard changes the answers
    same_hypotheses(expected, decoder.decode_batch(audios, max_new_tokens=STEPS, **guards))
    # the model's own generation_config is the default, as in the torch path
    model.generation_config.update(**guards)
    same_hypotheses(expected, decoder.decode_batch(audios, max_new_tokens=STEPS))


def test_a_clips_repetition_penalty_does_not_depend_on_its_batch(make_model):
    """Every generated token is penalised, in a padded row too (transformers 5.25's own penalty skips a left-padded
    row's first tokens when generating from embeddings)."""
    model = steered(make_model("llama")).eval()
    batch = model.decode_batch(clips(), max_new_tokens=STEPS, repetition_penalty=1.5)
    alone = [model.decode_batch([audio], max_new_tokens=STEPS, repetition_penalty=1.5)[0] for audio in clips()]
    same_hypotheses(alone, batch)


def test_each_clip_is_cut_at_its_own_default_budget_as_in_the_torch_path(make_model):
    """Without max_new_tokens the batch runs to its longest clip's budget; each clip's answer is cut at its own, as
    decoded alone."""
    model = steered(make_model("llama")).eval()
    decoder = engine_decoder(model, "llama.cpp", weights="f32")
    batch = decoder.decode_batch(clips())
    assert [len(h.token_ids) for h in batch if not h.finished] == [22, 27, 33]  # 0.7, 1.3, 2.1 s: 8 a second + 16
    same_hypotheses([decoder.decode_batch([audio])[0] for audio in clips()], batch)
    same_hypotheses(model.decode_batch(clips()), batch)


def test_stops_where_the_torch_path_stops(make_model):
    model = steered(make_model("llama")).eval()
    decoder = engine_decoder(model, "llama.cpp", weights="f32")
    running = decoder.decode_batch(clips(), max_new_tokens=STEPS)
    row = next(n for n, h in enumerate(running) if not h.finished)
    stop = running[row].token_ids[3]  # the tiny LLM seldom ends: make a token it writes a stop token
    model.processor.stop_token_ids.append(stop)
    expected = model.decode_batch(clips(), max_new_tokens=STEPS, with_logprobs=True)
    got = decoder.decode_batch(clips(), max_new_tokens=STEPS, with_logprobs=True)
    same_hypotheses(expected, got)
    assert got[row].finished and got[row].token_ids == running[row].token_ids[: running[row].token_ids.index(stop)]
    np.testing.assert_allclose([h.avg_logprob for h in got], [h.avg_logprob for h in expected], rtol=2e-3)


def test_loop_guards_match_transformers_logits_processors():
    rng = np.random.default_rng(0)
    for _ in range(50):
        generated = rng.integers(0, 6, size=int(rng.integers(0, 12))).tolist()
        logits = rng.standard_normal(8).astype(np.float32)
        ids = torch.tensor([generated], dtype=torch.long)
        expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, torch.tensor(logits[None]))
        expected = NoRepeatNGramLogitsProcessor(3)(ids, expected)[0].numpy()
        np.testing.assert_array_equal(guarded(logits.copy(), generated, 1.7, 3), expected)
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3] and banned_ngram_tokens([1, 2], 3) == []


# Q8_0's largest error in a block of 32 weights, as a share of the block's largest weight: half a quantisation step,
# with room for the f16 scale's rounding.
Q8_0_BLOCK_ERROR = 0.6 / 127


def test_q8_0_holds_the_merged_weights(make_model):
    """Every matrix is stored in Q8_0 blocks within half a step of the f32 file's (which writes the torch path's
    tokens: a misplaced row, a lost LoRA delta or an unpermuted q/k would be whole weights off), and the engine
    decodes it."""
    model = with_lora(make_model, "llama")
    path, adapter = llm_gguf(model, "q8_0")
    assert adapter is None
    expected = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(llm_gguf(model, "f32")[0]).tensors}
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert stored.keys() == expected.keys()
    for name, weight in expected.items():
        tensor = stored[name]
        if weight.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        blocks = weight.reshape(-1, 32)
        error = np.abs(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, 32) - blocks).max(axis=1)
        assert (error <= Q8_0_BLOCK_ERROR * np.abs(blocks).max(axis=1) + 1e-7).all(), name
    hypotheses = engine_decoder(model, "llama.cpp", weights="q8_0").decode_batch(clips(), max_new_tokens=4)
    assert len(hypotheses) == 3 and all(len(h.token_ids) == 4 or h.finished for h in hypotheses)


def test_gguf_is_cached_and_remade_when_the_weights_change(make_model, gguf_cache):
    model = with_lora(make_model, "llama")
    first = engine_decoder(model, "llama.cpp", weights="f32")
    assert engine_decoder(model, "llama.cpp", weights="f32").llm is first.llm  # llama.cpp's loaded LLM is kept
    assert len(list(gguf_cache.glob("*.gguf"))) == 1
    before = first.decode_batch(clips(), max_new_tokens=STEPS)
    with torch.no_grad():
        next(p for n, p in model.trained_parameters().items() if "lora_B" in n).mul_(-3)
    second = engine_decoder(model, "llama.cpp", weights="f32")
    assert second.llm is not first.llm and second.llm.files != first.llm.files
    assert len(list(gguf_cache.glob("*.gguf"))) == 2
    after = second.decode_batch(clips(), max_new_tokens=STEPS)
    same_hypotheses(model.decode_batch(clips(), max_new_tokens=STEPS), after)
    assert [h.token_ids for h in after] != [h.token_ids for h in before]


def test_a_batch_over_llama_cpps_sequence_cap_decodes(make_model):
    """llama.cpp caps a context's sequences (64 in 0.3.16, one of them the chat prefix's): more clips decode in turn."""
    model = steered(make_model("llama")).eval()
    decoder = engine_decoder(model, "llama.cpp", weights="f32")
    cap = import_llama_cpp().llama_max_parallel_sequences()
    audios = clips() * (cap // 3 + 1)  # more clips than sequences
    expected = model.decode_batch(clips(), max_new_tokens=4)
    same_hypotheses(expected * (cap // 3 + 1), decoder.decode_batch(audios, max_new_tokens=4))


def test_the_engine_leaves_no_reference_cycle_through_the_model(make_model):
    """The model keeps llama.cpp's loaded LLM for the next decoder, which must not keep the model: dropped, a model
    (and its LLM's memory) is freed at once, not at the next cycle collection."""
    model = make_model("llama").eval()
    engine_decoder(model, "llama.cpp", weights="f32").decode_batch(clips(1), max_new_tokens=2)
    dropped = weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        del model
        assert dropped() is None
    finally:
        gc.enable()


def test_the_llama_cpp_pin_is_written_once_and_installed():
    """The llama extra pins llama-cpp-python (the error message names the same pin), the test extra takes that extra,
    and these tests run the pinned version."""
    extras = (
        (EXAMPLES.parent / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    )
    assert re.search(r'^llama = \["(.+)"\]$', extras, re.MULTILINE)[1] == LLAMA_CPP_REQUIREMENT
    assert extras.count("llama-cpp-python") == 1 and '"speechllm[llama]"' in extras.split("test = [")[1]
    name, version = LLAMA_CPP_REQUIREMENT.split("==")
    assert importlib.metadata.version(name) == version


def test_a_missing_llama_cpp_python_is_one_line(make_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp then raises ImportError
    with pytest.raises(InputError, match=r"pip install 'speechllm\[llama\]'"):
        LlamaCppDecoder(make_model("llama"), weights="f32")


def test_beams_and_unknown_engines_are_user_errors(make_model):
    model = make_model("llama").eval()
    with pytest.raises(InputError, match="engine must be one of torch, llama.cpp"):
        engine_decoder(model, "onnx")
    with pytest.raises(InputError, match="decodes greedily"):
        engine_decoder(model, "llama.cpp", weights="f32").decode_batch(clips(1), num_beams=4)
    with pytest.raises(InputError, match="not an LLM loaded from a .gguf|was not loaded from one"):
        engine_decoder(model, "llama.cpp", weights="gguf")


def test_a_chooser_decodes_in_torch_and_writes_no_gguf(make_model, gguf_cache):
    """A chooser generates nothing: before, the engine wrote and loaded a merged GGUF of its LLM and never ran it."""
    model = make_model("llama", nbest=3, ger_decoding="rescore").eval()
    assert engine_decoder(model, "llama.cpp", weights="f32") is model
    assert not gguf_cache.exists() or not any(gguf_cache.iterdir())


def test_recognize_with_the_engine_writes_what_the_torch_path_writes(make_model, tiny, tmp_path, capsys):
    model = steered(make_model("llama"))
    model.save_pretrained(tmp_path / "model")
    common = ["--projector_model_path", str(tmp_path / "model"), "--data_path", tiny["jsonl"]]
    common += ["--max_new_tokens", "8", "--batch_size", "3"]
    recognize_main(common + ["--result_path", str(tmp_path / "torch.txt"), "--num_beams", "1"])
    engine = ["--engine", "llama.cpp", "--gguf_weights", "f32"]  # greedy without --num_beams: the engine's default
    recognize_main(common + ["--result_path", str(tmp_path / "llama.txt"), *engine])
    assert (tmp_path / "llama.txt").read_text() == (tmp_path / "torch.txt").read_text()
    with pytest.raises(SystemExit):
        recognize_main(common + ["--engine", "llama.cpp", "--num_beams", "4"])
    assert "--engine llama.cpp decodes greedily: --num_beams must be 1, not 4" in capsys.readouterr().err


def test_recognize_takes_its_engines_default_beams():
    for engine, beams in (("torch", 4), ("llama.cpp", 1)):
        args, _ = recognize_parse(["--projector_model_path", "model", "--engine", engine])
        args.check_engine()
        assert args.num_beams == beams


def test_evaluate_refuses_beams_for_the_engine_before_loading(capsys):
    evaluate = load_script("bench/evaluate.py")
    with pytest.raises(SystemExit):
        evaluate.main(["no/such/model", "no/such/data.jsonl", "--engine", "llama.cpp", "--num_beams", "4"])
    assert "--engine llama.cpp decodes greedily: --num_beams must be 1, not 4" in capsys.readouterr().err


def test_speed_bench_times_the_engines_phases(make_model, tiny, tmp_path):
    steered(make_model("llama")).save_pretrained(tmp_path / "model")
    bench = load_script("bench/speed.py")
    out = tmp_path / "speed.json"
    options = ["--quick", "--threads", "1", "--engine", "both", "--gguf_weights", "f32", "--audio_modes", "dynamic"]
    bench.main([tiny["jsonl"], "--model", str(tmp_path / "model"), *options, "--json", str(out)])
    result = json.loads(out.read_text())
    engine = [r for r in result["recognition"] if r["engine"] == "llama.cpp"]
    assert {(r["batch_size"], r["num_beams"]) for r in engine} == {(1, 1), (bench.QUICK["batch_size"], 1)}
    torch_rows = {r["batch_size"]: r for r in result["recognition"] if r["engine"] == "torch" and r["num_beams"] == 1}
    for r in engine:
        batches = -(-bench.QUICK["limit"] // r["batch_size"])
        # a prompt pass a batch, and the chat prefix's again where the batch needed a larger context
        assert batches <= r["prompt"]["calls"] <= batches + 1
        assert 0 < r["steps"]["count"] <= batches * (bench.QUICK["max_new_tokens"] - 1)
        assert r["steps"]["floor_seconds"] > 0 and r["encoder"]["seconds"] > 0 and r["steps"]["seconds"] > 0
        assert r["generated_tokens"] == torch_rows[r["batch_size"]]["generated_tokens"]  # the same answers


def test_the_shipped_model_writes_the_torch_paths_tokens(tmp_path):
    """The real llama-architecture GGUF (SmolLM2, Q4_1) with the shipped LoRA: merged into f32, the same tokens;
    its own Q4_1 file with the LoRA as an adapter still reads the clips (its quantised steps may drift from the torch
    path's text, by the CPU's kernels)."""
    model = SpeechLLM.from_pretrained(EXAMPLES / "tiny_en_smollm2")
    examples = read_jsonl(str(EXAMPLES / "audio" / "data.jsonl"))
    audios = [load_audio(e.wav) for e in examples]
    expected = model.decode_batch(audios, max_new_tokens=30)
    same_hypotheses(expected, engine_decoder(model, "llama.cpp", weights="f32").decode_batch(audios, max_new_tokens=30))
    own_file = engine_decoder(model, "llama.cpp", weights="gguf")
    texts = [own_file.decode_batch([audio], max_new_tokens=30)[0].text for audio in audios]
    errors = sum(word_errors(e.txt, text) for e, text in zip(examples, texts))
    assert errors <= SHIPPED_GGUF_THREE_CLIPS_MAX_ERRORS, texts


def test_transcribe_takes_the_engine(make_model):
    model = with_lora(make_model, "llama")
    expected = [h.text for h in engine_decoder(model, "llama.cpp").decode_batch(clips(), max_new_tokens=STEPS)]
    assert model.transcribe(clips(), max_new_tokens=STEPS, engine="llama.cpp") == expected
    with pytest.raises(InputError, match="engine must be one of"):
        model.transcribe(clips(), engine="vllm")


def test_a_gguf_written_from_other_dtype_weights_is_not_reused(make_model, gguf_cache):
    # An HF LLM's merged GGUF is written from its torch weights: bf16-loaded ones round what an f32 run would read.
    model = with_lora(make_model, "llama")
    f32_file, _ = llm_gguf(model, "f32")
    with torch.no_grad():  # the frozen weights in bf16, the LoRA weights (also part of the key) as they were
        for name, parameter in model.llm.named_parameters():
            if "lora_" not in name:
                parameter.data = parameter.data.to(torch.bfloat16)
    bf16_file, _ = llm_gguf(model, "f32")
    assert bf16_file != f32_file and len(list(gguf_cache.glob("*.gguf"))) == 2
