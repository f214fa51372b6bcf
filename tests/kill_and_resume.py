"""kill -9 a train.py run at random moments, run it again each time, and check it always ends with the weights of a
run that was never interrupted (tiny test models, a few seconds of training a run).

    python tests/kill_and_resume.py [--at time|io] [--trials 5] [--kills 3] [--seed 0]

Each trial starts train.py on a fresh output folder and kills it (SIGKILL) up to --kills times, starting it again
after each kill; the last start runs to the end. The run saves a checkpoint every step and keeps two, with
group_by_length, as the shipped recipe does. Where the kill falls:
  --at time: at a random moment of the training (wall clock), from the first checkpoint a start writes to its end.
  --at io:   just before a random one of the run's file operations in its output folder (a file opened for writing,
             a file or folder made or deleted): the process kills itself from an audit hook, so every kill lands
             inside a save of a checkpoint, of the final model, or in the deletion of an old checkpoint.
Prints a line a kill (what the output folder held then) and a line a trial, and exits non-zero unless every trial
ended with exactly the uninterrupted run's weights.
"""

import argparse
import atexit
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
from tiny_models import make_llm, make_whisper, write_jsonl, write_tone

from speechllm.checkpoints import checkpoints, is_complete

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # 6 epochs of 4 batches
# Audit events of file operations (see sys.addaudithook), and where in their arguments a dir_fd is.
FILE_EVENTS = {"open": None, "os.mkdir": 2, "os.remove": 1, "os.rmdir": 1, "os.rename": 2, "shutil.rmtree": 1}


def train_args(models: dict, data: str, output_dir: Path) -> list[str]:
    options = {
        "--whisper_model_name_or_path": models["whisper"],
        "--llm_model_name_or_path": models["llm"],
        "--model_dtype": "float32",
        "--projector_hidden_size": "32",
        "--data_path": data,
        "--output_dir": str(output_dir),
        "--per_device_train_batch_size": "2",
        "--train_sampling_strategy": "group_by_length",
        "--max_steps": str(STEPS),
        "--save_steps": "1",
        "--save_total_limit": "2",
        "--logging_steps": "1",
        "--use_cpu": "true",
        "--report_to": "none",
        "--seed": "0",
        "--dataloader_num_workers": "0",
        "--disable_tqdm": "true",
    }
    return [item for pair in options.items() for item in pair]


def child(kill_at: int, count_file: str, argv: list[str]):
    """train.py's main, killing itself just before its kill_at-th file operation in the output folder (0: never);
    writes how many it made to count_file when it ends."""
    output_dir = os.path.abspath(argv[argv.index("--output_dir") + 1]) + os.sep
    made = 0

    def hook(event, args):
        nonlocal made
        if event not in FILE_EVENTS or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if event == "open" and not _writes(*args[1:3]):
            return
        dir_fd = args[FILE_EVENTS[event]] if FILE_EVENTS[event] is not None else None
        # shutil.rmtree names what it deletes relative to a folder it holds open
        folder = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else ""
        if os.path.abspath(os.path.join(folder, os.fsdecode(args[0]))).startswith(output_dir):
            made += 1
            if made == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    atexit.register(lambda: Path(count_file).write_text(str(made)))
    sys.addaudithook(hook)
    from speechllm.training import command_line

    sys.argv = ["train.py", *argv]
    command_line()


def _writes(mode, flags) -> bool:
    if mode is not None:
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def start(args: list[str], output_dir: Path, kill_at: int = 0) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", str(kill_at), str(count_file(output_dir)), "--", *args]
    with open(output_dir.with_name(output_dir.name + ".stderr"), "a") as stderr:  # the child has its own copy
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def count_file(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + ".file_operations")


def check(process: subprocess.Popen, output_dir: Path):
    if process.returncode not in (0, -signal.SIGKILL):
        log = output_dir.with_name(output_dir.name + ".stderr").read_text()
        raise SystemExit(f"train.py exited {process.returncode} in {output_dir}:\n{log[-4000:]}")


