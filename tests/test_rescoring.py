"""Error correction by choosing (speechllm/rescoring.py): both models' log-probabilities of Whisper's hypotheses, and
the choice they make together."""

from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from repo_scripts import load_script
from tiny_models import CHATML, write_jsonl

from speechllm import NBEST_PLACEHOLDER, SpeechLLM, SpeechLLMConfig
from speechllm.audio import SAMPLE_RATE
from speechllm.data import load_example_audio, read_jsonl
from speechllm.encoder import load_whisper_encoder
from speechllm.errors import InputError
from speechllm.model import DEFAULT_PROMPT
from speechllm.nbest import (
    clip_nbest,
    error_correction_inputs,
    joined_nbest,
    listed_hypotheses,
    load_whisper_decoder,
    window_features,
)
from speechllm.packaged_models import WHISPER_BASE, whisper_tiny_en
from speechllm.rescoring import (
    best_hypothesis,
    clip_whisper_logprobs,
    hypothesis_batch,
    per_clip,
    score_clips,
    whisper_logprobs,
    whisper_tokenizer,
)
from speechllm.whisper_formats import load_whisper_model

EXAMPLE_JSONL = str(Path(__file__).resolve().parents[1] / "examples" / "audio" / "data.jsonl")
NBEST = [["hello world", "yellow world", "hollow world"], ["one two three", "one to three"]]


@pytest.fixture(scope="module")
def tiny_en():
    return whisper_tiny_en()


@pytest.fixture(scope="module")
def clips():
    return [load_example_audio(e) for e in read_jsonl(EXAMPLE_JSONL)]


@pytest.fixture
def ger_model(tiny, tiny_en):
    def make(**config):
        torch.manual_seed(0)
        models = dict(whisper_model_name_or_path=tiny_en, llm_model_name_or_path=tiny["qwen2"])
        config = {"projector_hidden_size": 32, "model_dtype": "float32", "nbest": 3, **config}
        return SpeechLLM(SpeechLLMConfig(**models, **config))

    return make


def hypothesis_scores(model, audios, nbest):
    """Each clip's hypotheses as its prompt shows them, with the LLM's and Whisper's log-probabilities of each."""
    shown, whisper_scores, scored = score_clips(model, audios, [None] * len(audios), nbest)
    return shown, per_clip(scored.llm_logprobs, shown), whisper_scores


@torch.no_grad()
def llm_logprobs(model, audios, nbest) -> list[list[float]]:
    """The LLM's log-probabilities of each clip's hypotheses, the model encoding the audio itself (as training to
    rank does), not handed the windows Whisper's scores were computed from."""
    tokenizer, none = whisper_tokenizer(model.whisper_decoder), [None] * len(audios)
    batch = hypothesis_batch(model.config, model.processor, tokenizer, audios, none, nbest, none)
    shown = [listed_hypotheses(model.config, hypotheses) for hypotheses in nbest]
    return per_clip(model(**batch).llm_logprobs, shown)


def test_whisper_logprob_of_its_greedy_text_is_the_one_it_decoded_with(tiny_en, clips):
    """Teacher-forced on Whisper's own greedy transcript, the score is whisper.decode's sum of log-probabilities
    (its average over the tokens and the end of text); a word changed scores lower."""
    encoder, decoder, full = load_whisper_encoder(tiny_en), load_whisper_decoder(tiny_en), load_whisper_model(tiny_en)
    features, counts = window_features(encoder, clips, "cpu")
    assert counts == [1] * len(clips)
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    results = [whisper.decode(full, window[None], options)[0] for window in features]
    wrong = [" ".join(["banana", *result.text.split()[1:]]) for result in results]
    scores = whisper_logprobs(decoder, features, [[r.text, w] for r, w in zip(results, wrong)])
    for result, (own, other) in zip(results, scores):
        assert own == pytest.approx(result.avg_logprob * (len(result.tokens) + 1), abs=1e-3), result.text
        assert other < own - 1
    # texts its search would never write, an empty one and one re-tokenised into symbols it rules out, still score
    odd = whisper_logprobs(decoder, features[:1], [["", "He said: 'hello' (twice)"]])[0]
    assert all(np.isfinite(odd)) and all(score < scores[0][0] for score in odd), odd


