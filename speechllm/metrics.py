"""Word and character error rates after Whisper's text normalisation, so casing and punctuation are not errors."""

import jiwer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer


def error_rate(references: list[str], hypotheses: list[str], metric: str = "wer") -> dict:
    """WER (English normaliser) or CER (basic normaliser, spaces dropped: for Chinese and similar scripts)."""
    if metric == "wer":
        normalize = EnglishTextNormalizer()
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


def format_error_rate(result: dict) -> str:
    metric = "wer" if "wer" in result else "cer"
    return (
        f"{metric.upper()} {100 * result[metric]:.2f}% "
        f"(S={result['substitutions']} D={result['deletions']} I={result['insertions']} "
        f"N={result['reference_units']}, {result['utterances']} utterances)"
    )
