r"""Error correction by choosing (speechllm/rescoring.py): WER at each weight of Whisper's log-probability beside the
LLM's, from one scoring pass, with Whisper's 1-best and the oracle beside them.

    python bench/rescore_weights.py examples/tiny_en_smollm2_ger dev_nbest.jsonl dev_ood_nbest.jsonl \
        --weights 0 1 2 3 5 10 1000 --scores scores.json

Each line's cached "nbest" is used where there is one (examples/make_error_correction_data.py); Whisper's n-best is
decoded elsewhere. The scores go to --scores, and a rerun with the same model, data and options (the same files, not
only the same paths) reads them instead of scoring again.

--fit FILE learns the weights of all the chooser's features (speechllm/rescore_features.py) from FILE's scores, as
train.py --ranking_loss --rescore_weights_only would but with nothing rescored (the ranking loss on fixed features),
and prints them and every file's WER at them; fit on training clips (a --limit of them), not on the files reported:

    python bench/rescore_weights.py examples/tiny_en_smollm2 train_nbest.jsonl dev_nbest.jsonl dev_ood_nbest.jsonl \
        --nbest 5 --limit 400 --fit train_nbest.jsonl --fit_temperature 10 --scores scores.json
"""

import argparse
import hashlib
import json
import os
import time

import torch

from speechllm import SpeechLLM, SpeechLLMConfig
from speechllm.data import load_example_audio, read_jsonl
from speechllm.hub import hash_file
from speechllm.metrics import error_rate, format_error_rate, word_errors
from speechllm.ranking import RANKING_LOSSES, batch_loss, hypothesis_errors
from speechllm.recognition import model_identity
from speechllm.rescore_features import FEATURES, FeatureWeights
from speechllm.rescoring import best_hypothesis, per_clip, score_clips


