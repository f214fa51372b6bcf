"""Training the chooser to rank (train.py --ranking_loss): a clip's hypotheses scored together, as the chooser
(ger_decoding "rescore", rescoring.py) scores them, and a loss on how their scores rank them against the reference:

    mwer      minimum word error rate: the expected word errors of the clip's hypotheses under the softmax of their
              combined scores, less the mean errors of its hypotheses (a baseline: the same gradient, and a loss of 0
              for a chooser no better than a blind pick)
    listwise  the cross-entropy of that softmax toward the hypotheses with the fewest errors

averaged over the batch's clips. The combined score is the one the chooser decodes with (rescore_features.py),
built by the same hypothesis_batch and SpeechLLM.forward: the LLM's log-probability of each hypothesis, with
gradients (one prompt pass a clip, its KV cache shared by the clip's hypotheses); Whisper's, a fixed feature computed
once before training; the cheap features; and their weights, which are trained (config.learned_rescore_weights) and
saved with the projector. A clip whose hypotheses make the same errors adds 0, and so does one of several windows,
for which the chooser keeps Whisper's first. Word errors are counted as the WER counts them (metrics.py).

The softmax is over the scores divided by a temperature (--ranking_temperature): alike hypotheses score nats to tens
of nats apart, where a softmax at 1 is nearly one-hot and gives next to no gradient. The chooser's argmax does not
depend on it. The loss ranks all of a clip's hypotheses, those the chooser's length guard (rescore_min_word_ratio)
never picks too: pushing them down costs nothing where the guard would drop them anyway.
"""

from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

from .data import DataError, load_example_audio
from .errors import InputError
from .metrics import wer_words, word_errors
from .nbest import listed_hypotheses, window_features
from .rescoring import clip_whisper_logprobs, hypothesis_batch, whisper_tokenizer


def mwer_loss(scores: torch.Tensor, errors: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each clip's expected word errors under the softmax of its hypotheses' scores, less their mean errors.
    (clips, most hypotheses) each, padded: real marks the hypotheses, the scores of the others are -inf."""
    mean = (errors * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)
    return (scores.softmax(1) * (errors - mean) * real).sum(1)


def listwise_loss(scores: torch.Tensor, errors: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """-log of the probability the softmax of each clip's scores gives its hypotheses with the fewest errors."""
    fewest = errors.masked_fill(~real, torch.inf).min(1, keepdim=True).values
    return -scores.log_softmax(1).masked_fill(~real | (errors != fewest), -torch.inf).logsumexp(1)


RANKING_LOSSES = {"mwer": mwer_loss, "listwise": listwise_loss}


def batch_loss(loss, scores, errors, clip, ranked) -> torch.Tensor:
    """The mean over the batch's clips of loss on each ranked clip's hypotheses, 0 for the others: a mean over clips,
    so that the ranks' means average to the whole batch's. scores, errors, clip: a hypothesis each (clip: the row of
    its clip, the clips' hypotheses in turn); ranked: a bool a clip."""
    first = torch.searchsorted(clip, torch.arange(len(ranked), device=clip.device))
    position = torch.arange(len(clip), device=clip.device) - first[clip]
    shape = (len(ranked), int(position.max()) + 1)
    real = torch.zeros(shape, dtype=torch.bool, device=clip.device)
    real[clip, position] = True
    padded_scores = scores.float().new_full(shape, -torch.inf).index_put((clip, position), scores.float())
    padded_errors = errors.float().new_zeros(shape).index_put((clip, position), errors.float())
    losses = loss(padded_scores, padded_errors, real)
    return (losses * ranked.to(losses.dtype)).sum() / len(ranked)  # a product, so that the loss is always a graph


@dataclass
class RankingArguments:
    ranking_loss: str | None = field(
        default=None,
        metadata={
            "choices": [None, *RANKING_LOSSES],
            "help": "train the chooser to rank each clip's cached n-best (speechllm/ranking.py): mwer or listwise; "
            "needs --nbest and a cached 'nbest' on every line. The model is saved to choose (ger_decoding rescore) "
            "with the weights of its features learned",
        },
    )
    ranking_temperature: float = field(
        default=1.0,
        metadata={
            "help": "with --ranking_loss: the loss's softmax is over the combined scores divided by this; raise it to "
            "about the spread of a clip's scores where they lie far apart (their softmax then gives no gradient)"
        },
    )
    rescore_weights_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "with --ranking_loss: the learning rate of the chooser's feature weights (a handful of numbers "
            "near 1, which a projector's or LoRA's rate would barely move); default: --learning_rate"
        },
    )
    rescore_weights_only: bool = field(
        default=False,
        metadata={
            "help": "with --ranking_loss: train the weights of the chooser's features alone, the projector and LoRA "
            "of --projector_model_path kept as they are (cheap: the LLM runs without gradients)"
        },
    )

    def __post_init__(self):
        if self.ranking_temperature <= 0:
            raise ValueError(f"--ranking_temperature must be > 0, not {self.ranking_temperature}")
        if self.rescore_weights_only and not self.ranking_loss:
            raise ValueError("--rescore_weights_only trains the chooser's weights: it needs --ranking_loss")

    @property
    def enabled(self) -> bool:
        return self.ranking_loss is not None

    def check(self, config, projector_model_path: str | None, gradient_checkpointing: bool):
        """Options that cannot work with the ranking loss, found before the models load."""
        if not self.enabled:
            return
        if not config.nbest:  # which also rules out distillation (training.check_model_options)
            raise InputError("--ranking_loss ranks Whisper's n-best: it needs --nbest (or a model saved with one)")
        if config.second_whisper_model_name_or_path:
            raise InputError(
                "--ranking_loss ranks one Whisper's n-best, and a second Whisper's is not cached for training: "
                "give --second_whisper_model_name_or_path ''"
            )
        if gradient_checkpointing:
            raise InputError(
                "--ranking_loss shares each clip's prompt pass through the LLM's KV cache, which "
                "--gradient_checkpointing drops"
            )
        if self.rescore_weights_only and not projector_model_path:
            raise InputError(
                "--rescore_weights_only keeps the projector as it is: give a trained --projector_model_path"
            )


