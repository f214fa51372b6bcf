r"""Error correction by choosing (speechllm/rescoring.py): WER at each weight of Whisper's log-probability beside the
LLM's, from one scoring pass, with Whisper's 1-best and the oracle beside them.

    python bench/rescore_weights.py examples/tiny_en_smollm2_ger dev_nbest.jsonl dev_ood_nbest.jsonl \
        --weights 0 1 2 3 5 10 1000 --scores scores.json

Each line's cached "nbest" is used where there is one (examples/make_error_correction_data.py); Whisper's n-best is
decoded elsewhere. The scores go to --scores, and a rerun with the same model, data and options reads them instead
of scoring again.
"""

import argparse
import json
import os
import time

import torch

from speechllm import SpeechLLM
from speechllm.data import load_example_audio, read_jsonl
from speechllm.metrics import error_rate, format_error_rate, word_errors
from speechllm.rescoring import choose, hypothesis_scores


def score_file(model, path, batch_size, limit) -> list[dict]:
    """For each line: its key, reference, the hypotheses its prompt shows and both models' scores of them."""
    examples = read_jsonl(path)[:limit]
    rows, start = [], time.perf_counter()
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        with torch.no_grad():
            scores = hypothesis_scores(
                model, [load_example_audio(e) for e in chunk], [e.prompt for e in chunk], [e.nbest for e in chunk]
            )
        for example, (texts, llm, own) in zip(chunk, zip(*scores)):
            rows.append({"key": example.key, "txt": example.txt, "texts": texts, "llm": llm, "whisper": own})
    print(f"{path}: {len(rows)} clips scored in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an error-correction model (nbest > 0), or any with --nbest")
    parser.add_argument("data", nargs="+", help="jsonl files with references")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 1000.0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N lines of each file")
    parser.add_argument("--scores", help="a json file of the scores: read if it exists, else written")
    parser.add_argument("--nbest", type=int, help="for a recognition model: score Whisper's N-best against the audio")
    args = parser.parse_args(argv)

    # what the scores depend on: a --scores file of another model or data is refused, not silently reused
    source = {"model": args.model, "nbest": args.nbest, "limit": args.limit, "data": args.data}
    if args.scores and os.path.exists(args.scores):
        with open(args.scores, encoding="utf-8") as file:
            saved = json.load(file)
        if saved.get("source") != source:
            raise SystemExit(f"{args.scores}: scored for {saved.get('source')}, not {source}; give another --scores")
        scored = saved["scores"]
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
            chosen = [choose(r["texts"], r["llm"], r["whisper"], weight) for r in rows]
            changed = sum(text != r["texts"][0] for text, r in zip(chosen, rows))
            result = error_rate(references, chosen)
            print(f"{path}: whisper weight {weight:g}: {format_error_rate(result)}; {changed} clips not the 1-best")


if __name__ == "__main__":
    main()
