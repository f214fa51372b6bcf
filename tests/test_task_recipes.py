"""The data recipes for error correction and speech-as-a-prompt produce jsonl that train.py reads."""

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_scripts import load_script

from speechllm import AUDIO_PLACEHOLDER
from speechllm.audio import load_audio
from speechllm.data import SpeechDataset, read_jsonl
from speechllm.encoder import load_whisper_encoder
from speechllm.llm import load_llm
from speechllm.nbest import load_whisper_decoder, window_features
from speechllm.packaged_models import whisper_tiny_en
from speechllm.rescoring import clip_whisper_logprobs
from speechllm.results import PartialResults

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_error_correction_cache_holds_whispers_nbest_and_resumes(tmp_path, capsys):
    recipe = load_script("examples/make_error_correction_data.py")
    source = str(EXAMPLES / "audio" / "data.jsonl")
    references = read_jsonl(source)
    output = tmp_path / "ger.jsonl"
    last = {"key": references[-1].key, "wav": references[-1].wav, "txt": references[-1].txt, "nbest": ["kept"]}
    args = ["--whisper", whisper_tiny_en(), "--nbest", "4", source, str(output)]
    settings = {"input": source, "whisper": whisper_tiny_en(), "nbest": 4, "language": "en", "model_dtype": "float32"}
    killed = PartialResults(str(output), 0, settings)
    killed.add([last])
    with open(killed.path, "a") as file:
        file.write('{"key": "LJ0')  # torn by the kill
    other = PartialResults(str(tmp_path / "other.jsonl"), 0, settings | {"nbest": 5})
    other.add([last])
    with pytest.raises(SystemExit):  # written with another beam: refused, not mixed in
        recipe.run_command_line(recipe.main, args[:-1] + [str(tmp_path / "other.jsonl")])
    assert "nbest: 5 there, 4 now" in capsys.readouterr().err
    recipe.main(args)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["key"], r["txt"], r["wav"]) for r in rows] == [(e.key, e.txt, e.wav) for e in references]  # in order
    assert rows[-1]["nbest"] == ["kept"] and killed.files() == []  # resumed, not redone
    for row in rows[:-1]:
        assert 2 <= len(row["nbest"]) <= 4 and len(set(row["nbest"])) == len(row["nbest"])  # distinct beams
    assert SpeechDataset(str(output)).examples[1].nbest == rows[1]["nbest"]
    # Whisper's score of each hypothesis, as the chooser computes it (one clip at a time here, a batch there)
    encoder, decoder = load_whisper_encoder(whisper_tiny_en()), load_whisper_decoder(whisper_tiny_en())
    for row in rows[:-1]:
        features, counts = window_features(encoder, [load_audio(row["wav"])], "cpu")
        expected = clip_whisper_logprobs(decoder, features, counts, [row["nbest"]])[0]
        np.testing.assert_allclose(row["nbest_logprobs"], expected, rtol=1e-4)
        assert row["nbest_whisper"] == whisper_tiny_en()  # which ranking checks against its model's
    assert "nbest_logprobs" not in rows[-1]  # the resumed line is kept as it was


