r"""Evaluate a saved model on jsonl files: WER with S/D/I, the share of insertions, how many hypotheses never
ended (ran to max_new_tokens: loops), and decoding speed; for each decoding setting asked for, in one model load.

    python bench/evaluate.py examples/tiny_en_smollm2 ../shared/data/dev/data.jsonl ../shared/data/dev_ood/data.jsonl \
        --no_repeat_ngram_size 0 4 --repetition_penalty 1.0 1.1 [--num_beams 1] [--json results.json]

An error-correction model reads each line's cached "nbest" where there is one (examples/make_error_correction_data.py)
and decodes Whisper's n-best itself elsewhere.

Every combination of --no_repeat_ngram_size and --repetition_penalty is scored; --hypotheses DIR writes each
setting's key<TAB>hypothesis lines there, for reading the errors. --engine llama.cpp decodes with the LLM in
llama.cpp (greedy; --gguf_weights picks its weights).
"""

import argparse
import itertools
import json
import os
import time

import torch

from speechllm import SpeechLLM
from speechllm.audio import SAMPLE_RATE
from speechllm.data import load_example_audio, read_jsonl
from speechllm.gguf_export import WEIGHT_TYPES
from speechllm.llama_engine import ENGINES, engine_decoder
from speechllm.metrics import error_rate, format_error_rate
from speechllm.quantization import quantize_llm_int8


def evaluate(model, examples, audios, batch_size, num_beams, **options) -> dict:
    """model: a SpeechLLM, or what decodes for it (llama_engine.engine_decoder)."""
    order = sorted(range(len(examples)), key=lambda i: -len(audios[i]))  # longest first, as recognize.py does
    hypotheses, start = {}, time.perf_counter()
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        decoded = model.decode_batch(
            [audios[i] for i in chunk], [examples[i].prompt for i in chunk], num_beams,
            nbest=[examples[i].nbest for i in chunk], **options,
        )  # fmt: skip
        hypotheses.update(zip(chunk, decoded))
    seconds = time.perf_counter() - start
    hypotheses = [hypotheses[i] for i in range(len(examples))]
    result = error_rate([e.txt for e in examples], [h.text for h in hypotheses])
    errors = result["substitutions"] + result["deletions"] + result["insertions"]
    audio_seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    return {
        **result,
        "insertion_share": result["insertions"] / max(errors, 1),
        "unfinished": sum(not h.finished for h in hypotheses),
        "decoding_seconds": seconds,
        "real_time_factor": seconds / audio_seconds,
        "hypotheses": {e.key: h.text for e, h in zip(examples, hypotheses)},
    }


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a folder written by train.py / save_pretrained")
    parser.add_argument("data", nargs="+", help="jsonl files with references")
    parser.add_argument("--whisper_model_name_or_path")
    parser.add_argument("--llm_model_name_or_path")
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--no_repeat_ngram_size", type=int, nargs="+", help="default: the model's own")
    parser.add_argument("--repetition_penalty", type=float, nargs="+", help="default: the model's own")
    parser.add_argument("--limit", type=int, help="only the first N lines of each file")
    parser.add_argument("--llm_int8", action="store_true", help="CPU: the decoding steps in int8 (docs/speed.md)")
    parser.add_argument("--engine", default="torch", choices=ENGINES, help="llama.cpp: greedy, the LLM in llama.cpp")
    parser.add_argument("--gguf_weights", choices=WEIGHT_TYPES, help="llama.cpp's weights (default: llama_engine's)")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--hypotheses", help="a folder for each setting's hypotheses")
    args = parser.parse_args(argv)
    if args.engine != "torch" and args.num_beams != 1:  # before the model loads
        parser.error(f"--engine {args.engine} decodes greedily: --num_beams must be 1, not {args.num_beams}")

    model = SpeechLLM.from_pretrained(
        args.model,
        whisper_model_name_or_path=args.whisper_model_name_or_path,
        llm_model_name_or_path=args.llm_model_name_or_path,
    ).eval()
    if args.llm_int8:
        quantize_llm_int8(model.llm)
    decoder = engine_decoder(model, args.engine, args.gguf_weights)
    guards = model.generation_config
    settings = list(
        itertools.product(
            args.no_repeat_ngram_size or [guards.no_repeat_ngram_size],
            args.repetition_penalty or [guards.repetition_penalty],
        )
    )
    report = []
    for path in args.data:
        examples = read_jsonl(path)[: args.limit]
        audios = [load_example_audio(e) for e in examples]
        for ngram, penalty in settings:
            with torch.no_grad():
                result = evaluate(
                    decoder, examples, audios, args.batch_size, args.num_beams,
                    no_repeat_ngram_size=ngram, repetition_penalty=penalty,
                )  # fmt: skip
            setting = f"beam {args.num_beams}, no_repeat_ngram_size {ngram}, repetition_penalty {penalty}"
            if args.engine != "torch":
                setting += f", {args.engine} ({decoder.weights})"
            print(
                f"{path} [{setting}]: {format_error_rate(result)}; insertions {100 * result['insertion_share']:.0f}% "
                f"of errors; {result['unfinished']} unfinished; decoding {result['decoding_seconds']:.0f} s "
                f"(RTF {result['real_time_factor']:.3f})",
                flush=True,
            )
            if args.hypotheses:
                os.makedirs(args.hypotheses, exist_ok=True)
                stem = os.path.splitext(os.path.basename(path))[0]  # .../dev/data.jsonl: dev; dev_nbest.jsonl itself
                label = os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == "data" else stem
                name = f"{label}_ngram{ngram}_rp{penalty}.txt"
                with open(os.path.join(args.hypotheses, name), "w", encoding="utf-8") as file:
                    file.writelines(f"{k}\t{' '.join(t.split())}\n" for k, t in result["hypotheses"].items())
            report.append({"data": path, "engine": args.engine, "num_beams": args.num_beams,
                           "no_repeat_ngram_size": ngram, "repetition_penalty": penalty, **result})  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=1)


if __name__ == "__main__":
    main()
