"""Training the chooser to rank (speechllm/ranking.py, train.py --ranking_loss): the features it weighs, a step's
effect, batches against clips one at a time, the learned weights saved and choosing, and the option's errors."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import soundfile
import torch
from repo_scripts import load_script
from tiny_models import write_jsonl

from speechllm import SpeechLLM, SpeechLLMConfig, training
from speechllm.audio import SAMPLE_RATE
from speechllm.data import DataError, SpeechDataset, load_example_audio, read_jsonl
from speechllm.errors import InputError
from speechllm.model import DEFAULT_PROMPT
from speechllm.packaged_models import whisper_tiny_en
from speechllm.ranking import (
    Ranking,
    RankingArguments,
    RankingCollator,
    add_whisper_logprobs,
    batch_loss,
    listwise_loss,
    mwer_loss,
)
from speechllm.rescore_features import FEATURES, agreement

EXAMPLE_JSONL = str(Path(__file__).resolve().parents[1] / "examples" / "audio" / "data.jsonl")
# The tiny LLM is random: its log-probabilities of alike hypotheses lie hundreds of nats apart, where a softmax at 1
# is one-hot. Softened this much, a step moves it.
TEMPERATURE = 100.0


@pytest.fixture(scope="module")
def tiny_en():
    return whisper_tiny_en()


def variants(text: str) -> dict[str, str]:
    words = text.split()
    return {"right": text, "backwards": " ".join(words[::-1]), "short": " ".join(words[:-1])}


@pytest.fixture(scope="module")
def clips_jsonl(tmp_path_factory) -> str:
    """The example clips with cached n-best of known errors (each line's own), and a clip of two 30 s windows, which
    Whisper cannot score and the chooser leaves at its first hypothesis."""
    root = tmp_path_factory.mktemp("ranking")
    examples = read_jsonl(EXAMPLE_JSONL)
    orders = [("backwards", "right", "short"), ("right", "short"), ("short", "right", "backwards")]
    rows = [
        {"key": e.key, "wav": e.wav, "txt": e.txt, "nbest": [variants(e.txt)[name] for name in order]}
        for e, order in zip(examples, orders)
    ]
    audio = load_example_audio(examples[2])
    long_clip = np.tile(audio, int(np.ceil(31 * SAMPLE_RATE / len(audio))))
    soundfile.write(str(root / "long.wav"), long_clip, SAMPLE_RATE)
    long_text = " ".join([examples[2].txt] * 2)
    rows.append({"key": "long", "wav": "long.wav", "txt": long_text, "nbest": [long_text, examples[2].txt]})
    return write_jsonl(str(root / "clips.jsonl"), rows)


@pytest.fixture
def chooser(tiny, tiny_en):
    def make(**config):
        torch.manual_seed(0)
        models = dict(whisper_model_name_or_path=tiny_en, llm_model_name_or_path=tiny["qwen2"])
        chooses = {"nbest": 3, "ger_decoding": "rescore", "learned_rescore_weights": True}
        config = {"projector_hidden_size": 32, "model_dtype": "float32", **chooses, **config}
        return SpeechLLM(SpeechLLMConfig(**models, **config))

    return make


def ranking_items(model, jsonl: str) -> list[dict]:
    dataset = SpeechDataset(jsonl)
    add_whisper_logprobs(model, dataset.examples)
    return [dataset[i] for i in range(len(dataset))]


def ranking_loss(loss: str) -> Ranking:
    return Ranking(RankingArguments(ranking_loss=loss, ranking_temperature=TEMPERATURE))


def test_the_losses_are_the_expected_errors_less_their_mean_and_the_best_ones_cross_entropy():
    """Two clips, one ranked: scores log 3 and 0 give probabilities 3/4 and 1/4; errors 0 and 2, mean 1."""
    scores, errors = torch.tensor([np.log(3.0), 0.0, 5.0, 1.0, 2.0]), torch.tensor([0, 2, 1, 1, 4])
    clip, ranked = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([True, False])
    assert float(batch_loss(mwer_loss, scores, errors, clip, ranked)) == pytest.approx((3 / 4 * -1 + 1 / 4 * 1) / 2)
    assert float(batch_loss(listwise_loss, scores, errors, clip, ranked)) == pytest.approx(-np.log(3 / 4) / 2)
    # ties for the fewest errors share the target; a clip whose hypotheses all err alike adds 0
    tied = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1, 1, 3]), torch.tensor([0, 0, 0]), torch.tensor([True])
    assert float(batch_loss(listwise_loss, *tied)) == pytest.approx(-np.log(2 / (2 + np.e)))
    same = torch.tensor([0.0, 3.0]), torch.tensor([2, 2]), torch.tensor([0, 0]), torch.tensor([True])
    assert float(batch_loss(mwer_loss, *same)) == 0 and float(batch_loss(listwise_loss, *same)) == 0


def test_agreement_is_the_share_of_hypotheses_holding_each_word():
    # a, b: in 2 of 3; c, d, x: in 1 of 3
    assert agreement(["a b c", "A, b d!", "x"]) == pytest.approx([5 / 9, 5 / 9, 1 / 3])
    assert agreement(["the end", ""]) == [1 / 2, 0.0]  # no words, no vote
    assert agreement(["Mr Smith", "mister smith"]) == [1.0, 1.0]  # the words the WER counts
    assert FEATURES == ("llm", "whisper", "llm_per_token", "whisper_per_token", "agreement")


@pytest.mark.parametrize("loss", ["mwer", "listwise"])
def test_a_step_gives_the_hypothesis_with_fewer_errors_more_probability(chooser, clips_jsonl, tmp_path, loss):
    model = chooser().train()
    row = json.loads(Path(clips_jsonl).read_text().splitlines()[1])  # two hypotheses: right, one word short
    items = ranking_items(model, write_jsonl(str(tmp_path / "one.jsonl"), [row]))
    batch = RankingCollator(model)(items)
    assert batch["word_errors"].tolist() == [0, 1]

    inputs = {name: value for name, value in batch.items() if name not in ("word_errors", "ranked")}

    def probabilities():
        with torch.no_grad():
            return (model(**inputs).scores / TEMPERATURE).softmax(0)

    before = probabilities()
    ranking_loss(loss)(model, **batch).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == len(list(model.projector.parameters())) + 1  # and the feature weights
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    torch.optim.SGD(trained, lr=1e-3).step()
    assert probabilities()[0] > before[0]


def loss_and_gradients(model, loss, items):
    model.zero_grad()
    value = ranking_loss(loss)(model, **RankingCollator(model)(items)).loss
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", ["mwer", "listwise"])
def test_a_batch_gives_the_loss_and_gradients_of_its_clips_one_at_a_time(chooser, clips_jsonl, loss):
    """Clips of other lengths and other numbers of hypotheses pad the prompts and the answers; the clip of two
    windows is not ranked but counts in the mean."""
    lora = {"lora_rank": 2, "lora_dropout": 0.0, "lora_target_modules": "q_proj,v_proj"}
    model = chooser(**lora).train()
    items = ranking_items(model, clips_jsonl)
    assert [item["whisper_logprobs"] is None for item in items] == [False, False, False, True]
    together, gradients = loss_and_gradients(model, loss, items)
    alone = [loss_and_gradients(model, loss, [item]) for item in items]
    assert alone[3][0] == 0 and all(not g.any() for g in alone[3][1].values())
    assert all(value != 0 for value, _ in alone[:3])
    torch.testing.assert_close(together, sum(value for value, _ in alone) / len(items), rtol=1e-5, atol=0)
    for name, gradient in gradients.items():  # float noise is 1e-5 of a gradient here; padding errors are not
        mean = sum(g[name] for _, g in alone) / len(items)
        torch.testing.assert_close(gradient, mean, rtol=0, atol=1e-4 * float(gradient.abs().max()), msg=name)
    assert gradients["rescore_weights.weight"].abs().min() > 0  # every feature's weight learns


def none_of_it(text: str) -> str:
    """A hypothesis as long as text (so that the chooser may pick it) that shares none of its words."""
    return " ".join(["nothing"] * len(text.split()))


def test_learned_weights_are_saved_and_choose(chooser, tmp_path):
    """Two choosers that differ only in their learned weights, saved and run through recognize.py: each chooses as
    its weights say (here the agreement's weight alone: the hypothesis most of the n-best agrees with, or least)."""
    from speechllm.recognition import main as recognize

    rows = [
        {"key": e.key, "wav": e.wav, "txt": e.txt, "nbest": [e.txt + " again", none_of_it(e.txt), e.txt]}
        for e in read_jsonl(EXAMPLE_JSONL)
    ]
    jsonl = write_jsonl(str(tmp_path / "cached.jsonl"), rows)
    model = chooser()
    chosen = {}
    for sign in (1.0, -1.0):
        with torch.no_grad():
            model.rescore_weights.weight.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, sign]))
        model.save_pretrained(tmp_path / str(sign))
        saved = safetensors.torch.load_file(tmp_path / str(sign) / "model.safetensors")
        assert saved["rescore_weights.weight"].tolist() == [0.0, 0.0, 0.0, 0.0, sign]
        result = tmp_path / f"{sign}.txt"
        recognize(["--projector_model_path", str(tmp_path / str(sign)), jsonl, "--result_path", str(result)])
        chosen[sign] = dict(line.split("\t", 1) for line in result.read_text().splitlines())
    assert chosen[1.0] == {row["key"]: row["txt"] for row in rows}  # in 2 of 3 hypotheses: the most agreed
    assert chosen[-1.0] == {row["key"]: none_of_it(row["txt"]) for row in rows}
    # Whisper's weight is among the learned ones: a weight given on top would not be used, and is refused
    with pytest.raises(InputError, match="learned its chooser's weights: rescore_whisper_weight would not be used"):
        SpeechLLM.from_pretrained(tmp_path / "1.0", rescore_whisper_weight=5)
    with pytest.raises(SystemExit):
        recognize(["--projector_model_path", str(tmp_path / "1.0"), jsonl, "--rescore_whisper_weight", "5"])
    # a chooser whose weights were not learned saves none: its weight is its config's, as before
    chooser(learned_rescore_weights=False).save_pretrained(tmp_path / "fixed")
    assert not any("rescore" in k for k in safetensors.torch.load_file(tmp_path / "fixed" / "model.safetensors"))


