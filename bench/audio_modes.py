"""Window vs dynamic audio mode on real speech: encoder speed, and how good each mode's features are.

    python bench/audio_modes.py --whisper PATH_OR_NAME ../shared/data/dev/data.jsonl

Quality is read through Whisper's own decoder (greedy): the WER it reaches from each mode's encoder output.
Window mode is Whisper's native input (30 s, silence-padded); dynamic mode encodes only the real frames.
"""

import argparse
import math
import time

import torch
import whisper

from speechllm.audio import ENCODER_STRIDE, load_audio, log_mel_batch
from speechllm.data import read_jsonl
from speechllm.encoder import WhisperEncoder
from speechllm.metrics import error_rate, format_error_rate
from speechllm.whisper_formats import load_whisper_model


def greedy(model, tokenizer, features, max_tokens=120):
    tokens = torch.tensor([list(tokenizer.sot_sequence_including_notimestamps)])
    for _ in range(max_tokens):
        next_token = model.decoder(tokens, features)[0, -1].argmax()
        if next_token == tokenizer.eot:
            break
        tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    return tokenizer.decode(tokens[0, len(tokenizer.sot_sequence_including_notimestamps) :].tolist())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--whisper", required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--kernel_size", type=int, default=5, help="the projector's, for dynamic padding")
    parser.add_argument("--limit", type=int, default=None, help="first N utterances only")
    args = parser.parse_args()

    model = load_whisper_model(args.whisper)
    dims = model.dims
    encoder = WhisperEncoder(dims).eval()  # ours, on the same weights: the checkpoint is read once
    encoder.load_state_dict(model.encoder.state_dict())
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, language="en", task="transcribe")
    examples = sorted(read_jsonl(args.data)[: args.limit], key=lambda e: e.duration or 0)
    audios = [load_audio(e.wav) for e in examples]
    seconds = sum(len(a) for a in audios) / 16000

    for mode, pad_to in (("window", None), ("dynamic", ENCODER_STRIDE * args.kernel_size)):
        encode_time, hypotheses = 0.0, []
        for i in range(0, len(audios), args.batch_size):
            mel, frames = log_mel_batch(audios[i : i + args.batch_size], dims.n_mels, pad_to)
            start = time.perf_counter()
            with torch.no_grad():
                features = encoder(mel, frames)
            encode_time += time.perf_counter() - start
            real = [math.ceil(n / ENCODER_STRIDE) for n in frames.tolist()]
            with torch.no_grad():
                hypotheses += [greedy(model, tokenizer, features[j : j + 1, : real[j]]) for j in range(len(real))]
        result = error_rate([e.txt for e in examples], hypotheses)
        print(
            f"{mode:8s} encoder {encode_time:6.1f} s for {seconds:.0f} s of audio "
            f"({seconds / encode_time:.0f}x real time, batch {args.batch_size}, {torch.get_num_threads()} threads); "
            f"Whisper decoder on these features: {format_error_rate(result)}"
        )


if __name__ == "__main__":
    main()
