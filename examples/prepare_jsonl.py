"""Make a speechllm jsonl from a folder of audio files and a transcript table.

    python examples/prepare_jsonl.py --audio_dir corpus/wavs --transcripts corpus/text.tsv data/train.jsonl

The table has one `key<TAB>text` a line (Kaldi's `text` file, with a space instead of the tab, works too);
an audio file is matched by its name without extension. Paths are written relative to the output's folder, and
each clip's duration is recorded so length-grouped batching needs no decoding.
"""

import argparse
import json
import os
from pathlib import Path

import soundfile

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".mp3"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--audio_dir", required=True)
    parser.add_argument("--transcripts", required=True)
    args = parser.parse_args(argv)

    audio = {p.stem: p for p in Path(args.audio_dir).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES}
    out_dir = Path(args.output).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = missing = 0
    with open(args.transcripts, encoding="utf-8") as table, open(args.output, "w", encoding="utf-8") as out:
        for number, line in enumerate(table, start=1):
            if not line.strip():
                continue
            key, _, text = line.rstrip("\n").replace("\t", " ", 1).partition(" ")
            if key not in audio:
                missing += 1
                continue
            info = soundfile.info(audio[key])
            row = {
                "key": key,
                "wav": os.path.relpath(audio[key].resolve(), out_dir),
                "txt": text.strip(),
                "duration": round(info.frames / info.samplerate, 3),
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
    print(f"{args.output}: {written} utterances; {missing} transcripts without audio")


if __name__ == "__main__":
    main()
