"""What the chooser (ger_decoding "rescore", rescoring.py) weighs to rank Whisper's hypotheses of a clip: a few
features of each hypothesis, and their weights. A hypothesis' combined score is the weighted sum of its features:

    llm                log P_llm(y | prompt, audio), summed over the LLM's answer tokens and its end of turn
    whisper            log P_whisper(y | x), summed over Whisper's tokens and its end of text (with a second Whisper,
                       the mean of the two's: rescoring.SecondWhisper)
    llm_per_token      llm over the number of those LLM tokens
    whisper_per_token  whisper over the number of those Whisper tokens (the first Whisper's)
    agreement          how many of the clip's hypotheses share its words (a bag-of-words ROVER): the mean, over its
                       words, of the share of the clip's hypotheses that hold the word; 0 for a hypothesis of no words

Sums favour short hypotheses and means long ones; the agreement is the n-best's vote. The weights start at the
chooser's swept ones (LLM 1, Whisper config.rescore_whisper_weight, the others 0: the same choices) and are trained
with the ranking loss (ranking.py, config.learned_rescore_weights); otherwise they stay there. Words are the WER's
(metrics.wer_words), so the vote counts what the WER counts.
"""

import torch
from torch import nn

from .metrics import wer_words

FEATURES = ("llm", "whisper", "llm_per_token", "whisper_per_token", "agreement")


def agreement(texts: list[str]) -> list[float]:
    """For each of a clip's hypotheses, the mean over its words of the share of the clip's hypotheses that hold the
    word (itself included: 1 where all agree, 1 / len(texts) for words only it has); 0 for one without words."""
    bags = [set(wer_words(text)) for text in texts]
    shares = {}
    for bag in bags:
        for word in bag:
            shares[word] = shares.get(word, 0) + 1 / len(bags)
    return [sum(shares[word] for word in words) / len(words) if words else 0.0 for words in map(wer_words, texts)]


def feature_matrix(llm_logprobs, llm_tokens, whisper_logprobs, whisper_tokens, agreement) -> torch.Tensor:
    """(hypotheses, len(FEATURES)) float32 from a tensor (hypotheses,) of each; llm_logprobs may carry gradients."""
    llm, whisper = llm_logprobs.float(), whisper_logprobs.float()
    return torch.stack([llm, whisper, llm / llm_tokens, whisper / whisper_tokens, agreement.float()], -1)


def initial_weights(whisper_weight: float) -> list[float]:
    """The weights that rank as the swept chooser does: the LLM's sum plus whisper_weight times Whisper's."""
    return [1.0, whisper_weight] + [0.0] * (len(FEATURES) - 2)


class FeatureWeights(nn.Module):
    """The chooser's weight of each feature (FEATURES); a module, so that ZeRO-3 gathers its weights for forward."""

    def __init__(self, whisper_weight: float, trained: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(initial_weights(whisper_weight)), requires_grad=trained)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(hypotheses,) combined scores from features (hypotheses, len(FEATURES)); in float32 under any autocast,
        whose bf16 would round log-probabilities of tens of nats to a quarter nat."""
        return (features.float() * self.weight.float()).sum(-1)
