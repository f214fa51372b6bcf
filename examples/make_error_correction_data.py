"""Generative error correction data: show the LLM Whisper's n-best hypotheses together with the audio.

    python examples/make_error_correction_data.py --whisper tiny.en --nbest 5 train.jsonl ger_train.jsonl

Each output line keeps wav and txt (the reference) and gets a prompt that lists Whisper's beam-search
hypotheses around the audio placeholder; train.py and recognize.py read it as any other jsonl.
"""

import argparse
import json

import torch
import whisper

from speechllm import AUDIO_PLACEHOLDER
from speechllm.audio import load_audio
from speechllm.data import read_jsonl
from speechllm.whisper_formats import load_whisper_model


def error_correction_prompt(hypotheses: list[str]) -> str:
    listed = "\n".join(f"{i}. {text}" for i, text in enumerate(hypotheses, start=1))
    return f"Speech recognition hypotheses:\n{listed}\n{AUDIO_PLACEHOLDER}\nWrite the correct transcript of the audio."


class _KeepCandidates(whisper.decoding.MaximumLikelihoodRanker):
    """Whisper's ranker, remembering every finished beam so the n-best list can be read back."""

    def rank(self, tokens, sum_logprobs):
        self.candidates = tokens, sum_logprobs
        return super().rank(tokens, sum_logprobs)


def whisper_nbest(model, tokenizer, mel: torch.Tensor, n: int) -> list[str]:
    """Whisper's n best distinct hypotheses for one clip, best first."""
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, beam_size=n)
    task = whisper.decoding.DecodingTask(model, options)
    task.sequence_ranker = ranker = _KeepCandidates(options.length_penalty)
    task.run(mel[None])
    (tokens,), (scores,) = ranker.candidates
    ranked = sorted(zip(scores, tokens), key=lambda pair: -pair[0] / max(len(pair[1]), 1))
    texts = [tokenizer.decode(t.tolist()).strip() for _, t in ranked]
    return list(dict.fromkeys(texts))[:n]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--whisper", required=True, help="any format speechllm loads")
    parser.add_argument("--nbest", type=int, default=5)
    args = parser.parse_args(argv)

    model = load_whisper_model(args.whisper)
    dims = model.dims
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, language="en", task="transcribe")
    with open(args.output, "w", encoding="utf-8") as out:
        for example in read_jsonl(args.input):
            audio = whisper.pad_or_trim(torch.from_numpy(load_audio(example.wav)))
            with torch.no_grad():
                hypotheses = whisper_nbest(
                    model, tokenizer, whisper.log_mel_spectrogram(audio, dims.n_mels), args.nbest
                )
            row = {
                "key": example.key,
                "wav": example.wav,
                "txt": example.txt,
                "prompt": error_correction_prompt(hypotheses),
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