def test_whisper_logprobs_of_a_batch_are_those_of_each_window_alone(tiny_en, clips):
    encoder, decoder = load_whisper_encoder(tiny_en), load_whisper_decoder(tiny_en)
    features, _ = window_features(encoder, clips[:2], "cpu")
    texts = [["a short one", "and a much longer text than the other one"], ["the middle"]]
    together = whisper_logprobs(decoder, features, texts)
    alone = [whisper_logprobs(decoder, features[i : i + 1], [texts[i]])[0] for i in range(2)]
    np.testing.assert_allclose(np.concatenate(together), np.concatenate(alone), atol=1e-4)


def test_llm_logprob_is_the_training_loss_and_batches_as_one_at_a_time(ger_model, clips):
    model = ger_model()
    audios = clips[:2]
    together = llm_logprobs(model, audios, NBEST)
    alone = [llm_logprobs(model, [audio], [nbest])[0] for audio, nbest in zip(audios, NBEST)]
    assert [len(scores) for scores in together] == [3, 2]
    np.testing.assert_allclose(np.concatenate(together), np.concatenate(alone), atol=1e-4)
    # the sum of what training's mean cross-entropy averages, on the prompt that shows this clip's n-best
    shown_audios, prompts = error_correction_inputs(model.config, audios[:1], [None], NBEST[:1])
    batch = model.processor(shown_audios, prompts, [NBEST[0][1]])
    with torch.no_grad():
        loss = model(**batch).loss
    answer_tokens = int((batch["labels"] != -100).sum())
    assert together[0][1] == pytest.approx(-float(loss) * answer_tokens, rel=1e-4)


def test_the_choice_is_the_best_score_among_hypotheses_long_enough():
    texts = ["the cat sat down here", "the cat sat down", "the cat sat", "the"]
    scores = [-9.0, -8.0, -7.0, -1.0]  # shorter scores higher, as summed log-probabilities do
    assert best_hypothesis(texts, scores, 0.0) == 3  # any may be chosen: the one word
    assert best_hypothesis(texts, scores, 0.8) == 1  # four words of five are enough, three are not
    assert best_hypothesis(texts, scores, 0.6) == 2
    assert best_hypothesis(texts, scores, 1.0) == 0
    assert best_hypothesis(["", "a b"], [-5.0, -1.0], 0.8) == 1  # an empty first rules out nothing
    assert best_hypothesis(["Yes, yes - yes.", "yes yes"], [-5.0, -1.0], 0.6) == 1  # words as the WER counts them


def test_a_rescoring_model_transcribes_with_one_of_whispers_hypotheses(ger_model, clips, tmp_path):
    rescoring = ger_model(ger_decoding="rescore", rescore_whisper_weight=0.5)
    long_clip = np.concatenate([clips[0]] * int(np.ceil(31 * SAMPLE_RATE / len(clips[0]))))  # two windows
    audios = [*clips[:2], long_clip]
    nbest = [*NBEST, ["first of two windows", "second"]]
    hypotheses = rescoring.decode_batch(audios, nbest=nbest)
    texts, llm, own = hypothesis_scores(rescoring, audios, nbest)
    totals = [[a + 0.5 * b for a, b in zip(*scores)] if scores[1] else None for scores in zip(llm, own)]
    expected = [t[best_hypothesis(t, total, 0.8)] if total else t[0] for t, total in zip(texts, totals)]
    assert [h.text for h in hypotheses] == expected
    assert own[2] is None and hypotheses[2].text == "first of two windows"
    assert all(h.finished and h.avg_logprob < 0 for h in hypotheses)
    assert hypotheses[0].token_ids == rescoring.tokenizer(hypotheses[0].text, add_special_tokens=False)["input_ids"]
    decoded = rescoring.transcribe(clips[0])  # no cache: Whisper's own n-best, one of which is chosen
    assert decoded in hypothesis_scores(rescoring, clips[:1], [None])[0][0]
    rescoring.save_pretrained(tmp_path)
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert (loaded.config.ger_decoding, loaded.config.rescore_whisper_weight) == ("rescore", 0.5)
    with pytest.raises(InputError, match="ger_decoding must be one of generate, rescore"):
        ger_model(ger_decoding="choose")
    with pytest.raises(InputError, match="needs nbest > 0"):
        ger_model(nbest=0, ger_decoding="rescore")
    with pytest.raises(InputError, match=r"rescore_min_word_ratio .* in \[0, 1\], not 1.5"):
        ger_model(ger_decoding="rescore", rescore_min_word_ratio=1.5)


