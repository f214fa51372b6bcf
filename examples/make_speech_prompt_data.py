"""Speech-as-a-prompt data, by distillation: the target is the LLM's own answer to the transcript.

    python examples/make_speech_prompt_data.py --llm Qwen/Qwen2.5-1.5B-Instruct \
        --instruction "Summarise in one sentence:" train.jsonl summary_train.jsonl

With --instruction "" the audio itself is the instruction (prompt "<speech>", target: the LLM's reply to the
transcript). Otherwise text and speech are interleaved: "INSTRUCTION\n<speech>". Training on these teaches the
projector to make the LLM answer the audio as it answers the text.
"""

import argparse
import json

import torch

from speechllm import AUDIO_PLACEHOLDER
from speechllm.data import read_jsonl
from speechllm.model import load_llm, stop_token_ids


def llm_answers(llm, tokenizer, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy chat answers to text questions, in left-padded batches."""
    tokenizer.padding_side = "left"
    chats = [[{"role": "user", "content": q}] for q in questions]
    inputs = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    stops = stop_token_ids(tokenizer, llm.generation_config)
    with torch.no_grad():
        output = llm.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        )
    return [
        t.strip() for t in tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="jsonl whose txt is the transcript")
    parser.add_argument("output")
    parser.add_argument("--llm", required=True, help="the same LLM the SpeechLLM will use")
    parser.add_argument("--instruction", default="", help='text before the audio; "" for spoken instructions')
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)

    llm, tokenizer = load_llm(args.llm, torch.float32)
    examples = read_jsonl(args.input)
    prompt = f"{args.instruction}\n{AUDIO_PLACEHOLDER}" if args.instruction else AUDIO_PLACEHOLDER
    with open(args.output, "w", encoding="utf-8") as out:
        for start in range(0, len(examples), args.batch_size):
            batch = examples[start : start + args.batch_size]
            questions = [f"{args.instruction}\n{e.txt}" if args.instruction else e.txt for e in batch]
            for example, answer in zip(batch, llm_answers(llm, tokenizer, questions, args.max_new_tokens)):
                row = {"key": example.key, "wav": example.wav, "txt": answer, "prompt": prompt}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