def train_args(tiny, tiny_en, data, output_dir, *extra) -> list[str]:
    return [
        *["--whisper_model_name_or_path", tiny_en, "--llm_model_name_or_path", tiny["qwen2"]],
        *["--model_dtype", "float32", "--projector_hidden_size", "32"],
        *["--data_path", data, "--output_dir", str(output_dir), "--per_device_train_batch_size", "2"],
        *["--logging_steps", "1", "--use_cpu", "--report_to", "none", "--seed", "0"],
        *["--dataloader_num_workers", "0", "--disable_tqdm", "true"],
        *extra,
    ]


RANKING = ["--nbest", "3", "--ranking_loss", "mwer"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--ranking_loss", "mwer"], "--ranking_loss ranks Whisper's n-best: it needs --nbest"),
        (["--rescore_weights_only"], "--rescore_weights_only trains the chooser's weights: it needs --ranking_loss"),
        ([*RANKING, "--rescore_weights_only"], "keeps the projector as it is: give a trained --projector_model_path"),
        ([*RANKING, "--gradient_checkpointing"], "the LLM's KV cache, which --gradient_checkpointing drops"),
        ([*RANKING, "--ranking_temperature", "0"], "--ranking_temperature must be > 0, not 0.0"),
        ([*RANKING, "--nbest", "0"], "--ranking_loss ranks Whisper's n-best: it needs --nbest"),
    ],
)
def test_ranking_options_that_cannot_work_are_one_line_errors_before_the_models_load(
    tiny, tiny_en, clips_jsonl, tmp_path, monkeypatch, options, message
):
    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("the models were loaded first"))
    with pytest.raises(InputError, match=message) as error:
        training.main(train_args(tiny, tiny_en, clips_jsonl, tmp_path, *options))
    assert "\n" not in str(error.value)


