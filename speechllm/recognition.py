"""Batch recognition from the command line: audio files, folders and jsonl files in, hypotheses out (stdout or a
txt/tsv/jsonl file in input order), decoded longest first, dealt out across processes, saved as they are produced
so that a rerun skips what is done."""

import hashlib
import json
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
from .hub import SAVED_FILES, hash_file, pretrained_folder
from .hypothesis import check_loop_guards
from .inputs import input_seconds, is_jsonl, load_input_audio, read_inputs
from .llama_engine import DEFAULT_WEIGHTS, ENGINES, engine_decoder, import_llama_cpp
from .llm import MODEL_DTYPES
from .metrics import error_rate, format_error_rate
from .model import SpeechLLM, SpeechLLMConfig
from .nbest import check_task_prompt
from .quantization import quantize_llm_int8
from .rescoring import GER_DECODINGS
from .results import (
    FORMATS,
    PartialResults,
    ResultsError,
    check_writable,
    format_lines,
    result_format,
    write_whole,
)

# recognize.py's beams where the engine has beam search (torch's generate); llama.cpp's engine decodes greedily.
DEFAULT_NUM_BEAMS = {"torch": 4, "llama.cpp": 1}


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
    whisper_language: str | None = field(
        default=None, metadata={"help": "error correction: the language Whisper decodes its n-best in; default: saved"}
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
    rescore_min_word_ratio: float | None = field(
        default=None,
        metadata={
            "help": "rescore: hypotheses of fewer words than this share of Whisper's first are not chosen (0: any "
            "may be); default: the saved one"
        },
    )
    second_whisper_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "rescore: a second Whisper whose n-best joins the first's and whose log-probabilities are "
            "averaged with its; '' for none; default: the saved one"
        },
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "1 is greedy; default: 4, with --engine llama.cpp 1 (it decodes greedily)"}
    )
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
            f"with the LoRA merged (default: {DEFAULT_WEIGHTS})",
        },
    )

    def check_engine(self):
        """The engine's options, before any model loads; an unset --num_beams becomes the engine's default."""
        if self.num_beams is None:
            self.num_beams = DEFAULT_NUM_BEAMS[self.engine]
        if self.engine == "torch":
            if self.gguf_weights is not None:
                raise InputError("--gguf_weights is for --engine llama.cpp")
            return
        if self.num_beams != 1:
            raise InputError(f"--engine llama.cpp decodes greedily: --num_beams must be 1, not {self.num_beams}")
        if self.llm_int8:
            raise InputError("--llm_int8 quantises the torch LLM: --engine llama.cpp runs its own (--gguf_weights)")
        import_llama_cpp()

    def check(self):
        """What is wrong whatever the model and input: checked before anything is read."""
        for name in ("batch_size", "num_beams", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name} must be at least 1, not {value}")
        if self.result_path and (os.path.isdir(self.result_path) or self.result_path.endswith(("/", os.sep))):
            raise InputError(f"--result_path {self.result_path}: a folder; give the file to write the results to")
        if self.nbest is not None and self.nbest < 0:
            raise InputError(f"--nbest must be 0 (plain recognition) or the number of hypotheses, not {self.nbest}")
        try:
            check_loop_guards(self.decoding_options())
        except ValueError as error:  # named as the flag
            raise InputError(f"--{error}") from None

    def decoding_options(self) -> dict:
        """The loop guards given on the command line; the others keep the model's own."""
        guards = {"no_repeat_ngram_size": self.no_repeat_ngram_size, "repetition_penalty": self.repetition_penalty}
        return {name: value for name, value in guards.items() if value is not None}


# Options that do not change a clip's hypothesis: a rerun may change them and still reuse saved results. The model
# is known by its files' digest (the settings' "model"), not by how its path was spelt.
NOT_IN_SETTINGS = ("data_path", "result_path", "result_format", "batch_size", "metric", "projector_model_path")
# What a saved row records of where it came from (its input's identity and source), left out of the results.
PROVENANCE = ("input", "source")


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


def model_identity(folder: str) -> str:
    """A digest of the saved model's files (config and trained weights): retrained weights written to the same
    folder are another model, whose results a rerun must not reuse."""
    digest = hashlib.sha256()
    for name in SAVED_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            digest.update(name.encode() + b"\0")
            hash_file(digest, path)
    return digest.hexdigest()


def input_identity(example) -> str:
    """What a clip's hypothesis is computed from besides the run's settings: its audio file (path, size and
    modification time, so a file replaced in place is decoded again) and its line's own prompt and cached n-best.
    Not its key: a line-number key names another clip once a line above it is added or removed."""
    wav = os.path.abspath(example.wav)
    stat = os.stat(wav)
    content = [wav, stat.st_size, stat.st_mtime_ns, example.prompt, example.nbest]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def input_source(example) -> str:
    """The file a clip was listed in: its jsonl (where is "file:line"), or the audio file itself."""
    listed_in = example.where.rpartition(":")[0] if example.where != example.wav else example.wav
    return os.path.abspath(listed_in)


