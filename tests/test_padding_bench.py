"""bench/padding.py: the padded shares it reports, from batches worked out by hand, and a run on a saved model."""

import json

from repo_scripts import load_script

from speechllm.audio import WINDOW_FRAMES


def test_padded_shares_count_what_batches_pad():
    bench = load_script("bench/padding.py")
    sizes = [
        {"frames": [100], "positions": 30},
        {"frames": [WINDOW_FRAMES, 20], "positions": 90},  # a clip of two windows
        {"frames": [10], "positions": 10},
    ]
    shares = bench.padded_shares(sizes, [2, 0, 1], batch_size=2, pad_frames_to=10)
    # batch [2, 0]: windows 10 and 100 frames padded to 100; batch [1]: windows of 3000 and 20 padded to 3000
    assert shares["audio_frames_padded"] == 1 - (10 + 100 + WINDOW_FRAMES + 20) / (2 * 100 + 2 * WINDOW_FRAMES)
    assert shares["llm_positions_padded"] == 1 - (10 + 30 + 90) / (2 * 30 + 90)
    assert shares["llm_positions_per_batch"] == (2 * 30 + 90) / 2
    window_mode = bench.padded_shares(sizes, [2, 0, 1], batch_size=2, pad_frames_to=None)  # 30 s each window
    assert window_mode["audio_frames_padded"] == 1 - (10 + 100 + WINDOW_FRAMES + 20) / (4 * WINDOW_FRAMES)


def test_padding_bench_runs_on_a_saved_model(make_model, tiny, tmp_path, capsys):
    make_model().save_pretrained(tmp_path / "model")
    out = tmp_path / "padding.json"
    load_script("bench/padding.py").main(
        [tiny["jsonl"], "--model", str(tmp_path / "model"), "--batch_size", "2", "--json", str(out)]
    )
    results = json.loads(out.read_text())
    assert set(results) == {"random", "group_by_length"}
    for result in results.values():
        assert 0 <= result["audio_frames_padded"] < 1 and 0 <= result["llm_positions_padded"] < 1
    assert "| group_by_length |" in capsys.readouterr().out
