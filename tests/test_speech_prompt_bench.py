"""bench/speech_prompt.py and the ROUGE-L it reports."""

import pytest
import torch
from repo_scripts import load_script

from speechllm import AUDIO_PLACEHOLDER
from speechllm.data import load_example_audio, read_jsonl
from speechllm.llm import load_llm
from speechllm.metrics import rouge_l


def test_rouge_l_is_the_stemmed_longest_common_subsequence_f_measure():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["on the mat the cat sat"], ["the cat sat on the mat"]) == pytest.approx(3 / 6)  # order counts
    assert rouge_l(["Cats were sitting."], ["the cat sits"]) == pytest.approx(2 / 3)  # cat, sit
    assert rouge_l(["a b", "x"], ["a b", "y"]) == 0.5  # the mean over pairs
    with pytest.raises(ValueError, match="as many"):
        rouge_l(["a"], [])


def test_bench_scores_the_students_answers_against_the_teachers(make_model, tiny, tmp_path, capsys):
    model = make_model()
    model.save_pretrained(tmp_path / "model")
    bench = load_script("bench/speech_prompt.py")
    args = [str(tmp_path / "model"), tiny["jsonl"], "--limit", "3", "--batch_size", "2", "--max_new_tokens", "5"]
    results = bench.main(args + ["--show", "1"])
    printed = capsys.readouterr().out
    examples = read_jsonl(tiny["jsonl"])[:3]
    audios = [load_example_audio(e) for e in examples]
    recipe = load_script("examples/make_speech_prompt_data.py")
    llm, tokenizer = load_llm(tiny["qwen2"], torch.float32)
    assert list(results) == bench.PROMPTS
    for prompt, result in results.items():
        # The teacher answers the text as the data recipe's targets do.
        questions = [prompt.replace(AUDIO_PLACEHOLDER, e.txt) for e in examples]
        assert result["teacher"] == recipe.llm_answers(llm, tokenizer, questions, 5)
        # The loss is per answer token over all utterances (batches of 2 and 1 here), not a mean of batch means.
        batch = model.processor(audios, [prompt] * 3, result["teacher"])
        with torch.no_grad():
            assert result["loss"] == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        assert len(result["student"]) == 3
        assert result["rouge_l"] == pytest.approx(rouge_l(result["teacher"], result["student"]))
        assert f"{prompt!r}: 3 utterances  teacher-forced loss {result['loss']:.3f}" in printed


def test_bench_names_a_line_without_a_transcript(tiny, tmp_path):
    bench = load_script("bench/speech_prompt.py")
    data = tmp_path / "data.jsonl"
    wav = read_jsonl(tiny["jsonl"])[0].wav
    data.write_text(f'{{"wav": "{wav}", "transcript": "hello"}}\n{{"wav": "{wav}"}}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: no 'transcript'"):
        bench.main([str(tmp_path / "no_model"), str(data)])
