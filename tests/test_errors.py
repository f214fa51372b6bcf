import sys

import pytest
import torch

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


class Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DataError("data.jsonl:3: x.wav: cannot decode")


def test_an_input_error_in_a_dataloader_worker_is_still_one_line(capsys, monkeypatch):
    """torch re-raises a worker's exception with the worker's traceback written into its message."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit):
        run_command_line(lambda argv: list(torch.utils.data.DataLoader(Unreadable(), num_workers=1)))
    assert capsys.readouterr().err == "train.py: error: data.jsonl:3: x.wav: cannot decode\n"
