"""The small real models that PyPI packages ship: SmolLM2-135M-Instruct (GGUF) and the shipped projector on it."""

import importlib.util
from pathlib import Path

import pytest
import torch

from speechllm.data import read_jsonl
from speechllm.model import load_llm, stop_token_ids
from speechllm.packaged_models import smollm2_gguf

SMOLLM2_GGUF = smollm2_gguf()  # installed by the README's install command: these tests run in CI
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The shipped projector reads the audio but loops on these clips (README: 202.7%, mostly insertions): this
# guards the pipeline and that figure, and must come down as the projector is trained further.
SHIPPED_PROJECTOR_MAX_WER = 0.45  # measured 37.84% (beam 4): a regression guard, not a target


@pytest.fixture(scope="module")
def smollm2():
    return load_llm(SMOLLM2_GGUF, torch.float32)


def test_gguf_llm_answers_a_simple_chat_prompt(smollm2):
    llm, tokenizer = smollm2
    assert llm.config.hidden_size == 576 and tokenizer.chat_template
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    stops = stop_token_ids(tokenizer, llm.generation_config)
    output = llm.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=stops)
    new = output[0, inputs["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)
    assert new[-1].item() in stops  # it stops on its own end-of-turn token


def test_bad_gguf_path_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.gguf"):
        load_llm(str(tmp_path / "missing.gguf"), torch.float32)


def test_the_offline_demo_transcribes_the_example_speech(tmp_path, monkeypatch, capsys):
    """The README's main job: the shipped projector on models from PyPI packages, no network."""
    monkeypatch.setenv("RESULT_PATH", str(tmp_path / "hypotheses.txt"))
    monkeypatch.setattr("sys.argv", ["demo.py"])
    spec = importlib.util.spec_from_file_location("demo", EXAMPLES / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.main()
    rows = [line.split("\t") for line in (tmp_path / "hypotheses.txt").read_text().splitlines()]
    assert [row[0] for row in rows] == [e.key for e in read_jsonl(str(EXAMPLES / "audio" / "data.jsonl"))]
    assert all(len(row) == 2 and len(row[1].split()) >= 3 for row in rows), rows  # no empty or cut answers
    wer = float((tmp_path / "hypotheses.txt.wer").read_text().split()[1].rstrip("%")) / 100
    assert wer < SHIPPED_PROJECTOR_MAX_WER
    assert "WER" in capsys.readouterr().out
