"""Transcribe audio files, folders or jsonl files with a trained SpeechLLM: python recognize.py --help
(or torchrun --nproc_per_node=N recognize.py ...)."""

from speechllm.recognition import main

if __name__ == "__main__":
    main()
