r"""Does the LLM read the audio? A projector's loss on the references with each clip's own audio, and with the
audio of the clip of nearest length (so the length of the audio tells it nothing).

    python bench/audio_reliance.py runs/tiny_en_smollm2/checkpoint-1600 ../shared/data/dev/data.jsonl \
        --whisper_model_name_or_path $W --llm_model_name_or_path $L --limit 40

A projector that only teaches the LLM the style of the transcripts scores the same on both; the gap (in nats per
answer token) is what the audio adds. It moves long before WER does, so it shows whether training is on its way.
"""

import argparse

import torch

from speechllm import SpeechLLM
from speechllm.data import load_example_audio, read_jsonl
from speechllm.processor import IGNORE_INDEX


def mean_loss(model, audios, examples, batch_size) -> float:
    total, tokens = 0.0, 0
    for start in range(0, len(audios), batch_size):
        chunk = examples[start : start + batch_size]
        batch = model.processor(audios[start : start + batch_size], [e.prompt for e in chunk], [e.txt for e in chunk])
        with torch.no_grad():
            loss = model(**batch).loss.item()
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        total, tokens = total + loss * n, tokens + n
    return total / tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved SpeechLLM (checkpoint folder)")
    parser.add_argument("data", help="jsonl with references")
    parser.add_argument("--whisper_model_name_or_path", help="override the saved config's (e.g. a local copy)")
    parser.add_argument("--llm_model_name_or_path", help="override the saved config's (e.g. a local copy)")
    parser.add_argument("--model_dtype", default="float32")
    parser.add_argument("--limit", type=int, default=None, help="every (N/limit)-th utterance, limit of them")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    model = SpeechLLM.from_pretrained(
        args.model,
        whisper_model_name_or_path=args.whisper_model_name_or_path,
        llm_model_name_or_path=args.llm_model_name_or_path,
        model_dtype=args.model_dtype,
    ).eval()
    examples = read_jsonl(args.data)
    examples = examples[:: max(1, len(examples) // args.limit)][: args.limit] if args.limit else examples
    audios = [load_example_audio(e) for e in examples]
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    swapped = list(audios)
    for a, b in zip(order[0::2], order[1::2]):  # neighbours in length trade audio (an odd last one keeps its own)
        swapped[a], swapped[b] = audios[b], audios[a]

    own, other = (
        mean_loss(model, audios, examples, args.batch_size),
        mean_loss(model, swapped, examples, args.batch_size),
    )
    print(
        f"{len(examples)} utterances  loss with own audio {own:.3f}  with another clip's {other:.3f}  "
        f"gap {other - own:.3f} nats/token"
    )


if __name__ == "__main__":
    main()