def test_a_chosen_texts_avg_logprob_is_over_the_answer_tokens_it_was_scored_on(ger_model, clips):
    """The LLM's log-probability of the chosen text over the answer tokens it was scored on, which include what the
    chat template writes before an answer (Qwen3's empty think block); before, it was divided by the text's own
    tokens + 1."""
    model = ger_model(ger_decoding="rescore")
    model.tokenizer.chat_template = CHATML.replace(
        "{{ m['content'] }}", "{% if m['role'] == 'assistant' %}lead in {% endif %}{{ m['content'] }}"
    )
    audios = clips[:2]
    hypotheses = model.decode_batch(audios, nbest=NBEST)
    texts, llm, _ = hypothesis_scores(model, audios, NBEST)
    none = [None] * len(audios)
    batch = hypothesis_batch(
        model.config, model.processor, whisper_tokenizer(model.whisper_decoder), audios, none, NBEST, none
    )
    lengths = per_clip(batch["hypotheses"]["answer_mask"].sum(-1), texts)
    chosen = [t.index(h.text) for t, h in zip(texts, hypotheses)]
    means = [scores[i] / n[i] for scores, n, i in zip(llm, lengths, chosen)]
    assert [h.avg_logprob for h in hypotheses] == pytest.approx(means, abs=1e-4)


def test_a_hypothesis_cut_short_is_not_chosen_for_its_short_sum(ger_model, tmp_path):
    """The defect the length guard removes: a hypothesis of one word sums far fewer negative log-probabilities than
    the whole sentence, so summed scores choose it; among hypotheses of >= 0.8 x the first's words (the default) the
    sentence is chosen, and recognize.py --rescore_min_word_ratio 0 brings the old choice back."""
    from speechllm.recognition import main as recognize

    ger_model(ger_decoding="rescore").save_pretrained(tmp_path / "model")
    rows = [
        {"key": e.key, "wav": e.wav, "txt": e.txt, "nbest": [e.txt, e.txt.split()[0]]}
        for e in read_jsonl(EXAMPLE_JSONL)
    ]
    jsonl = write_jsonl(str(tmp_path / "cut.jsonl"), rows)
    chosen = {}
    for ratio in (None, "0"):
        result = tmp_path / f"{ratio}.txt"
        ratio_option = ["--rescore_min_word_ratio", ratio] if ratio else []
        recognize(
            ["--projector_model_path", str(tmp_path / "model"), jsonl, "--result_path", str(result)] + ratio_option
        )
        chosen[ratio] = dict(line.split("\t", 1) for line in result.read_text().splitlines())
    assert chosen[None] == {row["key"]: row["txt"] for row in rows}
    assert chosen["0"] == {row["key"]: row["nbest"][1] for row in rows}


def test_recognize_rescores_on_request_with_the_saved_model_unchanged(ger_model, tmp_path):
    """--ger_decoding rescore on a model saved to generate: every result is one of its line's cached hypotheses, and
    with Whisper's weight high, the clip's own words rather than the same words out of order."""
    from speechllm.recognition import main as recognize

    ger_model().save_pretrained(tmp_path / "model")
    rows = [
        {"key": e.key, "wav": e.wav, "txt": e.txt, "nbest": [" ".join(e.txt.split()[::-1]), e.txt]}
        for e in read_jsonl(EXAMPLE_JSONL)
    ]
    jsonl = write_jsonl(str(tmp_path / "cached.jsonl"), rows)
    result = tmp_path / "rescored.txt"
    recognize(
        ["--projector_model_path", str(tmp_path / "model"), jsonl, "--result_path", str(result)]
        + ["--ger_decoding", "rescore", "--rescore_whisper_weight", "1"]
    )
    texts = dict(line.split("\t", 1) for line in result.read_text().splitlines())
    assert list(texts) == [row["key"] for row in rows]
    assert all(texts[row["key"]] in row["nbest"] for row in rows)
    recognize(
        ["--projector_model_path", str(tmp_path / "model"), jsonl, "--result_path", str(tmp_path / "whisper.txt")]
        + ["--ger_decoding", "rescore", "--rescore_whisper_weight", "1000"]
    )
    texts = dict(line.split("\t", 1) for line in (tmp_path / "whisper.txt").read_text().splitlines())
    assert texts == {row["key"]: row["txt"] for row in rows}
    assert SpeechLLM.from_pretrained(tmp_path / "model").config.ger_decoding == "generate"
    # the chooser's options on a model that writes would not be used: refused, here and in recognize.py
    for option, value in (("rescore_whisper_weight", 5.0), ("rescore_min_word_ratio", 0.5)):
        with pytest.raises(InputError, match=f"does not choose among Whisper's n-best: {option} would not be used"):
            SpeechLLM.from_pretrained(tmp_path / "model", **{option: value})
    with pytest.raises(SystemExit):
        recognize(["--projector_model_path", str(tmp_path / "model"), jsonl, "--rescore_whisper_weight", "5"])


