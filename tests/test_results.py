"""Partial results (speechllm/results.py): what a refusal of another run's saved results says."""

import pytest

from speechllm.results import PartialResults, ResultsError


def test_a_setting_the_saved_run_did_not_have_is_named_in_the_refusal(tmp_path):
    """A file written before an option existed lacks its key; the refusal names it rather than listing nothing
    (a saved None and a missing key print alike otherwise)."""
    path = str(tmp_path / "results.tsv")
    PartialResults(path, 0, {"nbest": 5}).add([{"key": "a", "text": "kept"}])
    newer = PartialResults(path, 0, {"nbest": 5, "rescore_min_word_ratio": None})
    with pytest.raises(ResultsError, match=r"other settings \(rescore_min_word_ratio: \(none\) there, None now\)"):
        newer.done()
    changed = PartialResults(path, 0, {"nbest": 4})
    with pytest.raises(ResultsError, match=r"other settings \(nbest: 5 there, 4 now\)"):
        changed.done()
