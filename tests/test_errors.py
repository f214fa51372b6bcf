import sys

import pytest

from speechllm.data import DataError
from speechllm.errors import run_command_line


def test_input_errors_end_in_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/tool.py"])

    def bad_input(argv):
        raise DataError("data.jsonl:3: audio file not found: x.wav")

    with pytest.raises(SystemExit) as exited:
        run_command_line(bad_input)
    assert exited.value.code == 1
    assert capsys.readouterr().err == "tool.py: error: data.jsonl:3: audio file not found: x.wav\n"

    def bug(argv):
        raise ValueError("not the user's doing")

    with pytest.raises(ValueError, match="not the user's doing"):  # propagates: Python prints its traceback
        run_command_line(bug)
    assert run_command_line(lambda argv: argv, ["--x"]) == ["--x"]
