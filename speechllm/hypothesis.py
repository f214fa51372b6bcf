"""What decoding gives back, whichever engine runs it (torch's generate or llama.cpp): a Hypothesis a clip, the loop
guards' defaults and the token budget when none is given."""

import math
from dataclasses import dataclass

from .audio import SAMPLE_RATE

# Decoding defaults a model keeps in its generation_config (HF's place for them), over the generated tokens only.
LOOP_GUARDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
TOKENS_PER_SECOND = 8  # room for fast speech (about 4 words, 6 tokens a second) when no max_new_tokens is given
TOKEN_BUDGET_MARGIN = 16  # and for a clip's last words and the end of turn, however short the clip


@dataclass
class Hypothesis:
    text: str
    token_ids: list[int]  # the answer's tokens, without the stop token
    finished: bool  # False: it ran to max_new_tokens without ending (most often a loop)
    avg_logprob: float | None = None  # mean log-probability of the tokens and the stop token (with_logprobs)
    decoding_seconds: float = 0.0  # the clip's share of its batch's wall time: features, encoder, generation


def check_batch(audios, prompts, nbest):
    """A batch's prompts and cached n-best, where given, are one a clip (zip would drop the clips past the shorter)."""
    for name, values in (("prompts", prompts), ("nbest lists", nbest)):
        if values is not None and len(values) != len(audios):
            raise ValueError(f"{len(audios)} clips and {len(values)} {name}: give one a clip (None: the default)")


def loop_guards(model, options: dict) -> dict:
    """The loop guards a decoding call uses: the model's generation_config's, overridden by the call's options."""
    guards = {**{name: getattr(model.generation_config, name) for name in LOOP_GUARDS}, **options}
    check_loop_guards(guards)
    return guards


def check_loop_guards(guards: dict):
    """The loop guards given (a dict of any of LOOP_GUARDS) can work."""
    penalty, ngram_size = guards.get("repetition_penalty"), guards.get("no_repeat_ngram_size")
    if penalty is not None and penalty <= 0:  # it divides the scores of the tokens already written
        raise ValueError(f"repetition_penalty must be above 0 (1: none), not {penalty}")
    if ngram_size is not None and ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be 0 (none) or more, not {ngram_size}")


def token_budgets(model, audios, prompts) -> list[int]:
    """max_new_tokens when none is given, a clip each: room for its words with the model's own prompt, at least
    answer_max_new_tokens with any other (a summary, a reply to a spoken question is not as long as the audio). A
    batch generates to the largest and cuts each answer at its own (within_budget), so that a clip's text does not
    depend on the clips it is decoded with."""
    budgets = []
    for audio, prompt in zip(audios, prompts):
        budget = math.ceil(len(audio) / SAMPLE_RATE * TOKENS_PER_SECOND) + TOKEN_BUDGET_MARGIN
        if prompt not in (None, model.config.prompt):
            budget = max(budget, model.config.answer_max_new_tokens)
        budgets.append(budget)
    return budgets


def within_budget(ids: list[int], finished: bool, budget: int) -> tuple[list[int], bool]:
    """An answer's tokens and whether it ended, as greedy decoding it alone to budget tokens would give them (beam
    search: the batch's best beam, cut): one that reached its budget is cut there, unfinished."""
    return (ids[:budget], False) if len(ids) >= budget else (ids, finished)