def test_a_recognition_model_chooses_by_the_audio_alone(ger_model, clips, tmp_path):
    """nbest with a prompt that lists no hypotheses is for choosing only: each is scored as the recognition model's
    answer to its own prompt, which generation refuses (it would never see the n-best)."""
    chooser = ger_model(prompt=DEFAULT_PROMPT, ger_decoding="rescore")
    scores = llm_logprobs(chooser, clips[:1], NBEST[:1])[0]
    batch = chooser.processor(clips[:1], [DEFAULT_PROMPT], [NBEST[0][2]])  # the plain recognition prompt
    assert "hello" not in chooser.tokenizer.decode(batch["input_ids"][0])
    with torch.no_grad():
        loss = chooser(**batch).loss
    assert scores[2] == pytest.approx(-float(loss) * int((batch["labels"] != -100).sum()), rel=1e-4)
    with pytest.raises(ValueError, match=NBEST_PLACEHOLDER):
        ger_model(prompt=DEFAULT_PROMPT)  # generating

    from speechllm.recognition import main as recognize

    ger_model(nbest=0).save_pretrained(tmp_path / "recognition")
    # the first hypothesis: the clip's words backwards, as long as the right one but not what was said
    rows = [
        {"key": e.key, "wav": e.wav, "txt": e.txt, "nbest": [" ".join(e.txt.split()[::-1]), e.txt]}
        for e in read_jsonl(EXAMPLE_JSONL)
    ]
    result = tmp_path / "chosen.txt"
    recognize(
        ["--projector_model_path", str(tmp_path / "recognition"), write_jsonl(str(tmp_path / "n.jsonl"), rows)]
        + ["--result_path", str(result), "--nbest", "2", "--ger_decoding", "rescore"]
    )
    texts = dict(line.split("\t", 1) for line in result.read_text().splitlines())
    assert all(texts[row["key"]] in row["nbest"] for row in rows)


def test_a_second_whispers_nbest_joins_the_firsts_after_it():
    config = SpeechLLMConfig(nbest=2, second_whisper_model_name_or_path="base")
    first = ["Hello world.", "hello, world", "yellow world", "hollow world"]  # two spellings of one, then two more
    second = ["Hello world!", "hello word", "hollow world", "mellow world"]
    joined = joined_nbest(config, first, second)
    assert joined == ["Hello world.", "yellow world", "hello word"]  # each Whisper's first 2 that differ in words
    assert listed_hypotheses(config, joined) == joined  # a chooser with two Whispers lists up to 2 * nbest
    assert listed_hypotheses(SpeechLLMConfig(nbest=2), joined) == joined[:2]


