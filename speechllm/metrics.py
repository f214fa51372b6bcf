"""Word and character error rates after Whisper's text normalisation, so casing and punctuation are not errors;
ROUGE-L for answers that are not transcripts."""

import functools

import jiwer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer


def error_rate(references: list[str], hypotheses: list[str], metric: str = "wer") -> dict:
    """WER (English normaliser) or CER (basic normaliser, spaces dropped: for Chinese and similar scripts)."""
    if metric == "wer":
        normalize = _english_normalizer()
        refs, hyps = [normalize(t) for t in references], [normalize(t) for t in hypotheses]
    elif metric == "cer":
        normalize = BasicTextNormalizer()
        refs, hyps = (
            [normalize(t).replace(" ", "") for t in references],
            [normalize(t).replace(" ", "") for t in hypotheses],
        )
    else:
        raise ValueError(f"metric must be 'wer' or 'cer', not {metric!r}")
    kept = [(r, h) for r, h in zip(refs, hyps) if r]  # a reference that normalises to nothing has no rate
    if not kept:
        raise ValueError("no reference text left to score after normalisation")
    refs, hyps = zip(*kept)
    measure = jiwer.process_words if metric == "wer" else jiwer.process_characters
    out = measure(list(refs), list(hyps))
    errors = out.substitutions + out.deletions + out.insertions
    units = out.substitutions + out.deletions + out.hits
    return {
        metric: errors / units,
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "reference_units": units,
        "utterances": len(refs),
    }


def word_errors(reference: str, hypothesis: str) -> int:
    """Substitutions, deletions and insertions of one hypothesis, normalised as error_rate does."""
    result = error_rate([reference], [hypothesis])
    return result["substitutions"] + result["deletions"] + result["insertions"]


def wer_words(text: str) -> list[str]:
    """The words of text that the WER counts: after its (English) normalisation. A reference without any is left out
    of the WER."""
    return _english_normalizer()(text).split()


@functools.cache
def _english_normalizer() -> EnglishTextNormalizer:  # it reads its spelling table from a file: once
    return EnglishTextNormalizer()


def format_error_rate(result: dict) -> str:
    metric = "wer" if "wer" in result else "cer"
    return (
        f"{metric.upper()} {100 * result[metric]:.2f}% "
        f"(S={result['substitutions']} D={result['deletions']} I={result['insertions']} "
        f"N={result['reference_units']}, {result['utterances']} utterances)"
    )


def rouge_l(references: list[str], hypotheses: list[str]) -> float:
    """Mean ROUGE-L F-measure over the pairs: Google's rouge-score, with its Porter stemmer as summarisation papers
    report it."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:  # only the speech-prompt bench needs it
        raise ImportError("ROUGE-L needs rouge-score: pip install 'speechllm[bench]'") from error
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many hypotheses as references, and some: {len(hypotheses)}, {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses)) / len(references)
