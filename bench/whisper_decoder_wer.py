"""WER of Whisper's own decoder, on the same weights our encoder loads, for comparison with a trained projector.

python bench/whisper_decoder_wer.py --whisper PATH_OR_NAME ../shared/data/dev/data.jsonl [more.jsonl ...]
"""

import argparse
import time

import torch
import whisper

from speechllm.audio import SAMPLE_RATE
from speechllm.data import load_example_audio, read_jsonl
from speechllm.metrics import error_rate, format_error_rate
from speechllm.whisper_formats import load_whisper_model


def window(example) -> torch.Tensor:
    """The clip as one 30 s window, which is what this bench decodes: a longer clip is refused, not cut."""
    audio = load_example_audio(example)
    if len(audio) > whisper.audio.N_SAMPLES:
        raise SystemExit(f"{example.where}: {len(audio) / SAMPLE_RATE:.1f} s, over the one 30 s window decoded here")
    return whisper.pad_or_trim(torch.from_numpy(audio))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+", help="jsonl files with references")
    parser.add_argument("--whisper", required=True, help="any format speechllm loads")
    parser.add_argument("--beam_size", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=1, help="openai-whisper beam search breaks on batches > 1")
    args = parser.parse_args()

    model = load_whisper_model(args.whisper)
    dims = model.dims
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, beam_size=args.beam_size)
    for path in args.data:
        examples = read_jsonl(path)
        start, hypotheses = time.time(), []
        for i in range(0, len(examples), args.batch_size):
            audio = [window(e) for e in examples[i : i + args.batch_size]]
            mel = torch.stack([whisper.log_mel_spectrogram(a, dims.n_mels) for a in audio])
            with torch.no_grad():
                hypotheses += [r.text for r in whisper.decode(model, mel, options)]
        result = error_rate([e.txt for e in examples], hypotheses)
        print(f"{path}: {format_error_rate(result)} [{time.time() - start:.0f} s, beam {args.beam_size}]")


if __name__ == "__main__":
    main()