def check_ranking_data(dataset):
    """Every line has its n-best cached: the ranking loss ranks the hypotheses the reference was scored against."""
    for example in dataset.examples:
        if example.nbest is None:
            raise DataError(
                f"{example.where}: --ranking_loss needs the line's cached 'nbest' "
                "(examples/make_error_correction_data.py writes it)"
            )


def hypothesis_errors(reference: str, texts: list[str]) -> list[int]:
    """Each hypothesis' word errors against the reference, as the WER counts them; all 0 for a reference without
    words, which the WER leaves out (so it teaches no preference)."""
    if not wer_words(reference):
        return [0] * len(texts)
    return [word_errors(reference, text) for text in texts]


def add_whisper_logprobs(model, examples, batch_size: int = 8):
    """Whisper's log-probability of each hypothesis each example's prompt lists (example.whisper_logprobs; None for a
    clip of several windows), once before training, split across processes: a fixed feature, never trained. Those
    the n-best cache holds (nbest_logprobs) are taken from it, if it names no other Whisper (nbest_whisper) than the
    model's, which decoding will score with."""
    own = model.config.whisper_model_name_or_path
    for example in examples:
        if example.nbest_logprobs is None:
            continue
        if example.nbest_whisper not in (None, own):
            raise DataError(
                f"{example.where}: 'nbest_logprobs' were scored by Whisper {example.nbest_whisper!r}, this model's is "
                f"{own!r}: cache the n-best with it, or drop 'nbest_logprobs' to score them anew"
            )
        cached = dict(zip(example.nbest, example.nbest_logprobs, strict=True))
        example.whisper_logprobs = [cached[text] for text in listed_hypotheses(model.config, example.nbest)]
    todo = [i for i, example in enumerate(examples) if example.nbest_logprobs is None]
    if not todo:
        return
    state = PartialState()
    decoder = model.whisper_decoder
    if state.is_main_process:
        print(f"scoring Whisper's hypotheses of {len(todo)} clips under Whisper, once before training")
    with state.split_between_processes(todo) as mine:
        results = []
        for start in tqdm(range(0, len(mine), batch_size), disable=not state.is_main_process, desc="Whisper scores"):
            chunk = mine[start : start + batch_size]
            audios = [load_example_audio(examples[i]) for i in chunk]
            features, counts = window_features(model.encoder, audios, next(decoder.parameters()).device)
            shown = [listed_hypotheses(model.config, examples[i].nbest) for i in chunk]
            results += zip(chunk, clip_whisper_logprobs(decoder, features, counts, shown))
    if state.num_processes > 1:
        results = gather_object(results)
    for i, scores in results:
        examples[i].whisper_logprobs = scores


