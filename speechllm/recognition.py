"""Batch recognition of a jsonl: sorted by length for speed, split across processes, written back in input order."""

import os
import sys
from dataclasses import dataclass, field

from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import HfArgumentParser

from .data import load_example_audio, read_jsonl
from .metrics import error_rate, format_error_rate
from .model import SpeechLLM


@dataclass
class RecognizeArguments:
    projector_model_path: str = field(metadata={"help": "a folder written by train.py / save_pretrained"})
    data_path: str = field(metadata={"help": 'jsonl: {"wav", "txt"?, "key"?, "prompt"?, "nbest"?} a line'})
    result_path: str = field(metadata={"help": "where to write key<TAB>hypothesis lines, in input order"})
    whisper_model_name_or_path: str | None = field(default=None, metadata={"help": "override the saved one"})
    llm_model_name_or_path: str | None = field(default=None, metadata={"help": "override the saved one"})
    model_dtype: str | None = field(default=None, metadata={"choices": [None, "bfloat16", "float16", "float32"]})
    audio_mode: str | None = field(default=None, metadata={"choices": [None, "dynamic", "window"]})
    prompt: str | None = field(default=None, metadata={"help": "override the saved prompt (a line's own wins)"})
    num_beams: int = field(default=4, metadata={"help": "1 is greedy"})
    batch_size: int = 8
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "default: enough for the longest clip; other prompts: answer_max_new_tokens"}
    )
    metric: str = field(default="wer", metadata={"choices": ["wer", "cer"]})


def recognize(model: SpeechLLM, examples, batch_size=8, num_beams=4, max_new_tokens=None, prompt=None) -> list[str]:
    """Hypotheses for examples, in their order, decoded by this process's share of them."""
    state = PartialState()
    # Longest first: batches of similar length waste little padding, and memory peaks at the start.
    order = sorted(range(len(examples)), key=lambda i: -(examples[i].duration or os.path.getsize(examples[i].wav)))
    with state.split_between_processes(order) as mine:
        results = []
        for start in tqdm(range(0, len(mine), batch_size), disable=not state.is_main_process, desc="recognize"):
            batch = [examples[i] for i in mine[start : start + batch_size]]
            audios = [load_example_audio(e) for e in batch]
            prompts = [e.prompt or prompt for e in batch]
            nbest = [e.nbest for e in batch]  # cached error correction hypotheses, if any
            texts = model.transcribe_batch(audios, prompts, num_beams, max_new_tokens, nbest=nbest)
            results += zip(mine[start : start + batch_size], texts)
    if state.num_processes > 1:
        results = gather_object(results)
    hypotheses = dict(results)
    return [hypotheses[i] for i in range(len(examples))]


def write_results(path: str, keys: list[str], hypotheses: list[str]):
    """Written whole, then renamed, so a failed run never leaves a half-written result file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        for key, text in zip(keys, hypotheses):
            file.write(f"{key}\t{' '.join(text.split())}\n")
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> dict | None:
    (args,) = HfArgumentParser(RecognizeArguments).parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    examples = read_jsonl(args.data_path, require_text=False)
    model = SpeechLLM.from_pretrained(
        args.projector_model_path,
        whisper_model_name_or_path=args.whisper_model_name_or_path,
        llm_model_name_or_path=args.llm_model_name_or_path,
        model_dtype=args.model_dtype,
        audio_mode=args.audio_mode,
    )
    state = PartialState()
    model.to(state.device)
    hypotheses = recognize(model, examples, args.batch_size, args.num_beams, args.max_new_tokens, args.prompt)
    if not state.is_main_process:
        return None
    write_results(args.result_path, [e.key for e in examples], hypotheses)
    references = [(e.txt, h) for e, h in zip(examples, hypotheses) if e.txt is not None]
    if not references:
        return None
    result = error_rate(*zip(*references), metric=args.metric)
    summary = format_error_rate(result)
    print(summary)
    with open(args.result_path + f".{args.metric}", "w", encoding="utf-8") as file:
        file.write(summary + "\n")
    return result
