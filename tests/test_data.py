import json

import numpy as np
import pytest
from tiny_models import write_tone

from speechllm.data import Collator, DataError, SpeechDataset, read_jsonl, sentence_case


@pytest.fixture
def folder(tmp_path):
    write_tone(str(tmp_path / "a.wav"), 1.0, 300)
    return tmp_path


def write(folder, *lines):
    path = folder / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_paths_keys_prompts_and_lengths(folder):
    absolute = str(folder / "a.wav")
    path = write(
        folder,
        '{"wav": "a.wav", "txt": "one"}',
        "",
        json.dumps({"wav": absolute, "txt": "two", "key": "k", "prompt": "Summarise: <speech>"}),
    )
    first, second = read_jsonl(path)
    assert (first.key, first.wav, first.prompt) == ("1", absolute, None)  # key defaults to the line number
    assert (second.key, second.wav, second.prompt) == ("k", absolute, "Summarise: <speech>")
    assert SpeechDataset(path).lengths == [1000, 1000]  # ms, from the file header when the jsonl gives no duration


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"wav": "a.wav", "txt": "x"', "not valid JSON"),
        ('["a.wav"]', "expected a JSON object"),
        ('{"txt": "x"}', "missing string field 'wav'"),
        ('{"wav": "a.wav"}', "missing string field 'txt'"),
        ('{"wav": "gone.wav", "txt": "x"}', "audio file not found: .*gone.wav"),
        ('{"wav": "a.wav", "txt": "x", "key": "1"}', "key '1' already used on line 1"),
        ('{"wav": "a.wav", "txt": "x", "prompt": "no placeholder"}', "a prompt must contain '<speech>' exactly once"),
        ('{"wav": "a.wav", "txt": "x", "prompt": "<speech> and <speech>"}', "a prompt must contain '<speech>' exactly"),
        ('{"wav": "a.wav", "txt": "x", "prompt": 3}', "'prompt' must be a string"),
        ('{"wav": "a.wav", "txt": "x", "duration": "long"}', "'duration' must be a number of seconds"),
        ('{"wav": "a.wav", "txt": "x", "duration": -1}', "'duration' must be a number of seconds"),
    ],
)
def test_bad_lines_name_file_and_line(folder, line, message):
    path = write(folder, '{"wav": "a.wav", "txt": "fine", "key": "1"}', line)
    with pytest.raises(DataError, match=f"data.jsonl:2: {message}"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"wav": "a.wav", "txt": 123}', "'txt' must be a string, not 123"),  # recognize.py: it would be scored
        ('{"wav": "a.wav", "transcript": ["x"]}', r"'transcript' must be a string, not \['x'\]"),
        ('{"wav": "a.wav", "duration": Infinity}', "'duration' must be a number of seconds, not inf"),
    ],
)
def test_optional_fields_must_still_be_what_they_say(folder, line, message):
    path = write(folder, '{"wav": "a.wav"}', line)
    with pytest.raises(DataError, match=f"data.jsonl:2: {message}$"):
        read_jsonl(path, require_text=False)


def test_a_line_that_is_not_utf8_is_named(folder):
    path = folder / "data.jsonl"
    path.write_bytes(b'{"wav": "a.wav", "txt": "fine"}\n{"wav": "a.wav", "txt": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8$"):
        read_jsonl(str(path))


def test_a_missing_jsonl_is_named(folder):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_jsonl(str(folder / "nope.jsonl"))


def test_text_is_optional_for_recognition(folder):
    path = write(folder, '{"wav": "a.wav"}')
    assert read_jsonl(path, require_text=False)[0].txt is None


def test_recase_all_caps_sentence_cases_only_all_caps_targets(folder):
    path = write(
        folder,
        '{"wav": "a.wav", "txt": "THE CAT\'S HAT, MR SMITH"}',
        '{"wav": "a.wav", "txt": "Keep an eye on NASA"}',
        '{"wav": "a.wav", "txt": "5766"}',
        '{"wav": "a.wav", "txt": "SPOKEN", "transcript": "SPOKEN WORDS"}',
    )
    recased = [e["txt"] for e in SpeechDataset(path, recase_all_caps=True)]
    assert recased == ["The cat's hat, mr smith", "Keep an eye on NASA", "5766", "Spoken"]
    assert SpeechDataset(path, recase_all_caps=True)[3]["transcript"] == "SPOKEN WORDS"  # what the teacher reads
    assert [e["txt"] for e in SpeechDataset(path)][0] == "THE CAT'S HAT, MR SMITH"  # off by default
    assert sentence_case("ÉTÉ À PARIS") == "Été à paris"


def test_corrupt_audio_names_file_and_line(folder):
    (folder / "bad.wav").write_bytes(b"not audio at all" * 10)
    dataset = SpeechDataset(write(folder, '{"wav": "a.wav", "txt": "ok"}', '{"wav": "bad.wav", "txt": "x"}'))
    assert dataset[0]["audio"].shape == (16000,)
    with pytest.raises(DataError, match=r"data.jsonl:2: .*bad.wav"):
        dataset[1]


def test_unreadable_audio_lengths_name_file_and_line(folder, monkeypatch):
    """Lengths for group_by_length come from the file headers; a format soundfile cannot read needs ffprobe."""
    (folder / "b.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    dataset = SpeechDataset(write(folder, '{"wav": "a.wav", "txt": "ok"}', '{"wav": "b.m4a", "txt": "x"}'))
    monkeypatch.setenv("PATH", str(folder))  # no ffmpeg, no ffprobe
    with pytest.raises(DataError, match=r"data.jsonl:2: .*b\.m4a: cannot decode .*install ffmpeg"):
        dataset.lengths


def test_collator_pads_to_the_batch_not_a_fixed_length(make_model, tiny):
    model = make_model()
    dataset = SpeechDataset(tiny["jsonl"])
    collate = Collator(model.processor)
    small, large = collate([dataset[0]]), collate([dataset[0], dataset[3]])
    assert small["input_ids"].shape[1] < large["input_ids"].shape[1]
    assert small["mel"].shape[-1] < large["mel"].shape[-1]
    np.testing.assert_array_equal(small["labels"][0], large["labels"][0, -small["labels"].shape[1] :])
