"""Whisper's n-best as the library decodes it for error correction: time per clip, 1-best and oracle WER.

python bench/nbest_wer.py --whisper PATH_OR_NAME ../shared/data/dev/data.jsonl --limit 50 [--nbest 5]
python bench/nbest_wer.py --limit 0 dev_nbest.jsonl   # the n-best cached by examples/make_error_correction_data.py

The oracle picks, for each clip, the hypothesis with the fewest word errors: the floor any corrector choosing among
the n-best reaches. --audio_mode dynamic decodes from features of the clip's own length instead of 30 s windows
(one clip at a time, as the decoder has no key mask), to measure whether Whisper's decoder can read them.
"""

import argparse
import time

import torch
from whisper.normalizers import EnglishTextNormalizer

from speechllm.audio import ENCODER_STRIDE, SAMPLE_RATE, log_mel_batch
from speechllm.data import load_example_audio, read_jsonl
from speechllm.encoder import load_whisper_encoder
from speechllm.metrics import error_rate, format_error_rate, word_errors
from speechllm.nbest import decode_nbest, load_whisper_decoder


def decode(args, examples):
    """Each example's n-best decoded here, the CPU time it took and the seconds of audio."""
    encoder, decoder = load_whisper_encoder(args.whisper), load_whisper_decoder(args.whisper)
    audios = [load_example_audio(e) for e in examples]
    start, nbest = time.process_time(), []
    for i in range(0, len(audios), args.batch_size):
        batch = audios[i : i + args.batch_size]
        if args.audio_mode == "window":
            nbest += decode_nbest(encoder, decoder, args.nbest, batch)[0]
        else:
            for audio in batch:
                mel, frames = log_mel_batch([audio], encoder.dims.n_mels, ENCODER_STRIDE)
                with torch.no_grad():
                    nbest += decoder(encoder(mel, frames), args.nbest)
    return nbest, time.process_time() - start, sum(len(a) for a in audios) / SAMPLE_RATE


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="jsonl with references (and, without --whisper, its cached n-best)")
    parser.add_argument("--whisper", help="any format speechllm loads; omitted: the jsonl's cached n-best")
    parser.add_argument("--nbest", type=int, default=5, help="beam size and most hypotheses kept")
    parser.add_argument("--limit", type=int, default=50, help="this many clips, evenly spaced over the file; 0: all")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--audio_mode", default="window", choices=["window", "dynamic"])
    args = parser.parse_args()

    examples = [e for e in read_jsonl(args.data) if e.txt.strip()]
    if args.limit:
        examples = examples[:: max(1, len(examples) // args.limit)][: args.limit]  # spread over the whole set
    if args.whisper:
        nbest, cpu, seconds = decode(args, examples)
        print(
            f"{args.data}: {len(examples)} clips, {seconds:.0f} s of audio, {args.audio_mode} features, "
            f"beam {args.nbest}"
        )
        print(f"CPU time {cpu:.1f} s: {cpu / len(examples):.2f} s a clip, {seconds / cpu:.1f}x real time")
    else:
        if any(e.nbest is None for e in examples):
            raise SystemExit(f"{args.data}: a line has no cached n-best: give --whisper to decode them")
        nbest = [e.nbest[: args.nbest] for e in examples]
        print(f"{args.data}: {len(examples)} clips, cached n-best (first {args.nbest})")
    references = [e.txt for e in examples]
    oracle = [min(h, key=lambda text: word_errors(r, text)) for r, h in zip(references, nbest)]
    print(f"distinct hypotheses a clip: {sum(map(len, nbest)) / len(nbest):.2f} (fewest {min(map(len, nbest))})")
    normalize = EnglishTextNormalizer()
    distinct = sum(len({normalize(text) for text in hypotheses}) for hypotheses in nbest) / len(nbest)
    print(f"distinct after Whisper's normaliser: {distinct:.2f}")
    print(f"1-best: {format_error_rate(error_rate(references, [h[0] for h in nbest]))}")
    print(f"oracle: {format_error_rate(error_rate(references, oracle))}")


if __name__ == "__main__":
    main()