class RankingCollator:
    """Training batches for the ranking loss: hypothesis_batch (as the chooser builds its own), each hypothesis'
    word_errors, and ranked: a bool a clip, False for one of several windows (no Whisper score)."""

    def __init__(self, model):
        self.config, self.processor = model.config, model.processor
        self.whisper_tokenizer = whisper_tokenizer(model.whisper_decoder)

    def __call__(self, items):
        nbest, whisper = [item["nbest"] for item in items], [item["whisper_logprobs"] for item in items]
        audios, prompts = [item["audio"] for item in items], [item["prompt"] for item in items]
        batch = hypothesis_batch(self.config, self.processor, self.whisper_tokenizer, audios, prompts, nbest, whisper)
        errors = [
            errors
            for item, hypotheses in zip(items, nbest)
            for errors in hypothesis_errors(item["txt"], listed_hypotheses(self.config, hypotheses))
        ]
        ranked = torch.tensor([scores is not None for scores in whisper])
        return batch | {"word_errors": torch.tensor(errors), "ranked": ranked}


def ranking_collator(model, datasets, device) -> RankingCollator:
    """For train.py: Whisper's scores of every dataset's hypotheses computed once, up front (on device), then the
    collator."""
    model.encoder.to(device)
    model.whisper_decoder.to(device)
    for dataset in datasets:
        if dataset is not None:
            add_whisper_logprobs(model, dataset.examples)
    return RankingCollator(model)


def with_rescore_weights_group(optimizer, model, learning_rate: float | None):
    """The optimizer with the learned feature weights in a group of their own: their learning rate (None: the
    optimizer's) and no weight decay, which would pull the LLM's and Whisper's weights toward 0. Groups left empty
    are dropped; an optimizer that has the group already is left as it is. The group is known by its tag: with
    --rescore_weights_only the Trainer's own decay group holds the weights alone, and is not theirs."""
    if any(group.get("rescore_weights") for group in optimizer.param_groups):
        return optimizer
    weight = model.rescore_weights.weight
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not weight]
    optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
    own = {"lr": learning_rate} if learning_rate is not None else {}
    optimizer.add_param_group({"params": [weight], "weight_decay": 0.0, "rescore_weights": True, **own})
    return optimizer


def train_rescore_weights_only(model):
    """--rescore_weights_only: the projector and any LoRA frozen as loaded (and saved so), the weights trained."""
    for name, parameter in model.trained_parameters().items():
        parameter.requires_grad_(name.startswith("rescore_weights."))


class Ranking:
    """The ranking loss, called in place of the model (as distill.Distillation is): the model scores the batch's
    hypotheses (SpeechLLM.forward with hypotheses), and the loss ranks them by their word errors."""

    def __init__(self, args: RankingArguments):
        self.loss, self.temperature = RANKING_LOSSES[args.ranking_loss], args.ranking_temperature

    def __call__(self, model, word_errors, ranked, num_items_in_batch=None, **inputs):
        outputs = model(**inputs)
        scores = outputs.scores / self.temperature
        outputs["loss"] = batch_loss(self.loss, scores, word_errors, inputs["hypotheses"]["clip"], ranked)
        return outputs
