"""How sure the LLM was of what it generated: each generated token's log-probability, greedy or beam search."""

import torch


def token_logprobs(llm, output) -> torch.Tensor:
    """(batch, steps) log-probabilities of the generated tokens, from generate(..., return_dict_in_generate=True,
    output_scores=True) on new tokens only; columns past a hypothesis's end are padding."""
    beam_indices = getattr(output, "beam_indices", None)
    # Greedy scores are (processed) logits, beam scores already log-probabilities whose beams need their indices.
    logprobs = llm.compute_transition_scores(
        output.sequences, output.scores, beam_indices, normalize_logits=beam_indices is None
    )
    return logprobs[:, : output.sequences.shape[1]].float()
