"""Batch recognition from the command line: audio files, folders and jsonl files in, hypotheses out (stdout or a
txt/tsv/jsonl file in input order), decoded longest first, dealt out across processes, saved as they are produced
so that a rerun skips what is done."""

import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import HfArgumentParser

from .audio import SAMPLE_RATE, AudioError
from .data import DataError
from .errors import InputError, user_errors
from .gguf_export import WEIGHT_TYPES
from .inputs import input_seconds, load_input_audio, read_inputs
from .llama_engine import ENGINES, engine_decoder, import_llama_cpp
from .metrics import error_rate, format_error_rate
from .model import MODEL_DTYPES, SpeechLLM
from .quantization import quantize_llm_int8
from .rescoring import GER_DECODINGS
from .results import FORMATS, PartialResults, ResultsError, format_lines, result_format, write_whole


@dataclass
class RecognizeArguments:
    projector_model_path: str = field(
        metadata={"help": "a saved SpeechLLM: its folder, the folder's model.safetensors, or a hub id"}
    )
    data_path: str | None = field(
        default=None,
        metadata={"help": 'a jsonl ({"wav", "txt"?, "key"?, "prompt"?, "nbest"?} a line), as if positional'},
    )
    result_path: str | None = field(
        default=None,
        metadata={"help": "write the results here, in input order, saved as they come; without it: stdout"},
    )
    result_format: str | None = field(
        default=None,
        metadata={
            "choices": [None, *FORMATS],
            "help": "txt: key<TAB>text; tsv: a header and key, text, duration, decoding_seconds, finished; jsonl: an "
            "object a clip. Unset: result_path's suffix, else txt (the text alone for one audio file on stdout)",
        },
    )
    whisper_model_name_or_path: str | None = field(default=None, metadata={"help": "override the saved one"})
    llm_model_name_or_path: str | None = field(default=None, metadata={"help": "override the saved one"})
    model_dtype: str | None = field(default=None, metadata={"choices": [None, *MODEL_DTYPES]})
    audio_mode: str | None = field(default=None, metadata={"choices": [None, "dynamic", "window"]})
    prompt: str | None = field(default=None, metadata={"help": "override the saved prompt (a line's own wins)"})
    nbest: int | None = field(
        default=None,
        metadata={
            "help": "with --ger_decoding rescore on a recognition model: choose among Whisper's N-best, scored "
            "against the audio alone; default: the saved one"
        },
    )
    ger_decoding: str | None = field(
        default=None,
        metadata={
            "choices": [None, *GER_DECODINGS],
            "help": "error correction: generate the transcript, or rescore (choose among Whisper's hypotheses); "
            "default: the saved one",
        },
    )
    rescore_whisper_weight: float | None = field(
        default=None, metadata={"help": "rescore: the weight of Whisper's log-probability; default: the saved one"}
    )
    num_beams: int = field(default=4, metadata={"help": "1 is greedy"})
    batch_size: int = 8
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "default: enough for the longest clip; other prompts: answer_max_new_tokens"}
    )
    metric: str = field(default="wer", metadata={"choices": ["wer", "cer"]})
    no_repeat_ngram_size: int | None = field(default=None, metadata={"help": "default: the model's generation_config"})
    repetition_penalty: float | None = field(default=None, metadata={"help": "default: the model's generation_config"})
    llm_int8: bool = field(
        default=False,
        metadata={"help": "CPU: the decoding steps in int8, faster; the text changes a little (measure WER)"},
    )
    engine: str = field(
        default="torch",
        metadata={
            "choices": list(ENGINES),
            "help": "llama.cpp: the LLM runs in llama.cpp (greedy, CPU; pip install 'speechllm[llama]'), the encoder "
            "and projector in torch",
        },
    )
    gguf_weights: str | None = field(
        default=None,
        metadata={
            "choices": [None, *WEIGHT_TYPES],
            "help": "--engine llama.cpp: gguf (the LLM's own .gguf file, LoRA as an adapter), or f32/f16/q8_0 written "
            "with the LoRA merged (default: q8_0)",
        },
    )

    def check_engine(self):
        """The engine's options, before any model loads."""
        if self.engine == "torch":
            if self.gguf_weights is not None:
                raise InputError("--gguf_weights is for --engine llama.cpp")
            return
        if self.num_beams != 1:
            raise InputError(f"--engine llama.cpp decodes greedily: add --num_beams 1 (not {self.num_beams})")
        if self.llm_int8:
            raise InputError("--llm_int8 quantises the torch LLM: --engine llama.cpp runs its own (--gguf_weights)")
        import_llama_cpp()

    def decoding_options(self) -> dict:
        """The loop guards given on the command line; the others keep the model's own."""
        guards = {"no_repeat_ngram_size": self.no_repeat_ngram_size, "repetition_penalty": self.repetition_penalty}
        return {name: value for name, value in guards.items() if value is not None}


# Options that do not change a clip's hypothesis: a rerun may change them and still reuse saved results.
NOT_IN_SETTINGS = ("data_path", "result_path", "result_format", "batch_size", "metric")


def process_state() -> PartialState:
    """This process's place among torchrun's. Where torch sees no GPU, accelerate counts the processes only when told
    they run on the CPU: PartialState() alone makes every rank the main one, each decoding everything."""
    return PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))


def process_share(seconds: list[float], process_index: int, num_processes: int) -> list[int]:
    """This process's clips: longest first (little padding, memory peaks at the start), dealt out in turn, so every
    process gets the same number of clips ±1 and about the same audio, not the longest block."""
    order = sorted(range(len(seconds)), key=lambda i: -seconds[i])
    return order[process_index::num_processes]


