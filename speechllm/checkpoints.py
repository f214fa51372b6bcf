"""A run's checkpoints in its output folder: which are complete, and where a run on that folder starts.

The Trainer writes a checkpoint's files one after another and trainer_state.json last (SpeechLLMTrainer has every
process finish its own files first), so a checkpoint whose trainer_state.json reads back whole is complete. A run
killed in the middle of a save (or of deleting an old checkpoint) leaves one that is not: resuming must skip it.
"""

import json
import os
import re
import shutil

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import InputError
from .files import write_atomically
from .hub import WEIGHTS_NAME

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
RUN_OPTIONS_NAME = "run_options.json"  # the model, data and distillation options a checkpoint was trained with


def save_run_options(folder: str, options: dict):
    """Written with a checkpoint's weights (before trainer_state.json, which marks it complete), whole or not at all."""
    write_atomically(os.path.join(folder, RUN_OPTIONS_NAME), lambda path: _write_json(path, options))


def _write_json(path: str, value: dict):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, sort_keys=True)


def check_run_options(checkpoint: str, options: dict, way_on: str):
    """A checkpoint resumes only a run with the options it was trained with: resumed with another prompt or data, the
    Trainer would go on from (or, past its last step, simply save) the old run's weights under the new options."""
    try:
        with open(os.path.join(checkpoint, RUN_OPTIONS_NAME), encoding="utf-8") as file:
            saved = json.load(file)
    except FileNotFoundError:
        return  # saved before its options were recorded
    except ValueError:
        raise InputError(f"{checkpoint}: {RUN_OPTIONS_NAME} does not read back; {way_on}") from None
    options = json.loads(json.dumps(options))  # as it reads back from the file
    changed = [name for name in sorted(saved.keys() | options.keys()) if saved.get(name) != options.get(name)]
    if changed:
        differences = ", ".join(f"--{name} {saved.get(name)!r} there, {options.get(name)!r} now" for name in changed)
        raise InputError(f"{checkpoint}: trained with other options ({differences}); {way_on}")


def checkpoints(output_dir: str) -> list[str]:
    """The checkpoint folders in output_dir, lowest step first."""
    steps = {int(m.group(1)): name for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))}
    paths = [os.path.join(output_dir, steps[step]) for step in sorted(steps)]
    return [path for path in paths if os.path.isdir(path)]


def is_complete(checkpoint: str) -> bool:
    return _state_reads_back(checkpoint) and os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME))


def _state_reads_back(checkpoint: str) -> bool:
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as file:
            json.load(file)
    except (OSError, ValueError):  # missing, or cut short
        return False
    return True


def checkpoint_to_resume(
    output_dir: str,
    resume_from_checkpoint: str | None,
    overwrite_output_dir: bool,
    is_main_process: bool,
    options: dict | None = None,
) -> str | None:
    """The checkpoint asked for, else the newest complete one in output_dir, else None (start from step 0).

    The main process deletes the checkpoints whose save was cut short (no trainer_state.json to read: they would
    count against save_total_limit), and with overwrite_output_dir every checkpoint, so that a later resume cannot
    pick up the old run's. options: this run's (save_run_options); a checkpoint trained with others is an InputError.
    """
    if resume_from_checkpoint:
        if overwrite_output_dir:
            raise InputError("--resume_from_checkpoint and --overwrite_output_dir contradict each other")
        if not is_complete(resume_from_checkpoint):
            raise InputError(
                f"{resume_from_checkpoint}: not a complete checkpoint (no {WEIGHTS_NAME}, or no readable "
                f"{TRAINER_STATE_NAME}, which is written last: was its save interrupted?)"
            )
        if options is not None:
            way_on = "start a new run from its weights with --projector_model_path instead"
            check_run_options(resume_from_checkpoint, options, way_on)
        return resume_from_checkpoint
    if not os.path.isdir(output_dir):
        return None
    found = checkpoints(output_dir)
    complete = [checkpoint for checkpoint in found if is_complete(checkpoint)]
    if is_main_process:
        for checkpoint in found:
            if overwrite_output_dir or not _state_reads_back(checkpoint):
                shutil.rmtree(checkpoint)
    if not complete or overwrite_output_dir:
        return None
    if options is not None:
        way_on = "--overwrite_output_dir starts afresh (deleting its checkpoints), or give another --output_dir"
        check_run_options(complete[-1], options, way_on)
    return complete[-1]
