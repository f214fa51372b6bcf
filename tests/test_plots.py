import json
import os
import sys

import pytest
from matplotlib import image

from speechllm.plots import main, plot, read_eval_log, read_history, smoothed

PROG = os.path.basename(sys.argv[0])  # how a command line names itself in its error lines


def write_run(root):
    """A run folder as the Trainer leaves it: the newest checkpoint's state holds the whole history."""
    history = [{"step": s, "loss": 5.0 - s / 100, "learning_rate": 5e-4} for s in range(10, 210, 10)]
    history += [{"step": 100, "eval_loss": 4.2}, {"step": 200, "eval_loss": 3.1}]
    for step, entries in [(100, history[:10]), (200, history)]:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": entries}))
    return history


def test_curves_come_from_the_newest_checkpoint_and_the_evaluation_log(tmp_path):
    run = tmp_path / "run"
    history = write_run(run)
    assert read_history(str(run)) == history
    log = tmp_path / "wer.jsonl"
    log.write_text(
        "\n".join(
            json.dumps(r) for r in [{"step": 200, "wer": 0.5, "set": "dev"}, {"step": 100, "wer": 0.9, "set": "dev"}]
        )
    )
    assert read_eval_log(str(log)) == {"dev": ([100, 200], [0.9, 0.5])}

    figure = plot(history, read_eval_log(str(log)), smooth_steps=30)
    loss_axes, wer_axes = figure.axes
    raw, mean, evaluation = loss_axes.lines
    assert list(raw.get_xdata()) == list(range(10, 210, 10)) and raw.get_ydata()[0] == pytest.approx(4.9)
    assert mean.get_ydata()[2] == pytest.approx((4.9 + 4.8 + 4.7) / 3)  # steps 10, 20, 30 are within 30 of 30
    assert list(evaluation.get_xydata().tolist()) == [[100, 4.2], [200, 3.1]]
    assert wer_axes.lines[0].get_xydata().tolist() == [[100, 90.0], [200, 50.0]]  # in percent

    output = tmp_path / "curves.png"
    assert main([str(run), "--eval_log", str(log), "--output", str(output)]) == str(output)
    height, width, _ = image.imread(output).shape
    assert (width, height) == (960, 768)  # two panels at 8 x 6.4 inches, 120 dpi


def test_smoothing_is_a_trailing_mean_over_steps():
    assert smoothed([10, 20, 30, 40], [4.0, 2.0, 6.0, 0.0], 20) == [4.0, 3.0, 4.0, 3.0]


def test_bad_runs_and_logs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert (
        capsys.readouterr().err.strip()
        == f"{PROG}: error: {tmp_path}: no trainer_state.json here, nor a checkpoint-N folder holding one"
    )
    write_run(tmp_path / "run")
    log = tmp_path / "wer.jsonl"
    log.write_text('{"step": 100, "wer": 0.5}\n{"wer": 0.4}\n')
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), "--eval_log", str(log)])
    expected = f'{PROG}: error: {log}:2: expected {{"step": N, "wer": fraction, "set"?: name}}'
    assert capsys.readouterr().err.strip() == expected