def test_speech_prompt_data_several_instructions_with_the_llms_answers_and_transcripts(tiny, make_model, tmp_path):
    recipe = load_script("examples/make_speech_prompt_data.py")
    output = tmp_path / "distilled.jsonl"
    instructions, system = ["", "Summarise:"], "Be brief."
    args = ["--llm", tiny["qwen2"], "--system_prompt", system, "--max_new_tokens", "6", "--batch_size", "3"]
    args += [part for instruction in instructions for part in ("--instruction", instruction)]
    recipe.main(args + [tiny["jsonl"], str(output)])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"utt{i}-{j}" for i in range(len(tiny["texts"])) for j in range(2)]
    llm, tokenizer = load_llm(tiny["qwen2"], torch.float32)
    processor = make_model(system_prompt=system).processor
    for row, (text, instruction) in zip(rows, itertools.product(tiny["texts"], instructions), strict=True):
        prompt = f"{instruction}\n{AUDIO_PLACEHOLDER}" if instruction else AUDIO_PLACEHOLDER
        question = prompt.replace(AUDIO_PLACEHOLDER, text)
        assert (row["prompt"], row["transcript"]) == (prompt, text)
        assert row["txt"] == recipe.llm_answers(llm, tokenizer, [question], 6, system)[0]  # batched = alone
        # Distillation's teacher, trained with the same system prompt, reads the chat these answers were written for.
        chat = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        assert (
            processor.text_prompt_ids(prompt, text)
            == tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
        )
    assert len({r["txt"] for r in rows}) > 1
    assert SpeechDataset(str(output), require_transcript=True)[1]["transcript"] == tiny["texts"][0]


def test_speech_prompt_data_answers_a_seeded_sample_with_all_caps_transcripts_recased(tiny, tmp_path, capsys):
    recipe = load_script("examples/make_speech_prompt_data.py")
    rows = [json.loads(line) for line in Path(tiny["jsonl"]).read_text().splitlines()]
    shouting = tmp_path / "caps.jsonl"  # audio paths made absolute: the copy lives elsewhere
    shouting.write_text(
        "".join(
            json.dumps({**row, "wav": str(Path(tiny["jsonl"]).parent / row["wav"]), "txt": row["txt"].upper()}) + "\n"
            for row in rows
        )
    )
    output = tmp_path / "sample.jsonl"
    args = ["--llm", tiny["qwen2"], "--max_new_tokens", "2", "--sample", "2", "--seed", "3", "--recase_all_caps"]
    args += ["--batch_size", "1", str(shouting), str(output)]
    chosen = sorted(random.Random(3).sample(range(len(rows)), 2))  # in input order
    settings = {"input": str(shouting), "llm": tiny["qwen2"], "system_prompt": None, "max_new_tokens": 2}
    settings |= {"recase_all_caps": True, "instructions": [""]}
    killed = PartialResults(str(output), 0, settings)
    killed.add([{"key": rows[chosen[-1]]["key"], "txt": "kept"}])  # the last clip, answered before a kill
    with pytest.raises(SystemExit):  # other options: refused, not mixed in
        recipe.run_command_line(recipe.main, args + ["--max_new_tokens", "3"])
    assert "max_new_tokens: 2 there, 3 now" in capsys.readouterr().err
    answer, calls = recipe.llm_answers, []
    recipe.llm_answers = lambda *call: calls.append(call) or answer(*call)
    recipe.main(args)
    assert len(calls) == 1 and killed.files() == []  # only the clip not yet answered
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [w["key"] for w in written] == [rows[i]["key"] for i in chosen]
    assert written[0]["transcript"] == tiny["texts"][chosen[0]].capitalize() and written[-1]["txt"] == "kept"


def test_prepare_jsonl_matches_audio_to_transcripts(tmp_path):
    from tiny_models import write_tone

    (tmp_path / "wavs" / "sub").mkdir(parents=True)
    write_tone(str(tmp_path / "wavs" / "a.wav"), 0.5, 200)
    write_tone(str(tmp_path / "wavs" / "sub" / "b.flac"), 1.25, 300)
    (tmp_path / "text.tsv").write_text("a\thello there\nb general kenobi\nc no audio for this\n")
    output = tmp_path / "data" / "train.jsonl"
    load_script("examples/prepare_jsonl.py").main(
        ["--audio_dir", str(tmp_path / "wavs"), "--transcripts", str(tmp_path / "text.tsv"), str(output)]
    )
    examples = read_jsonl(str(output))
    assert [(e.key, e.txt, e.duration) for e in examples] == [("a", "hello there", 0.5), ("b", "general kenobi", 1.25)]
    assert examples[1].wav == str(tmp_path / "wavs" / "sub" / "b.flac")
