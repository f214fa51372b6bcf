import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build_hub_cache
from whisper.normalizers import EnglishTextNormalizer

from speechllm import SpeechLLM, SpeechLLMConfig
from speechllm.audio import SAMPLE_RATE, load_audio
from speechllm.data import read_jsonl
from speechllm.quantization import quantize_llm_int8
from speechllm.recognition import main as recognize_main
from speechllm.recognition import process_share
from speechllm.results import write_whole

REPO = Path(__file__).resolve().parents[1]
FAST = ["--num_beams", "1", "--max_new_tokens", "8"]


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


def command_line(*args, env=None, cwd=REPO):
    """recognize.py as a user runs it, in a process of its own."""
    command = [sys.executable, str(REPO / "recognize.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


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
    assert not list((tmp_path / "out").glob("hyp.txt.part*"))  # the saved-as-produced results are gone when done


def test_beam_search_and_cer(saved_model, tiny, tmp_path):
    _, model_dir = saved_model
    result_path = str(tmp_path / "hyp.txt")
    scores = recognize(
        model_dir, tiny["jsonl"], result_path, "--num_beams", "3", "--max_new_tokens", "6", "--metric", "cer"
    )
    assert "cer" in scores and len(read_results(result_path)) == len(tiny["texts"])


def test_audio_files_and_folders_to_stdout(saved_model, tiny, tmp_path, capsys):
    model, model_dir = saved_model
    folder = tmp_path / "clips"
    (folder / "more").mkdir(parents=True)
    shutil.copy(tiny["root"] / "utt0.wav", folder / "b.wav")
    shutil.copy(tiny["root"] / "utt1.wav", folder / "more" / "a.wav")
    (folder / "notes.txt").write_text("not audio")
    single = str(tiny["root"] / "utt2.wav")
    recognize_main(["--projector_model_path", model_dir, single, str(folder), *FAST])
    out = capsys.readouterr()
    keys = [single, str(folder / "b.wav"), str(folder / "more" / "a.wav")]  # files as given, then the folder's, sorted
    texts = model.transcribe(keys, max_new_tokens=8)
    assert out.out.splitlines() == [f"{key}\t{' '.join(text.split())}" for key, text in zip(keys, texts)]
    assert "recognize" in out.err  # the progress bar is on stderr, out of the pipe's way

    recognize_main(["--projector_model_path", model_dir, single, *FAST])
    assert capsys.readouterr().out == model.transcribe(single, max_new_tokens=8) + "\n"  # one file: the text alone


def test_tsv_and_jsonl_results_carry_duration_and_decoding_time(saved_model, tiny, tmp_path):
    model, model_dir = saved_model
    examples = read_jsonl(tiny["jsonl"])
    details = model.transcribe([e.wav for e in examples], max_new_tokens=8, return_details=True)
    texts = [" ".join(d.text.split()) for d in details]
    durations = [len(load_audio(e.wav)) / SAMPLE_RATE for e in examples]
    finished = [d.finished for d in details]
    assert not all(finished)  # a hypothesis that ran to max_new_tokens is flagged as such

    recognize(model_dir, tiny["jsonl"], tmp_path / "hyp.tsv", *FAST)
    header, *rows = read_results(tmp_path / "hyp.tsv")
    assert header == ["key", "text", "duration", "decoding_seconds", "finished"]
    assert [(k, t, float(d), f == "True") for k, t, d, _, f in rows] == list(
        zip([e.key for e in examples], texts, durations, finished)
    )
    assert all(float(seconds) > 0 for _, _, _, seconds, _ in rows)

    recognize(model_dir, tiny["jsonl"], tmp_path / "hyp.jsonl", *FAST)
    rows = [json.loads(line) for line in open(tmp_path / "hyp.jsonl")]
    assert [(r["key"], r["wav"], r["text"], r["reference"], r["duration"], r["finished"]) for r in rows] == [
        (e.key, e.wav, t, e.txt, d, f) for e, t, d, f in zip(examples, texts, durations, finished)
    ]
    assert all(r["decoding_seconds"] > 0 for r in rows)


def test_results_are_kept_as_produced_and_a_rerun_decodes_only_the_rest(saved_model, tiny, tmp_path, monkeypatch):
    _, model_dir = saved_model
    bad_wav = Path(tiny["root"]) / "corrupt_for_rerun.wav"
    bad_wav.write_bytes(b"RIFF not really a wav file")  # the shortest by size: decoded last
    data = Path(tiny["root"]) / "with_corrupt.jsonl"
    data.write_text(open(tiny["jsonl"]).read() + json.dumps({"key": "late", "wav": bad_wav.name}) + "\n")
    result_path = tmp_path / "hyp.txt"
    decoded = []
    decode_batch = SpeechLLM.decode_batch
    monkeypatch.setattr(
        SpeechLLM,
        "decode_batch",
        lambda self, audios, *a, **k: decoded.append(len(audios)) or decode_batch(self, audios, *a, **k),
    )

    with pytest.raises(SystemExit) as exit_info:
        recognize(model_dir, data, result_path, *FAST, "--batch_size", "2")
    assert exit_info.value.code == 1 and decoded == [2, 2]
    assert not result_path.exists()
    saved = [json.loads(line) for line in open(f"{result_path}.part0")][1:]  # after the settings line
    assert sorted(row["key"] for row in saved) == [e.key for e in read_jsonl(tiny["jsonl"])]

    with pytest.raises(SystemExit):  # other decoding settings: the saved results are not mixed in
        recognize(model_dir, data, result_path, "--num_beams", "2", "--max_new_tokens", "8")

    shutil.copy(Path(tiny["root"]) / "utt0.wav", bad_wav)  # the user fixes the file and runs it again
    decoded.clear()
    recognize(model_dir + "/", data, result_path, *FAST, "--batch_size", "2")  # the model's path spelt otherwise
    assert decoded == [1]  # only the clip that failed
    assert not list(tmp_path.glob("hyp.txt.part*"))
    recognize(model_dir, data, tmp_path / "fresh.txt", *FAST, "--batch_size", "2")
    assert read_results(result_path) == read_results(tmp_path / "fresh.txt")


def test_int8_llm(saved_model, tiny, tmp_path):
    model, model_dir = saved_model
    result_path = str(tmp_path / "hyp.txt")
    # Only the decoding steps go int8: on the tiny model they change the text only after a few tokens.
    recognize(model_dir, tiny["jsonl"], result_path, "--num_beams", "1", "--max_new_tokens", "24", "--llm_int8", "true")
    wavs = [e.wav for e in read_jsonl(tiny["jsonl"])]
    fp32 = model.transcribe(wavs, max_new_tokens=24)
    quantize_llm_int8(model.llm)
    expected = model.transcribe(wavs, max_new_tokens=24)
    assert expected != fp32  # so the file shows which LLM wrote it
    assert [hyp for _, hyp in read_results(result_path)] == [" ".join(t.split()) for t in expected]


def test_user_errors_are_one_line_without_traceback(saved_model, tiny, tmp_path, capsys):
    _, model_dir = saved_model
    result_path = tmp_path / "hyp.txt"
    result_path.write_text("earlier results\n")
    bad = Path(tiny["root"]) / "bad.jsonl"  # beside the audio its lines name
    bad.write_text(open(tiny["jsonl"]).read() + '{"wav": "missing.wav"}\n')
    with pytest.raises(SystemExit) as exit_info:
        recognize(model_dir, bad, result_path)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{os.path.basename(sys.argv[0])}: error: {bad}:5: audio file not found: {bad.parent}/missing.wav"
    ]
    assert result_path.read_text() == "earlier results\n"  # nothing already written is lost

    run = command_line("--projector_model_path", tmp_path / "no_model", tiny["root"] / "utt0.wav")
    assert (run.returncode, run.stdout) == (1, "")
    assert (
        run.stderr.strip().splitlines()[-1] == f"recognize.py: error: {tmp_path / 'no_model'}: no such folder or file"
    )
    assert "Traceback" not in run.stderr


def test_a_hub_id_from_the_offline_cache_on_the_command_line(saved_model, tiny, tmp_path):
    model, model_dir = saved_model
    cache = build_hub_cache(tmp_path / "hub", "someone/tiny-speechllm", model_dir)
    clip = tiny["root"] / "utt3.wav"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    run = command_line("--projector_model_path", "someone/tiny-speechllm", clip, *FAST, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == model.transcribe(str(clip), max_new_tokens=8) + "\n"  # stdout holds the text alone


def test_processes_get_clips_of_every_length_in_turn():
    seconds = [3.0, 29.0, 1.0, 12.0, 30.0, 2.0, 7.0, 5.0, 8.0]
    shares = [process_share(seconds, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(len(seconds)))
    assert [seconds[i] for i in shares[0]] == sorted((seconds[i] for i in shares[0]), reverse=True)
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    totals = [sum(seconds[i] for i in share) for share in shares]
    assert abs(totals[0] - totals[1]) <= max(seconds)  # a contiguous split: 86 s against 10 s


def test_two_processes_split_the_work_and_merge_in_order(saved_model, tiny, tmp_path):
    _, model_dir = saved_model

    # recognize.py, then where each process stood: on a CPU, accelerate's default made every rank the main one,
    # each decoding every clip and writing the whole result (racing to rename it). And whether recognize.py ended
    # its process group: left to the interpreter's exit, gloo's threads could abort a process whose work was done.
    script = tmp_path / "recognize_and_report.py"
    script.write_text(
        "import sys\nimport torch.distributed\nfrom speechllm.recognition import main, process_state\n"
        "main(sys.argv[1:])\nstate, ended = process_state(), not torch.distributed.is_initialized()\n"
        "sys.stdout.write(f'process {state.process_index} of {state.num_processes}, process group ended: {ended}\\n')\n"
    )

    def torchrun(processes, result_path):
        # Both runs launched alike, one thread a process, so a near-tie of the random model cannot tip differently.
        args = ["--projector_model_path", model_dir, "--data_path", tiny["jsonl"], "--result_path", result_path]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        # 8 tokens: past them the random model meets a near-tie that batching 2+2 instead of 4 could tip
        command = [str(part) for part in command + [script] + args + ["--num_beams", "1", "--max_new_tokens", "8"]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        # One write a line, newline included (print writes the newline apart, and CI once saw the other process's
        # line land between the two); the pattern stops at the flag in case a line still splits
        reports = sorted(re.findall(r"process \d+ of \d+, process group ended: (?:True|False)", run.stdout))
        assert reports == [f"process {i} of {processes}, process group ended: True" for i in range(processes)], (
            run.stdout
        )
        return read_results(result_path)

    two = torchrun(2, tmp_path / "two.txt")
    assert two == torchrun(1, tmp_path / "single.txt")
    assert [key for key, _ in two] == [e.key for e in read_jsonl(tiny["jsonl"])]
    assert not list(tmp_path.glob("two.txt.part*"))


def test_loop_guards_pass_from_the_command_line_to_decoding(saved_model, tiny, tmp_path, monkeypatch):
    _, model_dir = saved_model
    seen, original = [], SpeechLLM.decode_batch

    def spy(self, *args, **options):
        seen.append({name: options.get(name) for name in ("no_repeat_ngram_size", "repetition_penalty")})
        return original(self, *args, **options)

    monkeypatch.setattr(SpeechLLM, "decode_batch", spy)
    guards = ["--no_repeat_ngram_size", "3", "--repetition_penalty", "1.2"]
    recognize(model_dir, tiny["jsonl"], tmp_path / "guarded.txt", *FAST, *guards)
    assert seen and all(s == {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2} for s in seen), seen
    seen.clear()
    recognize(model_dir, tiny["jsonl"], tmp_path / "plain.txt", *FAST)  # unset: the model's generation_config
    assert seen and all(s == {"no_repeat_ngram_size": None, "repetition_penalty": None} for s in seen), seen


def interrupted_run(model_dir, tiny, tmp_path, lines, result_path, corrupt_line):
    """An unkeyed jsonl of these clips (utt<i>), one of them corrupt, decoded one clip a batch: the run stops at the
    corrupt clip (the shortest by size, so the last decoded) with the others' rows saved."""
    bad_wav = tmp_path / "corrupt.wav"
    bad_wav.write_bytes(b"RIFF not really a wav file")
    wavs = [str(tiny["root"] / f"utt{i}.wav") for i in lines]
    wavs[corrupt_line] = str(bad_wav)
    data = tmp_path / "unkeyed.jsonl"
    data.write_text("".join(json.dumps({"wav": wav}) + "\n" for wav in wavs))
    with pytest.raises(SystemExit):
        recognize(model_dir, data, result_path, *FAST, "--batch_size", "1")
    assert len(open(f"{result_path}.part0").readlines()) == 1 + len(lines) - 1  # settings, then the good clips
    return data


def test_a_rerun_after_a_line_is_removed_reuses_rows_by_content_not_line_number(saved_model, tiny, tmp_path):
    model, model_dir = saved_model
    result_path = tmp_path / "hyp.txt"
    data = interrupted_run(model_dir, tiny, tmp_path, [0, 1, 2, 3], result_path, corrupt_line=1)
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:1] + lines[2:]))  # the user drops the corrupt line: utt2 is now line 2

    run = command_line("--projector_model_path", model_dir, "--data_path", data, "--result_path", result_path, *FAST)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = model.transcribe([str(tiny["root"] / f"utt{i}.wav") for i in (0, 2, 3)], max_new_tokens=8)
    assert len(set(expected)) == 3  # distinct clips, distinct texts: a row under the wrong key would show
    assert read_results(result_path) == [[str(n), " ".join(t.split())] for n, t in enumerate(expected, 1)]


def test_a_line_changed_in_place_is_decoded_again(saved_model, tiny, tmp_path):
    model, model_dir = saved_model
    result_path = tmp_path / "hyp.txt"
    data = interrupted_run(model_dir, tiny, tmp_path, [0, 1, 2], result_path, corrupt_line=2)
    lines = data.read_text().splitlines(keepends=True)
    swapped = json.dumps({"wav": str(tiny["root"] / "utt3.wav")}) + "\n"
    data.write_text("".join([swapped, lines[1], swapped.replace("utt3", "utt2")]))  # line 1 now another clip
    recognize(model_dir, data, result_path, *FAST)
    expected = model.transcribe([str(tiny["root"] / f"utt{i}.wav") for i in (3, 1, 2)], max_new_tokens=8)
    assert [text for _, text in read_results(result_path)] == [" ".join(t.split()) for t in expected]


def test_saved_rows_of_another_input_are_neither_mixed_in_nor_deleted(saved_model, tiny, tmp_path, capsys):
    _, model_dir = saved_model
    result_path = tmp_path / "hyp.txt"
    interrupted_run(model_dir, tiny, tmp_path, [0, 1, 2, 3], result_path, corrupt_line=1)
    saved = open(f"{result_path}.part0").read()
    other = tmp_path / "other" / "unkeyed.jsonl"  # another clip under line-number key 1, saved for the first file
    other.parent.mkdir()
    other.write_text(json.dumps({"wav": str(tiny["root"] / "utt1.wav")}) + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        recognize(model_dir, other, result_path, *FAST)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "saved results of another input" in error[0]
    assert f"from {tmp_path / 'unkeyed.jsonl'}" in error[0]
    assert open(f"{result_path}.part0").read() == saved and not result_path.exists()


def test_results_of_retrained_weights_at_the_same_path_are_not_reused(saved_model, make_model, tiny, tmp_path, capsys):
    _, model_dir = saved_model
    result_path = tmp_path / "hyp.txt"
    data = interrupted_run(model_dir, tiny, tmp_path, [0, 1, 2, 3], result_path, corrupt_line=1)
    saved = open(f"{result_path}.part0").read()
    retrained = make_model()
    torch.nn.init.normal_(retrained.projector.linear2.weight, std=0.7)
    retrained.save_pretrained(model_dir)  # same folder, same config, other weights
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:1] + lines[2:]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        recognize(model_dir, data, result_path, *FAST)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "other settings (model: " in error[0]
    assert open(f"{result_path}.part0").read() == saved


@pytest.fixture
def no_model_loads(monkeypatch):
    """The checks under test come before the frozen models are built: building one fails the test."""

    def load(*args, **kwargs):
        raise AssertionError("a frozen model was loaded before the error was found")

    monkeypatch.setattr("speechllm.model.load_whisper_encoder", load)


@pytest.fixture(scope="module")
def error_correction_model(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("ger") / "model"
    torch.manual_seed(0)
    SpeechLLM(
        SpeechLLMConfig(
            whisper_model_name_or_path=tiny["whisper"],
            llm_model_name_or_path=tiny["qwen2"],
            projector_hidden_size=32,
            model_dtype="float32",
            nbest=2,
        )
    ).save_pretrained(folder)
    return str(folder)


def one_error_line(capsys, run) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "model, options, line_prompt, message",
    [
        ("plain", ["--prompt", "Transcribe."], None, "--prompt: a prompt must contain '<speech>' exactly once"),
        ("plain", ["--prompt", "<speech><speech>"], None, "--prompt: a prompt must contain '<speech>' exactly once"),
        ("plain", ["--prompt", "<nbest>\n<speech>"], None, "--prompt: '<nbest>' in a prompt for a model without"),
        ("plain", [], "Hypotheses: <nbest> <speech>", r"line\.jsonl:1: '<nbest>' in a prompt for a model without"),
        ("ger", ["--prompt", "<speech>Fix it."], None, "--prompt: an error correction prompt must contain '<nbest>'"),
        ("ger", [], "<speech>Fix it.", r"line\.jsonl:1: an error correction prompt must contain '<nbest>'"),
        (
            "ger",
            ["--ger_decoding", "rescore", "--second_whisper_model_name_or_path", "base", "--prompt", "<speech>"],
            "Hypotheses: <nbest> <speech>",
            r"line\.jsonl:1: a second Whisper doubles the n-best, which a prompt that lists it was not trained on$",
        ),
        ("plain", ["--batch_size", "0"], None, "--batch_size must be at least 1, not 0"),
        ("plain", ["--nbest", "-1"], None, r"--nbest must be 0 \(plain recognition\) or the number of hyp.*, not -1$"),
        ("plain", ["--repetition_penalty", "0"], None, r"--repetition_penalty must be above 0 \(1: none\), not 0.0$"),
        (
            "plain",
            ["--no_repeat_ngram_size", "-1"],
            None,
            r"--no_repeat_ngram_size must be 0 \(none\) or more, not -1$",
        ),
        ("plain", ["--num_beams", "0"], None, "--num_beams must be at least 1, not 0"),
        ("plain", ["--max_new_tokens", "-1"], None, "--max_new_tokens must be at least 1, not -1"),
    ],
)
def test_prompts_and_options_that_cannot_work_are_one_line_before_the_models_load(
    saved_model, error_correction_model, tiny, tmp_path, capsys, no_model_loads, model, options, line_prompt, message
):
    model_dir = saved_model[1] if model == "plain" else error_correction_model
    data = tmp_path / "line.jsonl"
    line = {"wav": str(tiny["root"] / "utt0.wav")} | ({"prompt": line_prompt} if line_prompt else {})
    data.write_text(json.dumps(line) + "\n")
    error = one_error_line(capsys, lambda: recognize(model_dir, data, tmp_path / "hyp.txt", *options))
    assert re.search(message, error), error
    assert not list(tmp_path.glob("hyp.txt*"))


def test_a_result_path_that_is_a_folder_is_refused_before_decoding(saved_model, tiny, tmp_path, capsys, no_model_loads):
    (tmp_path / "out").mkdir()
    error = one_error_line(capsys, lambda: recognize(saved_model[1], tiny["jsonl"], tmp_path / "out"))
    assert error.endswith(f"error: --result_path {tmp_path / 'out'}: a folder; give the file to write the results to")
    new_folder = (
        f"{tmp_path / 'new'}/"  # not there yet: it was made, decoded into, and the results could not be written
    )
    error = one_error_line(capsys, lambda: recognize(saved_model[1], tiny["jsonl"], new_folder))
    assert error.endswith(f"error: --result_path {new_folder}: a folder; give the file to write the results to")
    under_a_file = tmp_path / "hyp.txt" / "out.txt"  # a traceback after the decoding, before
    (tmp_path / "hyp.txt").write_text("kept\n")
    error = one_error_line(capsys, lambda: recognize(saved_model[1], tiny["jsonl"], under_a_file))
    assert error.endswith(f"error: --result_path {under_a_file}: a file stands where its folder would be")
    assert sorted(os.listdir(tmp_path)) == ["hyp.txt", "model", "out"]
    assert (tmp_path / "hyp.txt").read_text() == "kept\n"


def test_a_jsonl_by_another_name_is_read_as_jsonl(saved_model, tiny, tmp_path):
    """WeST's data.list, or data.JSONL: a file whose first character is "{" holds jsonl lines, not audio."""
    listed = Path(tiny["root"]) / "data.list"
    shutil.copy(tiny["jsonl"], listed)
    recognize(saved_model[1], listed, tmp_path / "listed.txt", *FAST)
    recognize(saved_model[1], tiny["jsonl"], tmp_path / "jsonl.txt", *FAST)
    assert read_results(tmp_path / "listed.txt") == read_results(tmp_path / "jsonl.txt")


def test_projector_paths_that_hold_no_saved_model_are_one_line_before_the_models_load(
    saved_model, tiny, tmp_path, capsys, no_model_loads, monkeypatch
):
    _, model_dir = saved_model
    clip = str(tiny["root"] / "utt0.wav")
    torn = tmp_path / "torn"
    shutil.copytree(model_dir, torn)
    weights = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    empty = tmp_path / "no_weights"
    shutil.copytree(model_dir, empty)
    (empty / "model.safetensors").unlink()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    cases = {
        tiny["qwen2"]: f"{tiny['qwen2']}: a 'qwen2' model, not a saved SpeechLLM",
        str(torn): f"{torn}/model.safetensors: not a whole safetensors file",
        str(empty): f"{empty}/model.safetensors: no trained weights here$",
        "runs/my_modle": "error: runs/my_modle: no such folder or file$",  # misspelt: not looked up on the hub
    }
    for path, message in cases.items():
        for result in ([], ["--result_path", str(tmp_path / "hyp.txt")]):
            error = one_error_line(capsys, lambda: recognize_main(["--projector_model_path", path, clip, *result]))
            assert re.search(message, error), error


def test_a_result_file_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "hyp.txt"
    write_whole(str(path), ["utt0\thello"])
    with pytest.raises(TypeError):
        write_whole(str(path), ["utt0\tnew", None])  # fails with part of the lines written
    assert path.read_text() == "utt0\thello\n"
    assert os.listdir(tmp_path) == ["hyp.txt"]  # and leaves no temporary file behind
