import json
from pathlib import Path

import pytest

from speechllm.checkpoints import checkpoint_to_resume, checkpoints
from speechllm.errors import InputError

LAYOUT = {2: "complete", 4: "no weights", 6: "state cut short", 8: "no state", 10: "complete"}


def make_checkpoints(root):
    for step, kind in LAYOUT.items():
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        state = json.dumps({"global_step": step})
        if kind != "no state":
            (folder / "trainer_state.json").write_text(state[:5] if kind == "state cut short" else state)
        if kind != "no weights":
            (folder / "model.safetensors").write_bytes(b"weights")
    (root / "checkpoint-12").write_text("a file, not a checkpoint")
    return root


def names(root):
    return [Path(path).name for path in checkpoints(str(root))]


def test_resume_takes_the_newest_complete_checkpoint_and_deletes_cut_short_saves(tmp_path):
    root = make_checkpoints(tmp_path / "run")
    (root / "checkpoint-10" / "trainer_state.json").unlink()  # now only checkpoint-2 is complete
    assert names(root) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", "checkpoint-10"]
    assert checkpoint_to_resume(str(root), None, False, is_main_process=False) == str(root / "checkpoint-2")
    assert len(names(root)) == 5  # only the main process deletes
    assert checkpoint_to_resume(str(root), None, False, is_main_process=True) == str(root / "checkpoint-2")
    assert names(root) == ["checkpoint-2", "checkpoint-4"]  # -4 has its state: not a save cut short, kept
    assert (root / "checkpoint-12").is_file()


def test_steps_sort_as_numbers(tmp_path):
    root = make_checkpoints(tmp_path / "run")
    assert checkpoint_to_resume(str(root), None, False, is_main_process=True) == str(root / "checkpoint-10")


def test_overwrite_deletes_every_checkpoint(tmp_path):
    root = make_checkpoints(tmp_path / "run")
    assert checkpoint_to_resume(str(root), None, True, is_main_process=True) is None
    assert names(root) == [] and (root / "checkpoint-12").is_file()
    assert checkpoint_to_resume(str(tmp_path / "new"), None, False, is_main_process=True) is None


def test_a_checkpoint_asked_for_must_be_complete(tmp_path):
    root = make_checkpoints(tmp_path / "run")
    assert checkpoint_to_resume(str(root / "checkpoint-2"), str(root / "checkpoint-2"), False, True)
    for step in (4, 6, 8):
        with pytest.raises(InputError, match=f"checkpoint-{step}: not a complete checkpoint"):
            checkpoint_to_resume(str(root), str(root / f"checkpoint-{step}"), False, True)
