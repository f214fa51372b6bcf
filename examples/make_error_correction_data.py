"""Cache Whisper's n-best in a jsonl, so that a training set for error correction is decoded once, not every run.

    python examples/make_error_correction_data.py --whisper tiny.en --nbest 5 train.jsonl train_nbest.jsonl

Each line is written back with its key, its wav made absolute and "nbest" added: Whisper's distinct beam-search
hypotheses (beam N), best first, exactly as a model trained with --nbest N on the same Whisper weights decodes them
itself (speechllm/nbest.py), and for a clip of one window (30 s) "nbest_logprobs", Whisper's log-probability of each
(speechllm/rescoring.py), which training a chooser to rank (train.py --ranking_loss) would otherwise compute before
every run, and "nbest_whisper", the --whisper it was decoded with (ranking refuses those scores for a model of
another Whisper). train.py and recognize.py use a line's cached list instead of decoding its clip; a model with a
smaller N reads the first N. Lines go to OUTPUT.part0 as they are decoded; a rerun with the same options continues
from there.
"""

import argparse
import json
import os

import torch
from tqdm import tqdm

from speechllm.data import load_example_audio, read_jsonl
from speechllm.encoder import load_whisper_encoder
from speechllm.errors import run_command_line
from speechllm.nbest import clip_nbest, load_whisper_decoder, window_features
from speechllm.rescoring import clip_whisper_logprobs
from speechllm.results import PartialResults, write_whole


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--whisper", required=True, help="any format speechllm loads")
    parser.add_argument("--nbest", type=int, default=5, help="beam size and most hypotheses kept")
    parser.add_argument("--language", default="en", help="the language Whisper decodes in (a model's whisper_language)")
    parser.add_argument("--batch_size", type=int, default=8, help="clips decoded together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model_dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)

    examples = read_jsonl(args.input, require_text=False)  # every line checked before any decoding
    with open(args.input, encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    settings = {
        "input": os.path.abspath(args.input),  # a cached line is the input line with its n-best added
        **{name: getattr(args, name) for name in ("whisper", "nbest", "language", "model_dtype")},
    }
    partial = PartialResults(args.output, 0, settings)
    done = partial.done()  # what an interrupted run wrote
    todo = [(example, row) for example, row in zip(examples, rows) if example.key not in done]

    dtype = getattr(torch, args.model_dtype)
    encoder = load_whisper_encoder(args.whisper, dtype).to(args.device)
    decoder = load_whisper_decoder(args.whisper, dtype, args.language).to(args.device)
    progress = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="n-best", unit="clip")
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start : start + args.batch_size]
        features, counts = window_features(encoder, [load_example_audio(e) for e, _ in chunk], args.device)
        nbest = clip_nbest(decoder, args.nbest, features, counts)
        logprobs = clip_whisper_logprobs(decoder, features, counts, nbest)  # None for a clip of several windows
        decoded = [  # the input line with its key, its wav made absolute and the n-best added
            row
            | {"key": example.key, "wav": example.wav, "nbest": hypotheses, "nbest_whisper": args.whisper}
            | ({"nbest_logprobs": scores} if scores is not None else {})
            for (example, row), hypotheses, scores in zip(chunk, nbest, logprobs)
        ]
        partial.add(decoded)
        done |= {row["key"]: row for row in decoded}
        progress.update(len(chunk))
    progress.close()
    write_whole(args.output, [json.dumps(done[example.key], ensure_ascii=False) for example in examples])
    partial.remove()
    print(f"{args.output}: {len(examples)} lines with Whisper's {args.nbest}-best")


if __name__ == "__main__":
    run_command_line(main)  # a bad jsonl line or path: one line naming it, no traceback