def test_a_chooser_with_a_second_whisper_picks_among_both_nbests_by_both_scores(ger_model, clips, tiny_en, tmp_path):
    """Whisper base as the second: the hypotheses are tiny.en's n-best joined with base's, each decoded on its own
    encoder, Whisper's score of each the mean of the two's, and the choice the best total among them."""
    second = WHISPER_BASE
    two_whispers = {"second_whisper_model_name_or_path": second}
    chooser = ger_model(prompt=DEFAULT_PROMPT, ger_decoding="rescore", **two_whispers)
    long_clip = np.concatenate([clips[0]] * int(np.ceil(31 * SAMPLE_RATE / len(clips[0]))))  # two windows
    texts, llm, mean = hypothesis_scores(chooser, [*clips[:2], long_clip], [None, None, ["first of two", "second"]])
    # a clip of several windows: the second Whisper neither decodes nor scores it, the first's first is kept
    assert (texts.pop(), mean.pop(), llm.pop() is not None) == (["first of two", "second"], None, True)
    audios = clips[:2]
    own = {}
    for name in (tiny_en, second):
        decoder = load_whisper_decoder(name)
        features, counts = window_features(load_whisper_encoder(name), audios, "cpu")
        own[name] = (clip_nbest(decoder, 3, features, counts), clip_whisper_logprobs(decoder, features, counts, texts))
    assert texts == [joined_nbest(chooser.config, a, b) for a, b in zip(own[tiny_en][0], own[second][0])]
    assert any(len(t) > len(listed_hypotheses(SpeechLLMConfig(nbest=3), n)) for t, n in zip(texts, own[tiny_en][0]))
    for clip_mean, a, b in zip(mean, own[tiny_en][1], own[second][1]):
        np.testing.assert_allclose(clip_mean, (np.array(a) + np.array(b)) / 2, atol=1e-3)
    weight = chooser.config.rescore_whisper_weight
    expected = [t[best_hypothesis(t, [x + weight * y for x, y in zip(*s)], 0.8)] for t, *s in zip(texts, llm, mean)]
    assert [h.text for h in chooser.decode_batch(audios)] == expected
    chooser.save_pretrained(tmp_path / "chooser")
    assert SpeechLLM.from_pretrained(tmp_path / "chooser").second_whisper is not None
    assert SpeechLLM.from_pretrained(tmp_path / "chooser", second_whisper_model_name_or_path="").second_whisper is None
    with pytest.raises(InputError, match="a second Whisper joins a chooser's n-best: it needs ger_decoding 'rescore'"):
        ger_model(second_whisper_model_name_or_path=second)
    with pytest.raises(InputError, match="a prompt that lists it was not trained on"):  # the default n-best prompt
        ger_model(ger_decoding="rescore", second_whisper_model_name_or_path=second)
    with pytest.raises(InputError, match="learned on one Whisper's features"):
        ger_model(prompt=DEFAULT_PROMPT, ger_decoding="rescore", learned_rescore_weights=True, **two_whispers)
    ger_model(nbest=0).save_pretrained(tmp_path / "writer")  # "" (none) is no chooser's option given to a writer
    assert SpeechLLM.from_pretrained(tmp_path / "writer", second_whisper_model_name_or_path="").second_whisper is None


def test_in_window_mode_each_clip_is_encoded_once_with_the_same_scores(ger_model, clips):
    model = ger_model(audio_mode="window")
    encoded = []
    model.encoder.register_forward_hook(lambda module, inputs, output: encoded.append(len(output)))
    shown, llm, _ = hypothesis_scores(model, clips[:2], NBEST)
    assert encoded == [2]  # one pass over the two clips' windows, for Whisper and the projector both
    again = llm_logprobs(model, clips[:2], NBEST)  # encoding them itself
    np.testing.assert_allclose(np.concatenate(llm), np.concatenate(again), atol=1e-4)


def test_weight_bench_reuses_its_scores_only_for_the_same_model_and_data(ger_model, tmp_path, capsys, monkeypatch):
    """bench/rescore_weights.py --scores: a rerun with the same arguments reads the file (the model is not loaded
    again), one with other data, or other weights saved to the same folder, is refused rather than answered with
    the old scores."""
    bench = load_script("bench/rescore_weights.py")
    ger_model().save_pretrained(tmp_path / "model")
    rows = [
        {"key": e.key, "wav": e.wav, "txt": e.txt, "nbest": [" ".join(e.txt.split()[::-1]), e.txt]}
        for e in read_jsonl(EXAMPLE_JSONL)
    ]
    jsonl = write_jsonl(str(tmp_path / "cached.jsonl"), rows)
    args = [str(tmp_path / "model"), jsonl, "--weights", "0", "1000", "--scores", str(tmp_path / "scores.json")]
    bench.main(args)
    scored = capsys.readouterr().out
    assert f"{jsonl}: whisper weight 1000: WER 0.00%" in scored
    with monkeypatch.context() as patched:
        patched.setattr(SpeechLLM, "from_pretrained", None)  # loading the model again would fail
        bench.main(args)
    assert capsys.readouterr().out.splitlines() == [line for line in scored.splitlines() if "clips scored" not in line]
    with pytest.raises(SystemExit, match="scores.json: scored for"):
        bench.main(args + ["--limit", "1"])
    retrained = ger_model()
    with torch.no_grad():
        next(retrained.projector.parameters()).add_(0.01)
    retrained.save_pretrained(tmp_path / "model")  # other weights, the same folder and config
    with pytest.raises(SystemExit, match="scores.json: scored for"):
        bench.main(args)
