import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from whisper.normalizers import EnglishTextNormalizer

from speechllm.data import read_jsonl
from speechllm.recognition import main as recognize_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved_model(make_model, tmp_path):
    model = make_model()
    torch.nn.init.normal_(model.projector.linear2.weight, std=0.5)  # distinct clips, distinct outputs
    model.save_pretrained(tmp_path / "model")
    return model, str(tmp_path / "model")


def recognize(model_dir, data_path, result_path, *options):
    args = ["--projector_model_path", model_dir, "--data_path", str(data_path), "--result_path", str(result_path)]
    return recognize_main(args + list(options))


def read_results(path):
    return [line.rstrip("\n").split("\t") for line in open(path)]


def test_writes_keyed_hypotheses_in_input_order_and_wer(saved_model, tiny, tmp_path, capsys):
    model, model_dir = saved_model
    result_path = str(tmp_path / "out" / "hyp.txt")
    options = ["--num_beams", "1", "--batch_size", "3", "--max_new_tokens", "8"]
    scores = recognize(model_dir, tiny["jsonl"], result_path, *options)
    examples = read_jsonl(tiny["jsonl"])
    rows = read_results(result_path)
    assert [key for key, _ in rows] == [e.key for e in examples]  # input order, though decoded longest first
    expected = model.transcribe([e.wav for e in examples], max_new_tokens=8)
    assert [hyp for _, hyp in rows] == [" ".join(t.split()) for t in expected]
    normalize = EnglishTextNormalizer()
    assert 0 < scores["wer"] and scores["reference_units"] == sum(len(normalize(t).split()) for t in tiny["texts"])
    printed = capsys.readouterr().out
    assert "WER" in printed and open(result_path + ".wer").read().strip() in printed


def test_beam_search_and_cer(saved_model, tiny, tmp_path):
    _, model_dir = saved_model
    result_path = str(tmp_path / "hyp.txt")
    scores = recognize(
        model_dir, tiny["jsonl"], result_path, "--num_beams", "3", "--max_new_tokens", "6", "--metric", "cer"
    )
    assert "cer" in scores and len(read_results(result_path)) == len(tiny["texts"])


def test_a_bad_line_fails_before_anything_is_overwritten(saved_model, tiny, tmp_path):
    _, model_dir = saved_model
    result_path = tmp_path / "hyp.txt"
    result_path.write_text("earlier results\n")
    bad = Path(tiny["jsonl"]).parent / "bad.jsonl"  # beside the audio its lines name
    bad.write_text(open(tiny["jsonl"]).read() + '{"wav": "missing.wav"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:5: audio file not found"):
        recognize(model_dir, bad, result_path)
    assert result_path.read_text() == "earlier results\n"


def test_two_processes_split_the_work_and_merge_in_order(saved_model, tiny, tmp_path):
    _, model_dir = saved_model

    def torchrun(processes, result_path):
        # Both runs launched alike, one thread a process, so a near-tie of the random model cannot tip differently.
        args = ["--projector_model_path", model_dir, "--data_path", tiny["jsonl"], "--result_path", result_path]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [str(part) for part in command + [REPO / "recognize.py"] + args + ["--num_beams", "1"]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return read_results(result_path)

    two = torchrun(2, tmp_path / "two.txt")
    assert two == torchrun(1, tmp_path / "single.txt")
    assert [key for key, _ in two] == [e.key for e in read_jsonl(tiny["jsonl"])]