def test_ranking_refuses_a_chooser_with_a_second_whisper_before_the_models_load(
    tiny, tiny_en, clips_jsonl, tmp_path, monkeypatch
):
    """Its n-best is decoded at choosing time, never cached for training: the ranking would train on other lists."""
    saved = SpeechLLMConfig(
        nbest=3, ger_decoding="rescore", prompt=DEFAULT_PROMPT, second_whisper_model_name_or_path="base"
    )  # a chooser's prompt that does not list the n-best, as a second Whisper needs
    saved.save_pretrained(tmp_path / "chooser")
    safetensors.torch.save_file({}, str(tmp_path / "chooser" / "model.safetensors"))  # refused before it is read
    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("the models were loaded first"))
    with pytest.raises(InputError, match="a second Whisper's is not cached for training"):
        chooser = ["--projector_model_path", str(tmp_path / "chooser")]
        training.main(train_args(tiny, tiny_en, clips_jsonl, tmp_path, *RANKING, *chooser))
    with pytest.raises(pytest.fail.Exception, match="the models were loaded first"):  # "": none, so it may rank
        none = ["--second_whisper_model_name_or_path", ""]
        training.main(train_args(tiny, tiny_en, clips_jsonl, tmp_path, *RANKING, *chooser, *none))


def test_whispers_cached_scores_are_taken_as_computed(chooser, clips_jsonl, tmp_path):
    """A line's nbest_logprobs (make_error_correction_data.py's) stand for Whisper's scores of the hypotheses it
    lists (distinct, the first N), in their order; lines without them are scored as before."""
    model = chooser(nbest=2)
    computed = ranking_items(model, clips_jsonl)
    rows = [json.loads(line) for line in Path(clips_jsonl).read_text().splitlines()]
    rows = [row | {"wav": str(Path(clips_jsonl).parent / row["wav"])} for row in rows]  # read from elsewhere
    first = rows[0]["nbest"]
    rows[0]["nbest"] = [first[0], first[0] + ".", *first[1:]]  # a spelling the list leaves out, as distinct
    rows[0]["nbest_logprobs"] = [-1.0, -2.0, -3.0, -4.0]
    cached = ranking_items(model, write_jsonl(str(tmp_path / "cached.jsonl"), rows))
    assert cached[0]["whisper_logprobs"] == [-1.0, -3.0]
    assert [item["whisper_logprobs"] for item in cached[1:]] == [item["whisper_logprobs"] for item in computed[1:]]
    # scores cached under the model's Whisper are taken; under another, refused naming the line, not trained on
    rows[0]["nbest_whisper"] = model.config.whisper_model_name_or_path
    assert ranking_items(model, write_jsonl(str(tmp_path / "own.jsonl"), rows))[0]["whisper_logprobs"] == [-1.0, -3.0]
    rows[0]["nbest_whisper"] = "large-v3"
    other = write_jsonl(str(tmp_path / "other.jsonl"), rows)
    with pytest.raises(DataError, match=f"^{other}:1: 'nbest_logprobs' were scored by Whisper 'large-v3', this model"):
        ranking_items(model, other)