def finish(args: list[str], output_dir: Path) -> float:
    """Run to the end; returns the seconds a step took (from the first checkpoint's save to the last one's)."""
    process, seen = start(args, output_dir), {}
    while process.poll() is None:
        for step in (1, STEPS):
            if step not in seen and (output_dir / f"checkpoint-{step}").exists():
                seen[step] = time.monotonic()
        time.sleep(0.002)
    check(process, output_dir)
    if process.returncode:
        raise SystemExit(f"{output_dir}: killed, not by this script")
    return (seen[STEPS] - seen[1]) / (STEPS - 1) if len(seen) == 2 else 0.0


def newest_step(output_dir: Path) -> int:
    found = checkpoints(str(output_dir)) if output_dir.is_dir() else []
    return max([int(Path(c).name.split("-")[1]) for c in found if is_complete(c)], default=0)


def state_of(output_dir: Path) -> str:
    if not output_dir.is_dir():
        return "no output folder yet"
    found = checkpoints(str(output_dir))
    names = [f"{Path(c).name}{'' if is_complete(c) else ' (INCOMPLETE)'}" for c in found]
    final = ["final model"] if (output_dir / "model.safetensors").exists() else []
    return ", ".join(names + final) or "empty"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--at", choices=["time", "io"], default="io")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kills", type=int, default=3, help="kills a trial, before the start that may finish")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_and_resume_"))
    models = {"whisper": make_whisper(str(root / "whisper.pt")), "llm": make_llm(str(root / "llm"))}
    texts = ["hello world", "one two three", "the quick brown fox", "she sells sea shells", "seven", "nine ten"]
    texts += ["transcribe the audio please", "hello world this is a tiny speech model"]
    rows = []
    for i, text in enumerate(texts):
        wav = write_tone(str(root / f"u{i}.wav"), 0.5 + 0.25 * i, 200 + 90 * i)
        rows.append({"key": f"u{i}", "wav": os.path.basename(wav), "txt": text})
    data = write_jsonl(str(root / "data.jsonl"), rows)

    reference_dir = root / "reference"
    step_seconds = finish(train_args(models, data, reference_dir), reference_dir)
    reference = safetensors.torch.load_file(reference_dir / "model.safetensors")
    operations = int(count_file(reference_dir).read_text())
    print(f"uninterrupted run: {step_seconds:.3f} s a step (with its save), {operations} file operations in its")
    print(f"output folder; kills --at {args.at}")

    failures = 0
    for trial in range(args.trials):
        output_dir = root / f"trial{trial}"
        run_args = train_args(models, data, output_dir)
        for kill in range(args.kills):
            if args.at == "io":  # a resumed start makes only the operations of the steps it has left
                where = rng.randint(1, max(1, operations * (STEPS - newest_step(output_dir)) // STEPS))
                process = start(run_args, output_dir, kill_at=where)
                process.wait()
            else:  # from this start's first checkpoint on (how long it takes to start up varies a lot)
                done = newest_step(output_dir)
                where = rng.uniform(0, (STEPS - done) * step_seconds)
                process = start(run_args, output_dir)
                while process.poll() is None and newest_step(output_dir) <= done:
                    time.sleep(0.002)
                try:
                    process.wait(timeout=where)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
            check(process, output_dir)
            if process.returncode == 0:
                print(f"  trial {trial} start {kill}: finished before the kill at {where:.4g}")
                break
            print(f"  trial {trial} kill {kill} at {where:.4g}: {state_of(output_dir)}")
        else:
            finish(run_args, output_dir)
        final = safetensors.torch.load_file(output_dir / "model.safetensors")
        exact = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
        failures += not exact
        print(
            f"trial {trial}: {'resumed to the exact weights' if exact else 'WEIGHTS DIFFER'} ({state_of(output_dir)})"
        )
    print(f"{args.trials - failures} of {args.trials} trials ended with the uninterrupted run's weights")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]), sys.argv[3], sys.argv[5:])
    else:
        main()
