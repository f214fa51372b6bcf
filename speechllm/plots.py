"""Training curves as a PNG: the training loss (raw and smoothed) and any evaluation loss against steps, from a run's
trainer_state.json, and WER against steps from an evaluation log, in a panel of its own.

    python -m speechllm.plots runs/tiny_en_smollm2 --output curves.png [--eval_log runs/eval/wer.jsonl]

The run is an output_dir (its newest checkpoint's trainer_state.json holds the whole history), a checkpoint folder
or a trainer_state.json. The evaluation log is a jsonl of {"step", "wer" (a fraction), "set"?} lines, e.g. one a
checkpoint and evaluation set; "eval_wer" entries in the trainer state are plotted too. Needs matplotlib
(pip install "speechllm[plots]").
"""

import argparse
import json
import os
from collections import defaultdict

from transformers.trainer_utils import get_last_checkpoint

from .errors import user_errors

STATE_NAME = "trainer_state.json"


def trainer_state_path(run: str) -> str:
    if os.path.isfile(run):
        return run
    if os.path.isfile(os.path.join(run, STATE_NAME)):
        return os.path.join(run, STATE_NAME)
    checkpoint = get_last_checkpoint(run) if os.path.isdir(run) else None
    if checkpoint is None:
        raise FileNotFoundError(f"{run}: no {STATE_NAME} here, nor a checkpoint-N folder holding one")
    return os.path.join(checkpoint, STATE_NAME)


def read_history(run: str) -> list[dict]:
    path = trainer_state_path(run)
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)["log_history"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: not a trainer state (no log_history)") from None


def series(history: list[dict], name: str) -> tuple[list[int], list[float]]:
    """Steps and values of the entries that log name."""
    points = [(entry["step"], entry[name]) for entry in history if name in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def smoothed(steps: list[int], values: list[float], window_steps: int) -> list[float]:
    """Each point the mean of the values logged in the window_steps steps up to it (as the README quotes loss)."""
    return [
        sum(window) / len(window)
        for step in steps
        for window in [[v for s, v in zip(steps, values) if step - window_steps < s <= step]]
    ]


def read_eval_log(path: str) -> dict[str, tuple[list[int], list[float]]]:
    """set name -> (steps, WERs) from a jsonl of {"step", "wer", "set"?} lines, in step order."""
    points = defaultdict(list)
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                points[str(row.get("set", "wer"))].append((int(row["step"]), float(row["wer"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise ValueError(f'{path}:{number}: expected {{"step": N, "wer": fraction, "set"?: name}}') from None
    return {name: ([s for s, _ in sorted(p)], [w for _, w in sorted(p)]) for name, p in points.items()}


def plot(history: list[dict], wer_sets: dict, title: str = "", smooth_steps: int = 50):
    """A matplotlib Figure: loss against steps, and below it WER (%) against steps where there is any."""
    pyplot = _pyplot()
    wer_sets = dict(wer_sets)
    steps, wers = series(history, "eval_wer")
    if steps:
        wer_sets.setdefault("eval_wer", (steps, wers))
    rows = 2 if wer_sets else 1
    figure, axes = pyplot.subplots(rows, 1, figsize=(8, 3.2 * rows), sharex=True, squeeze=False)
    loss_axes = axes[0][0]
    steps, losses = series(history, "loss")
    if not steps:
        raise ValueError("the trainer state logs no training loss (was --logging_steps larger than the run?)")
    loss_axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="training loss")
    loss_axes.plot(
        steps, smoothed(steps, losses, smooth_steps), color="tab:blue", label=f"mean of {smooth_steps} steps"
    )
    eval_steps, eval_losses = series(history, "eval_loss")
    if eval_steps:
        loss_axes.plot(eval_steps, eval_losses, "o-", color="tab:orange", label="evaluation loss")
    loss_axes.set_ylabel("loss (nats/token)")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    if wer_sets:
        wer_axes = axes[1][0]
        for name, (set_steps, set_wers) in wer_sets.items():
            wer_axes.plot(set_steps, [100 * w for w in set_wers], "o-", label=name)
        wer_axes.set_ylabel("WER (%)")
        wer_axes.legend()
        wer_axes.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError('plots need matplotlib: pip install "speechllm[plots]"') from None
    matplotlib.use("Agg")  # files only, no display needed
    from matplotlib import pyplot

    return pyplot


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="output_dir, checkpoint folder or trainer_state.json")
    parser.add_argument("--output", "-o", default=None, help="the PNG to write (default: RUN/training_curves.png)")
    parser.add_argument("--eval_log", default=None, help='jsonl of {"step", "wer", "set"?} lines')
    parser.add_argument("--title", default=None, help="default: the run's folder name")
    parser.add_argument("--smooth_steps", type=int, default=50, help="window of the smoothed loss, in steps")
    args = parser.parse_args(argv)
    with user_errors(OSError, ValueError, ModuleNotFoundError):
        history = read_history(args.run)
        wer_sets = read_eval_log(args.eval_log) if args.eval_log else {}
        folder = args.run if os.path.isdir(args.run) else os.path.dirname(os.path.abspath(args.run))
        title = os.path.basename(os.path.abspath(folder)) if args.title is None else args.title
        output = args.output or os.path.join(folder, "training_curves.png")
        figure = plot(history, wer_sets, title, args.smooth_steps)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        figure.savefig(output, dpi=120)
    print(output)
    return output


if __name__ == "__main__":
    main()