def test_cached_scores_must_be_one_number_a_hypothesis(tmp_path):
    row = {"wav": EXAMPLE_JSONL.replace("data.jsonl", "LJ001-0080.opus"), "txt": "a", "nbest": ["a", "b"]}
    for scores in ([-1.0], [-1.0, "x"], -1.0):
        jsonl = write_jsonl(str(tmp_path / "bad.jsonl"), [row, row | {"key": "2", "nbest_logprobs": scores}])
        with pytest.raises(DataError, match=f"^{jsonl}:2: 'nbest_logprobs' must be a number for each of 'nbest'$"):
            read_jsonl(jsonl)


def test_ranking_needs_every_lines_cached_nbest(tiny, tiny_en, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("the models were loaded first"))
    with pytest.raises(DataError, match=f"^{tiny['jsonl']}:1: --ranking_loss needs the line's cached 'nbest'"):
        training.main(train_args(tiny, tiny_en, tiny["jsonl"], tmp_path, *RANKING))


def test_train_py_can_train_the_weights_alone(chooser, tiny, tiny_en, clips_jsonl, tmp_path):
    """--rescore_weights_only on a saved chooser whose weights were not learned: they are, from its own, and saved
    with its projector unchanged; the saved model chooses by them. Evaluation reports the ranking loss."""
    chooser(learned_rescore_weights=False, rescore_whisper_weight=2.0).save_pretrained(tmp_path / "saved")
    options = ["--projector_model_path", str(tmp_path / "saved"), "--rescore_weights_only"]
    options += ["--ranking_temperature", str(TEMPERATURE), "--max_steps", "2", "--learning_rate", "0.01"]
    options += [
        "--save_strategy",
        "no",
        "--eval_data_path",
        clips_jsonl,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
    ]
    trainer = training.main(
        train_args(tiny, tiny_en, clips_jsonl, tmp_path / "out", "--ranking_loss", "mwer", *options)
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["ger_decoding"] == "rescore" and config["learned_rescore_weights"]
    assert config["rescore_whisper_weight"] == 2.0  # the initial weight, kept as the config's
    saved = safetensors.torch.load_file(tmp_path / "saved" / "model.safetensors")
    trained = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert set(trained) == set(saved) | {"rescore_weights.weight"}
    assert all(torch.equal(trained[name], saved[name]) for name in saved)  # the projector as it was
    assert all(w != start for w, start in zip(trained["rescore_weights.weight"].tolist(), [1.0, 2.0, 0, 0, 0]))
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(losses) == 1 and np.isfinite(losses[0])
    loaded = SpeechLLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.rescore_weights.weight.detach(), trained["rescore_weights.weight"])


