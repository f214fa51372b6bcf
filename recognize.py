"""Transcribe a jsonl with a trained SpeechLLM: python recognize.py --help (or torchrun --nproc_per_node=N ...)."""

from speechllm.recognition import main

if __name__ == "__main__":
    main()