def recognize(model, examples, batch_size=8, num_beams=4, max_new_tokens=None, prompt=None, on_batch=None, **options):
    """One result row ({key, text, duration, decoding_seconds, finished}) an example, in their order; model: a SpeechLLM
    or what decodes for it (llama_engine.engine_decoder). Each process decodes its share, and on_batch(rows) sees each
    batch's rows as soon as they are decoded. options: decode_batch's (no_repeat_ngram_size, repetition_penalty...)."""
    state = process_state()
    mine = process_share([input_seconds(e) for e in examples], state.process_index, state.num_processes)
    rows = []
    for start in tqdm(range(0, len(mine), batch_size), disable=not state.is_main_process, desc="recognize"):
        batch = [examples[i] for i in mine[start : start + batch_size]]
        audios = [load_input_audio(e) for e in batch]
        prompts = [e.prompt or prompt for e in batch]
        nbest = [e.nbest for e in batch]  # cached error correction hypotheses, if any
        hypotheses = model.decode_batch(audios, prompts, num_beams, max_new_tokens, nbest=nbest, **options)
        new = [
            {
                "key": e.key,
                "text": h.text,
                "duration": len(a) / SAMPLE_RATE,
                "decoding_seconds": round(h.decoding_seconds, 3),
                "finished": h.finished,  # False: it ran to max_new_tokens, most often a loop
            }
            for e, h, a in zip(batch, hypotheses, audios)
        ]
        if on_batch:
            on_batch(new)
        rows += new
    if state.num_processes > 1:
        rows = gather_object(rows)
    by_key = {row["key"]: row for row in rows}
    return [by_key[e.key] for e in examples]


def parse(argv: list[str]) -> tuple[RecognizeArguments, list[str]]:
    parser = HfArgumentParser(RecognizeArguments)
    parser.add_argument("inputs", nargs="*", metavar="AUDIO|FOLDER|JSONL", help="what to transcribe")
    args, rest = parser.parse_args_into_dataclasses(argv)
    return args, rest.inputs + ([args.data_path] if args.data_path else [])


def main(argv: list[str] | None = None) -> dict | None:
    args, inputs = parse(sys.argv[1:] if argv is None else argv)
    state = process_state()
    with user_errors(InputError):
        args.check_engine()
    with user_errors(DataError, OSError):
        examples = read_inputs(inputs)
    fmt = result_format(args.result_path, args.result_format)
    plain = args.result_path is None and args.result_format is None and len(inputs) == 1 and len(examples) == 1
    plain = plain and not os.path.isdir(inputs[0]) and not inputs[0].endswith(".jsonl")  # whisper's `whisper clip`

    partial, done = None, {}
    if args.result_path:
        settings = {k: v for k, v in asdict(args).items() if k not in NOT_IN_SETTINGS}
        partial = PartialResults(args.result_path, state.process_index, settings)
        keys = {e.key for e in examples}
        with user_errors(ResultsError, OSError):
            done = {key: row for key, row in partial.done().items() if key in keys}
        state.wait_for_everyone()  # every process has read the same saved results before any adds to them
        if done and state.is_main_process:
            print(f"{len(done)} of {len(examples)} clips done in {args.result_path}.part*: skipped", file=sys.stderr)
    todo = [e for e in examples if e.key not in done]

    rows = []
    if todo:
        with user_errors(ValueError, OSError):
            model = SpeechLLM.from_pretrained(
                args.projector_model_path,
                whisper_model_name_or_path=args.whisper_model_name_or_path,
                llm_model_name_or_path=args.llm_model_name_or_path,
                model_dtype=args.model_dtype,
                audio_mode=args.audio_mode,
                nbest=args.nbest,
                ger_decoding=args.ger_decoding,
                rescore_whisper_weight=args.rescore_whisper_weight,
            )
        model.to(state.device)
        if args.llm_int8:
            with user_errors(ValueError):
                quantize_llm_int8(model.llm)
        with user_errors(InputError):
            decoder = engine_decoder(model, args.engine, args.gguf_weights)
        save = partial.add if partial else None
        with user_errors(DataError, AudioError):
            rows = recognize(
                decoder, todo, args.batch_size, args.num_beams, args.max_new_tokens, args.prompt, save,
                **args.decoding_options(),
            )  # fmt: skip
    if not state.is_main_process:
        return None

    by_key = {**done, **{row["key"]: row for row in rows}}
    results = [by_key[e.key] for e in examples]
    if fmt == "jsonl":
        results = [jsonl_row(e, row) for e, row in zip(examples, results)]
    lines = [results[0]["text"]] if plain else format_lines(results, fmt)
    if args.result_path:
        write_whole(args.result_path, lines)
        partial.remove()
    else:
        print("\n".join(lines), flush=True)
    with user_errors(ValueError):  # e.g. references that normalise to nothing
        return score(examples, [row["text"] for row in results], args)


def jsonl_row(example, row: dict) -> dict:
    """A result row with the clip's file and, where the input had one, its reference."""
    reference = {"reference": example.txt} if example.txt is not None else {}
    return {"key": row["key"], "wav": os.path.abspath(example.wav), "text": row["text"], **reference, **row}


def score(examples, hypotheses, args) -> dict | None:
    """WER or CER where there are references: printed (to stderr when stdout carries the hypotheses), and written
    beside the result file."""
    references = [(e.txt, h) for e, h in zip(examples, hypotheses) if e.txt is not None]
    if not references:
        return None
    result = error_rate(*zip(*references), metric=args.metric)
    summary = format_error_rate(result)
    print(summary, file=sys.stdout if args.result_path else sys.stderr)
    if args.result_path:
        with open(args.result_path + f".{args.metric}", "w", encoding="utf-8") as file:
            file.write(summary + "\n")
    return result