def test_weight_bench_fits_the_weights_on_cached_scores(chooser, clips_jsonl, tmp_path, capsys):
    """bench/rescore_weights.py --fit: from the LLM alone (Whisper's weight 0), which picks wrong hypotheses here, to
    weights fitted on the scores, which pick the right ones; then again from the saved scores alone."""
    bench = load_script("bench/rescore_weights.py")
    chooser(learned_rescore_weights=False).save_pretrained(tmp_path / "model")
    rows = [json.loads(line) for line in Path(clips_jsonl).read_text().splitlines()][:3]
    for row in rows:
        row["nbest"] = [variants(row["txt"])[name] for name in ("backwards", "short", "right")]
    jsonl = write_jsonl(str(tmp_path / "cached.jsonl"), rows)
    args = [str(tmp_path / "model"), jsonl, "--weights", "0", "--scores", str(tmp_path / "scores.json")]
    fit = ["--fit", jsonl, "--fit_from", "0", "--fit_temperature", str(TEMPERATURE)]
    bench.main(args + fit)
    out = capsys.readouterr().out
    llm_alone = next(line for line in out.splitlines() if "whisper weight 0:" in line)
    assert "WER 0.00%" not in llm_alone
    assert f"{jsonl}: fitted weights: WER 0.00%" in out
    assert re.search(r"weights fitted on .*: llm \S+, whisper \S+, llm_per_token \S+", out)
    bench.main(args + fit)  # the saved scores, which keep the features
    assert f"{jsonl}: fitted weights: WER 0.00%" in capsys.readouterr().out


@pytest.mark.parametrize("weights_only", [False, True])
def test_the_feature_weights_have_their_own_learning_rate(chooser, tiny, tiny_en, clips_jsonl, tmp_path, weights_only):
    """--rescore_weights_learning_rate: the weights move at theirs while the projector, at --learning_rate 0, does not;
    and no weight decay reaches them (a decay of 1 a step would shrink the LLM's weight by the learning rate). Also
    with --rescore_weights_only, where the Trainer's decay group holds the weights alone: before the group was
    tagged, that group was taken for theirs and they trained at --learning_rate 0 with the decay."""
    chooser(learned_rescore_weights=False).save_pretrained(tmp_path / "saved")
    options = ["--projector_model_path", str(tmp_path / "saved"), "--ranking_loss", "mwer", "--max_steps", "1"]
    options += ["--learning_rate", "0", "--rescore_weights_learning_rate", "0.01", "--weight_decay", "1.0"]
    options += ["--rescore_weights_only"] if weights_only else []
    options += ["--optim", "sgd", "--ranking_temperature", str(TEMPERATURE), "--save_strategy", "no"]
    trainer = training.main(train_args(tiny, tiny_en, clips_jsonl, tmp_path / "out", *options))
    saved = safetensors.torch.load_file(tmp_path / "saved" / "model.safetensors")
    trained = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(trained[name], saved[name]) for name in saved)
    (group,) = [g for g in trainer.optimizer.param_groups if g.get("rescore_weights")]
    assert group["params"] == [trainer.model.rescore_weights.weight]
    assert group["weight_decay"] == 0.0 and group["initial_lr"] == 0.01
    moved = trained["rescore_weights.weight"] - torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    assert moved.abs().min() > 0