def saved_task(args: RecognizeArguments) -> tuple[str, SpeechLLMConfig]:
    """The saved model's folder and its config with this run's task options, read without loading any model."""
    folder, _ = pretrained_folder(args.projector_model_path, {})
    config = SpeechLLMConfig.from_pretrained(folder)
    for name in ("nbest", "ger_decoding", "second_whisper_model_name_or_path"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return folder, config


def check_prompts(config: SpeechLLMConfig, examples, prompt: str | None, folder: str):
    """Every prompt the run would use fits the model's task (nbest.check_task_prompt), named by where it is given."""
    prompts = {"--prompt": prompt} if prompt is not None else {f"{folder}'s prompt": config.prompt}
    prompts |= {e.where: e.prompt for e in examples if e.prompt is not None}
    for where, text in prompts.items():
        try:
            check_task_prompt(config, text)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None


def reusable_rows(saved: list[dict], examples, identities: dict[str, str], result_path: str) -> dict[str, dict]:
    """key -> saved row for the clips of this run computed from the same input, matched by input_identity and given
    the clip's key. Saved rows of this run's files that match no clip are stale (the line or file changed since) and
    are decoded again; rows of another input are neither mixed in nor deleted: the run is refused."""
    by_input = {row.get("input"): row for row in saved}
    done = {e.key: {**by_input[identities[e.key]], "key": e.key} for e in examples if identities[e.key] in by_input}
    sources = {input_source(e) for e in examples}
    matched = set(identities.values())
    foreign = [row for row in saved if row.get("input") not in matched and row.get("source") not in sources]
    if foreign:
        raise ResultsError(
            f"{result_path}.part*: {len(foreign)} saved results of another input (key {foreign[0]['key']!r} from "
            f"{foreign[0].get('source')}): finish that run, write to another --result_path, or delete the part "
            "files to discard them"
        )
    return done


def parse(argv: list[str]) -> tuple[RecognizeArguments, list[str]]:
    parser = HfArgumentParser(RecognizeArguments)
    parser.add_argument("inputs", nargs="*", metavar="AUDIO|FOLDER|JSONL", help="what to transcribe")
    args, rest = parser.parse_args_into_dataclasses(argv)
    return args, rest.inputs + ([args.data_path] if args.data_path else [])


def main(argv: list[str] | None = None) -> dict | None:
    """Transcribe the inputs argv names; the score where they have references (None on the other processes)."""
    args, inputs = parse(sys.argv[1:] if argv is None else argv)
    with user_errors(InputError):
        args.check()
    state = process_state()
    try:
        return transcribe_inputs(args, inputs, state)
    finally:
        # torchrun's processes end their process group here, its threads joined, rather than leave it to the
        # interpreter's exit, which can tear the running threads down and abort (SIGABRT, "terminate called without
        # an active exception") a process whose work is done. No process waits for another: the results were
        # gathered, and nothing the main process does next involves the others.
        state.destroy_process_group()


def transcribe_inputs(args: RecognizeArguments, inputs: list[str], state: PartialState) -> dict | None:
    with user_errors(InputError):
        args.check_engine()
    with user_errors(DataError, OSError):
        examples = read_inputs(inputs)
    with user_errors(ValueError, OSError):  # before the models load: the saved model's files and every prompt
        folder, config = saved_task(args)
        check_prompts(config, examples, args.prompt, args.projector_model_path)
    fmt = result_format(args.result_path, args.result_format)
    plain = args.result_path is None and args.result_format is None and len(inputs) == 1 and len(examples) == 1
    plain = plain and not os.path.isdir(inputs[0]) and not is_jsonl(inputs[0])  # whisper's `whisper clip`

    partial, done, save = None, {}, None
    if args.result_path:
        with user_errors(ResultsError):
            check_writable(args.result_path)
        settings = {k: v for k, v in asdict(args).items() if k not in NOT_IN_SETTINGS}
        settings["model"] = model_identity(folder)
        partial = PartialResults(args.result_path, state.process_index, settings)
        identities = {e.key: input_identity(e) for e in examples}
        provenance = {e.key: {"input": identities[e.key], "source": input_source(e)} for e in examples}
        save = lambda rows: partial.add([{**row, **provenance[row["key"]]} for row in rows])  # noqa: E731
        with user_errors(ResultsError, OSError):
            done = reusable_rows(partial.rows(), examples, identities, args.result_path)
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
                whisper_language=args.whisper_language,
                ger_decoding=args.ger_decoding,
                rescore_whisper_weight=args.rescore_whisper_weight,
                rescore_min_word_ratio=args.rescore_min_word_ratio,
                second_whisper_model_name_or_path=args.second_whisper_model_name_or_path,
            )
        model.to(state.device)
        if args.llm_int8:
            with user_errors(ValueError):
                quantize_llm_int8(model.llm)
        with user_errors(InputError):
            decoder = engine_decoder(model, args.engine, args.gguf_weights)
        with user_errors(DataError, AudioError, OSError):  # OSError: the part file could not be written
            rows = recognize(
                decoder, todo, args.batch_size, args.num_beams, args.max_new_tokens, args.prompt, save,
                **args.decoding_options(),
            )  # fmt: skip
    if not state.is_main_process:
        return None

    by_key = {**done, **{row["key"]: row for row in rows}}
    results = [{k: v for k, v in by_key[e.key].items() if k not in PROVENANCE} for e in examples]
    if fmt == "jsonl":
        results = [jsonl_row(e, row) for e, row in zip(examples, results)]
    lines = [results[0]["text"]] if plain else format_lines(results, fmt)
    if args.result_path:
        with user_errors(OSError):  # the part files stay: a rerun writes the results from them
            write_whole(args.result_path, lines)
        partial.remove()
    else:
        print("\n".join(lines), flush=True)
    with user_errors(ValueError, OSError):  # e.g. references that normalise to nothing
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