def score_file(model, path, batch_size, limit) -> list[dict]:
    """For each line: its key, reference, the hypotheses its prompt shows, both models' scores of them and the
    chooser's features of each (None for a clip of several windows)."""
    examples = read_jsonl(path)[:limit]
    rows, start = [], time.perf_counter()
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        audios = [load_example_audio(e) for e in chunk]
        shown, whisper, scored = score_clips(model, audios, [e.prompt for e in chunk], [e.nbest for e in chunk])
        scores = zip(shown, per_clip(scored.llm_logprobs, shown), whisper, per_clip(scored.features, shown))
        for example, (texts, llm, own, features) in zip(chunk, scores):
            features = features if own is not None else None
            row = {"key": example.key, "txt": example.txt, "texts": texts, "llm": llm, "whisper": own}
            rows.append(row | {"features": features})
    print(f"{path}: {len(rows)} clips scored in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def fit_weights(rows, whisper_weight: float, loss: str, temperature: float, steps: int, learning_rate: float):
    """The features' weights that minimise the ranking loss on these rows' fixed features (Adam, full batch), from
    the chooser's at this Whisper weight."""
    rows = [row for row in rows if row["features"] is not None]
    features = torch.tensor([f for row in rows for f in row["features"]])
    clip = torch.tensor([i for i, row in enumerate(rows) for _ in row["texts"]])
    errors = torch.tensor([e for row in rows for e in hypothesis_errors(row["txt"], row["texts"])])
    ranked = torch.ones(len(rows), dtype=torch.bool)
    weights = FeatureWeights(whisper_weight, trained=True)
    optimizer = torch.optim.Adam(weights.parameters(), lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad()
        batch_loss(RANKING_LOSSES[loss], weights(features) / temperature, errors, clip, ranked).backward()
        optimizer.step()
    return weights.weight.tolist()


def choose(row, weights: list[float], min_word_ratio: float) -> str:
    """The chooser's pick at these weights: of all the features (FEATURES), or two, the LLM's and Whisper's sums
    alone (a weight sweep, which scores files written before the features also serve); Whisper's first where it has
    no score (several windows)."""
    if row["whisper"] is None:
        return row["texts"][0]
    features = row["features"] if len(weights) > 2 else zip(row["llm"], row["whisper"])
    totals = [sum(w * f for w, f in zip(weights, values)) for values in features]
    return row["texts"][best_hypothesis(row["texts"], totals, min_word_ratio)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an error-correction model (nbest > 0), or any with --nbest")
    parser.add_argument("data", nargs="+", help="jsonl files with references")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 1000.0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N lines of each file")
    parser.add_argument("--scores", help="a json file of the scores: read if it exists, else written")
    parser.add_argument("--nbest", type=int, help="for a recognition model: score Whisper's N-best against the audio")
    parser.add_argument(
        "--min_word_ratio",
        type=float,
        default=SpeechLLMConfig().rescore_min_word_ratio,
        help="the chooser's rescore_min_word_ratio (0: any hypothesis may be chosen)",
    )
    parser.add_argument("--fit", help="one of the data files: learn every feature's weight from its scores")
    parser.add_argument("--fit_loss", choices=list(RANKING_LOSSES), default="mwer")
    parser.add_argument("--fit_temperature", type=float, default=1.0, help="as train.py --ranking_temperature")
    parser.add_argument("--fit_steps", type=int, default=300)
    parser.add_argument("--fit_learning_rate", type=float, default=0.05)
    parser.add_argument("--fit_from", type=float, default=5.0, help="the Whisper weight the fit starts from")
    args = parser.parse_args(argv)
    if args.fit and args.fit not in args.data:
        parser.error(f"--fit {args.fit} is not among the data files")

    # what the scores depend on: a --scores file of another model or data is refused, not silently reused, also
    # when retrained weights or a rewritten jsonl sit at the same paths
    data_files = [hash_file(hashlib.sha256(), path).hexdigest() for path in args.data]
    files = {"model_files": model_identity(args.model), "data_files": data_files}
    source = {"model": args.model, "nbest": args.nbest, "limit": args.limit, "data": args.data} | files
    if args.scores and os.path.exists(args.scores):
        with open(args.scores, encoding="utf-8") as file:
            saved = json.load(file)
        if saved.get("source") != source:
            raise SystemExit(f"{args.scores}: scored for {saved.get('source')}, not {source}; give another --scores")
        scored = saved["scores"]
        if args.fit and any("features" not in row for rows in scored.values() for row in rows):
            raise SystemExit(f"{args.scores}: scored without the features --fit needs; give another --scores")
    else:
        model = SpeechLLM.from_pretrained(args.model, nbest=args.nbest, ger_decoding="rescore").eval()
        scored = {path: score_file(model, path, args.batch_size, args.limit) for path in args.data}
        if args.scores:
            with open(args.scores, "w", encoding="utf-8") as file:
                json.dump({"source": source, "scores": scored}, file)
    for path, rows in scored.items():
        references = [row["txt"] for row in rows]
        print(f"{path}: Whisper's 1-best {format_error_rate(error_rate(references, [r['texts'][0] for r in rows]))}")
        oracle = [min(r["texts"], key=lambda text: word_errors(r["txt"], text)) for r in rows]
        print(f"{path}: oracle {format_error_rate(error_rate(references, oracle))}")
        for weight in args.weights:
            chosen = [choose(r, [1.0, weight], args.min_word_ratio) for r in rows]
            changed = sum(text != r["texts"][0] for text, r in zip(chosen, rows))
            result = error_rate(references, chosen)
            print(f"{path}: whisper weight {weight:g}: {format_error_rate(result)}; {changed} clips not the 1-best")
    if args.fit:
        fit = (args.fit_from, args.fit_loss, args.fit_temperature, args.fit_steps, args.fit_learning_rate)
        weights = fit_weights(scored[args.fit], *fit)
        print(f"weights fitted on {args.fit}: " + ", ".join(f"{n} {w:.4g}" for n, w in zip(FEATURES, weights)))
        for path, rows in scored.items():
            chosen = [choose(row, weights, args.min_word_ratio) for row in rows]
            changed = sum(text != row["texts"][0] for text, row in zip(chosen, rows))
            result = error_rate([row["txt"] for row in rows], chosen)
            print(f"{path}: fitted weights: {format_error_rate(result)}; {changed} clips not the 1-best")


if __name__ == "__main__":
    main()
