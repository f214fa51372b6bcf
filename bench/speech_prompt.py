r"""Speech as a prompt: does the model answer what it hears as its LLM answers the same words given as text?

    python bench/speech_prompt.py runs/distilled ../shared/data/dev/data.jsonl \
        --whisper_model_name_or_path $W --llm_model_name_or_path $L --limit 40

For each prompt (by default a spoken-only one, "<speech>", and an interleaved summarisation one), the teacher is the
frozen LLM (LoRA adapters off) reading the chat with the transcript in place of the audio (a line's "transcript",
else its "txt"), answering greedily. Reported for the student, the same chat with the audio: its teacher-forced loss
on the teacher's answers (nats per answer token), and ROUGE-L between its greedy answer and the teacher's. --show N
prints N pairs of answers.
"""

import argparse

import torch

from speechllm import AUDIO_PLACEHOLDER, SpeechLLM
from speechllm.data import DataError, load_example_audio, read_jsonl, sentence_case
from speechllm.distill import text_batch
from speechllm.lora import lora_disabled
from speechllm.metrics import rouge_l
from speechllm.processor import IGNORE_INDEX

PROMPTS = [AUDIO_PLACEHOLDER, f"Summarise in one sentence:\n{AUDIO_PLACEHOLDER}"]


@torch.no_grad()
def teacher_answers(model: SpeechLLM, prompts, transcripts, max_new_tokens: int) -> list[str]:
    """The frozen LLM's greedy answers to the chats with each transcript in place of the audio."""
    batch = {k: v.to(model.llm.device) for k, v in text_batch(model.processor, prompts, transcripts).items()}
    with lora_disabled(model.llm):
        tokens = model.llm.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=model.processor.stop_token_ids,
            pad_token_id=model.processor.pad_token_id,
        )
    new = tokens[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in model.tokenizer.batch_decode(new, skip_special_tokens=True)]


@torch.no_grad()
def answer_loss(model: SpeechLLM, audios, prompts, answers) -> tuple[float, int]:
    """The student's summed cross-entropy on the answers given the audio, and the number of answer tokens."""
    batch = model.processor(audios, prompts, answers)
    batch = {k: v.to(model.llm.device) for k, v in batch.items()}
    tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    return model(**batch).loss.item() * tokens, tokens


def measure(model, examples, audios, prompt, batch_size, max_new_tokens) -> dict:
    total, tokens, teacher, student = 0.0, 0, [], []
    for start in range(0, len(examples), batch_size):
        chunk, clips = examples[start : start + batch_size], audios[start : start + batch_size]
        prompts = [prompt] * len(chunk)
        answers = teacher_answers(model, prompts, [transcript(e) for e in chunk], max_new_tokens)
        loss, n = answer_loss(model, clips, prompts, answers)
        total, tokens = total + loss, tokens + n
        teacher += answers
        student += model.transcribe_batch(clips, prompts, num_beams=1, max_new_tokens=max_new_tokens)
    return {"loss": total / tokens, "rouge_l": rouge_l(teacher, student), "teacher": teacher, "student": student}


def transcript(example) -> str:
    text = example.transcript if example.transcript is not None else example.txt
    if text is None:
        raise DataError(f"{example.where}: no 'transcript' (or 'txt') for the teacher to read")
    return text


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved SpeechLLM (checkpoint folder)")
    parser.add_argument("data", help="jsonl with transcripts")
    parser.add_argument("--prompt", action="append", help=f"with {AUDIO_PLACEHOLDER}; repeat (default: {PROMPTS})")
    parser.add_argument("--whisper_model_name_or_path", help="override the saved config's (e.g. a local copy)")
    parser.add_argument("--llm_model_name_or_path", help="override the saved config's (e.g. a local copy)")
    parser.add_argument("--model_dtype", default="float32")
    parser.add_argument("--limit", type=int, default=None, help="every (N/limit)-th utterance, limit of them")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--max_new_tokens", type=int, default=None, help="both answers' (default: the model's answer_max_new_tokens)"
    )
    parser.add_argument("--show", type=int, default=0, help="print this many teacher/student answer pairs a prompt")
    parser.add_argument(
        "--recase_all_caps", action="store_true", help="the teacher reads ALL-CAPS transcripts in sentence case"
    )
    args = parser.parse_args(argv)

    examples = read_jsonl(args.data, require_text=False)
    examples = examples[:: max(1, len(examples) // args.limit)][: args.limit] if args.limit else examples
    for example in examples:
        text = transcript(example)  # every line checked before the models load
        if args.recase_all_caps:
            example.transcript = sentence_case(text)
    model = SpeechLLM.from_pretrained(
        args.model,
        whisper_model_name_or_path=args.whisper_model_name_or_path,
        llm_model_name_or_path=args.llm_model_name_or_path,
        model_dtype=args.model_dtype,
    ).eval()
    max_new_tokens = args.max_new_tokens or model.config.answer_max_new_tokens
    audios = [load_example_audio(e) for e in examples]
    results = {}
    for prompt in args.prompt or PROMPTS:
        result = results[prompt] = measure(model, examples, audios, prompt, args.batch_size, max_new_tokens)
        print(
            f"{prompt!r}: {len(examples)} utterances  teacher-forced loss {result['loss']:.3f} nats/token  "
            f"ROUGE-L {result['rouge_l']:.3f}"
        )
        for example, teacher, student in list(zip(examples, result["teacher"], result["student"]))[: args.show]:
            print(f"  {example.key}\n    text:   {teacher}\n    speech: {student}")
    return results


if __name__ == "__main__":
    main()
