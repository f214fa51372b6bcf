r"""Speech-as-a-prompt data: each clip with one or more instructions, the LLM's own answer to the transcript as the
target (hard-target distillation), and the transcript itself, which the teacher reads with --distill_weight.

    python examples/make_speech_prompt_data.py --llm Qwen/Qwen2.5-1.5B-Instruct --system_prompt "" \
        --instruction "" --instruction "Summarise in one sentence:" --instruction "What is this about?" \
        train.jsonl speech_prompt_train.jsonl

--instruction "" (the default) makes the audio itself the instruction: prompt "<speech>", target the LLM's reply to
the transcript. Any other text is interleaved with the speech: "INSTRUCTION\n<speech>". Each input line gives one
line per instruction (keys KEY-0, KEY-1, ... when there are several), so one training set teaches several uses.
Give the --system_prompt you train with: the targets are then what the teacher answers in the same chat.
Answers go to OUTPUT.part0 as they are written; a rerun with the same options continues from there.
"""

import argparse
import json
import os
import random
from typing import NamedTuple

import torch

from speechllm import AUDIO_PLACEHOLDER
from speechllm.data import Example, read_jsonl, sentence_case
from speechllm.decoding import stop_token_ids
from speechllm.errors import run_command_line
from speechllm.llm import load_llm
from speechllm.results import PartialResults, write_whole


class Job(NamedTuple):
    key: str  # of the output line
    example: Example
    prompt: str  # the instruction with the audio's placeholder


def speech_prompt(instruction: str) -> str:
    return f"{instruction}\n{AUDIO_PLACEHOLDER}" if instruction else AUDIO_PLACEHOLDER


def llm_answers(llm, tokenizer, questions: list[str], max_new_tokens: int, system_prompt=None) -> list[str]:
    """Greedy chat answers to text questions, in left-padded batches."""
    tokenizer.padding_side = "left"
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    chats = [system + [{"role": "user", "content": q}] for q in questions]
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
    parser.add_argument(
        "--instruction", action="append", help='text before the audio, "" for a spoken instruction; repeat for more'
    )
    parser.add_argument("--system_prompt", default=None, help="the one you train with (default: the template's own)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sample", type=int, default=None, help="answer only a random sample of this many clips")
    parser.add_argument("--seed", type=int, default=0, help="of the sample")
    parser.add_argument(
        "--recase_all_caps", action="store_true", help="ALL-CAPS transcripts in sentence case, as the LLM reads text"
    )
    args = parser.parse_args(argv)

    instructions = args.instruction or [""]
    examples = read_jsonl(args.input)  # every line checked before the LLM loads
    if args.sample is not None:  # kept in input order
        chosen = random.Random(args.seed).sample(range(len(examples)), min(args.sample, len(examples)))
        examples = [examples[i] for i in sorted(chosen)]
    if args.recase_all_caps:
        for example in examples:
            example.txt = sentence_case(example.txt)
    jobs = [
        Job(example.key if len(instructions) == 1 else f"{example.key}-{i}", example, speech_prompt(instruction))
        for example in examples
        for i, instruction in enumerate(instructions)
    ]
    settings = {  # what the answers depend on; a rerun with more or fewer clips reuses those answered
        "input": os.path.abspath(args.input),
        **{name: getattr(args, name) for name in ("llm", "system_prompt", "max_new_tokens", "recase_all_caps")},
        "instructions": instructions,
    }
    partial = PartialResults(args.output, 0, settings)
    done = partial.done()  # what an interrupted run wrote
    todo = [job for job in jobs if job.key not in done]

    llm, tokenizer = load_llm(args.llm, torch.float32)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        questions = [job.prompt.replace(AUDIO_PLACEHOLDER, job.example.txt) for job in batch]
        answers = llm_answers(llm, tokenizer, questions, args.max_new_tokens, args.system_prompt)
        answered = [
            {"key": job.key, "wav": job.example.wav, "txt": answer, "prompt": job.prompt, "transcript": job.example.txt}
            for job, answer in zip(batch, answers)
        ]
        partial.add(answered)
        done |= {row["key"]: row for row in answered}
    write_whole(args.output, [json.dumps(done[job.key], ensure_ascii=False) for job in jobs])
    partial.remove()


if __name__ == "__main__":
    run_command_line(main)  # a bad jsonl line or path: one line naming it, no traceback
