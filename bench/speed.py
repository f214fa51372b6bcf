r"""Speed of recognition and training, and how far each phase is from what this machine's hardware allows.

    python bench/speed.py ../shared/data/dev/data.jsonl --whisper_model_name_or_path $W --llm_model_name_or_path $L \
        --limit 8 --threads 2 --json runs/speed.json

The same run first measures the machine: its matmul rate (a square matmul in the model's dtype, GFLOP/s) and its
memory read bandwidth (summing a buffer far larger than the caches, GB/s). Then, for each recognition setting
(batch 1 and --batch_size, greedy and --num_beams, dynamic and window audio), it decodes the clips and splits the
time by phase with forward hooks: the encoder, the LLM's prompt pass, its decoding steps, and the rest (features,
the projector, the generate loop's own Python). Each phase has a floor, the time the hardware needs for its useful
work (real tokens only: no padding, no repeated beams):
- encoder and prompt pass: their FLOPs / the matmul rate;
- a decoding step: the larger of the bytes it must read (every linear weight of the LLM once, and every row's
  keys and values) / the bandwidth, and its FLOPs / the matmul rate.
"% limit" is floor / measured. Training runs a few Trainer steps and gets the same against its FLOPs (forward,
the gradient through every LLM layer back to the projector, the trained weights' gradients).

--clock process times with the process's CPU time instead of the wall clock: with --threads 1 on a machine that
another job keeps busy, that is close to the wall time the same run would take on a quiet one.
--quick is a smoke test (2 clips, a few tokens, one training step timed) for tiny models.

--engine llama.cpp decodes with the LLM in llama.cpp (llama_engine.py; greedy settings only, --gguf_weights picks its
weights): its phases are timed around each llama_decode call, and a step's floor reads the GGUF file's weights (as
stored: Q4_1, Q8_0, f16...) and its f16 (f32 for f32 weights) keys and values. --engine both runs the torch settings,
then the llama.cpp ones, in one run on one machine.
"""

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import sys
import tempfile
import threading
import time

import gguf
import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from speechllm import SpeechLLM
from speechllm.audio import ENCODER_STRIDE, SAMPLE_RATE, num_frames, split_windows
from speechllm.data import Collator, SpeechDataset, load_example_audio, read_jsonl
from speechllm.gguf_export import WEIGHT_TYPES
from speechllm.llama_engine import LlamaCppDecoder, engine_decoder
from speechllm.quantization import Int8StepLinear, quantize_llm_int8
from speechllm.training import AUTO, SpeechLLMTrainer, SpeechTrainingArguments

QUICK = {"limit": 2, "batch_size": 2, "max_new_tokens": 4, "train_steps": 2, "train_batch_size": 2}
MATMUL_SIZE = {"full": 2048, "quick": 256}  # square matmul for the rate: large enough to reach the kernel's peak
BANDWIDTH_MIB = {"full": 1024, "quick": 64}  # buffer for the bandwidth: much larger than the last-level cache
REPEATS = {"full": 5, "quick": 2}  # best of: the machine's rates are its best, not its average


# --- clocks and memory ------------------------------------------------------------------------------------------


class Clock:
    """Wall or process-CPU seconds, after waiting for the device (hooks time asynchronous GPU work right)."""

    def __init__(self, kind: str, device: torch.device):
        self.read = time.perf_counter if kind == "wall" else time.process_time
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.synchronize()
        return self.read()

    def best(self, work, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            start = self()
            work()
            times.append(self() - start)
        return min(times)


def resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory during a block: on CUDA the allocator's peak; on CPU the process's resident set, polled (freed
    heap is handed back to the system first, so one setting's peak does not carry into the next)."""

    POLL_SECONDS = 0.002

    def __init__(self, device: torch.device):
        self.device, self.peak, self._running = device, 0, False

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.peak, self._running = resident_bytes(), True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while self._running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.POLL_SECONDS)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self.peak, resident_bytes())


# --- the machine ------------------------------------------------------------------------------------------------


def machine_rates(clock: Clock, device, dtype, size: int, mebibytes: int, repeats: int) -> dict:
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    matmul = 2 * size**3 / clock.best(lambda: a @ b, repeats)
    buffer = torch.ones(mebibytes * 2**20 // 4, dtype=torch.float32, device=device)
    bandwidth = buffer.numel() * buffer.element_size() / clock.best(buffer.sum, repeats)
    return {"matmul_flops": matmul, "read_bytes_per_s": bandwidth}


# --- what each phase must do ------------------------------------------------------------------------------------


def linear_weights(module: nn.Module, skip=()) -> tuple[int, int]:
    """(parameters, bytes) of the linear layers' weights in module (of the int8 copy where there is one)."""
    params = nbytes = 0
    skipped = {id(m) for s in skip for m in s.modules()}
    for layer in module.modules():
        if id(layer) in skipped:
            continue
        if isinstance(layer, Int8StepLinear):  # a decoding step reads its int8 copy only
            skipped.add(id(layer.linear))
            weight = layer.int8.weight()
        elif isinstance(layer, nn.Linear):
            weight = layer.weight
        else:
            continue
        params, nbytes = params + weight.numel(), nbytes + weight.numel() * weight.element_size()
    return params, nbytes


class Costs:
    """FLOPs and bytes of useful work, from the models' own sizes (2 FLOPs a weight a token; attention 4 FLOPs per
    head dimension per query-key pair: scores and the weighted sum)."""

    def __init__(self, model: SpeechLLM):
        llm, config = model.llm, model.llm.config
        output = llm.get_output_embeddings()
        self.layers, self.heads = config.num_hidden_layers, config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.linear_params, linear_bytes = linear_weights(llm, skip=[output])
        self.output_params, output_bytes = linear_weights(output)
        self.weight_bytes = linear_bytes + output_bytes  # what one decoding step reads, whatever its batch
        self.kv_itemsize = llm.get_input_embeddings().weight.dtype.itemsize
        self.kv_bytes_per_position = 2 * self.layers * config.num_key_value_heads * self.head_dim * self.kv_itemsize
        encoder = model.encoder
        self.encoder_layers, self.encoder_dim = len(encoder.blocks), encoder.dims.n_audio_state
        self.encoder_block_params, _ = linear_weights(encoder.blocks)
        self.conv_params = (encoder.conv1.weight.numel(), encoder.conv2.weight.numel())
        self.trained_linear_params = sum(
            p.numel() for n, p in llm.named_parameters() if p.requires_grad and p.ndim == 2
        )  # LoRA's matrices, when there are any
        self.projector_params = sum(p.numel() for p in model.projector.parameters())

    def for_engine(self, decoder: LlamaCppDecoder) -> "Costs":
        """The same work, with what a llama.cpp decoding step reads: the GGUF files' weights as stored (the token
        embedding only where it is also the output layer) and its keys and values (f16, or f32 beside f32 weights)."""
        costs = copy.copy(self)
        files = [gguf.GGUFReader(path) for path in decoder.llm.files if path]
        names = {t.name for t in files[0].tensors}
        costs.weight_bytes = sum(
            int(t.n_bytes)
            for reader in files
            for t in reader.tensors
            if len(t.shape) > 1 and (t.name != "token_embd.weight" or "output.weight" not in names)
        )
        kv_itemsize = 4 if decoder.llm.f32_cache else 2
        costs.kv_bytes_per_position = self.kv_bytes_per_position // self.kv_itemsize * kv_itemsize
        return costs

    def attention_flops(self, query_key_pairs: int) -> int:
        return 4 * self.layers * self.heads * self.head_dim * query_key_pairs

    def prompt_flops(self, lengths: list[int]) -> int:
        """A causal pass over rows of these real lengths, logits at the last position only (as generate asks)."""
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        return (
            2 * self.linear_params * sum(lengths) + self.attention_flops(pairs) + 2 * self.output_params * len(lengths)
        )

    def step_flops(self, contexts: list[int]) -> int:
        return 2 * (self.linear_params + self.output_params) * len(contexts) + self.attention_flops(sum(contexts))

    def step_bytes(self, contexts: list[int]) -> int:
        return self.weight_bytes + self.kv_bytes_per_position * sum(contexts)

    def encoder_flops(self, window_frames: list[int]) -> int:
        """Whisper's encoder over windows of these mel frame counts."""
        total = 0
        for frames in window_frames:
            positions = math.ceil(frames / ENCODER_STRIDE)
            total += 2 * (self.conv_params[0] * frames + self.conv_params[1] * positions)
            total += (
                2 * self.encoder_block_params * positions + 4 * self.encoder_layers * self.encoder_dim * positions**2
            )
        return total


def real_frames(audios) -> list[int]:
    """Each 30 s window's real mel frames: window mode also encodes the silence up to 30 s, which is its waste."""
    return [num_frames(len(window)) for audio in audios for window in split_windows(audio)]


# --- what each phase did ----------------------------------------------------------------------------------------


class Phases:
    """Every encoder and LLM call while active, from forward hooks: seconds, and for the LLM each row's real length
    (attention mask) and how many new positions it computed."""

    def __init__(self, model: SpeechLLM, clock: Clock, decoder=None):
        self.model, self.clock, self.calls, self._handles = model, clock, [], []
        self.engine = decoder.llm if isinstance(decoder, LlamaCppDecoder) else None  # the llama.cpp side

    def __enter__(self):
        modules = [("encoder", self.model.encoder)] + ([] if self.engine else [("llm", self.model.llm)])
        for name, module in modules:
            self._handles.append(module.register_forward_pre_hook(self._start, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._stopper(name), with_kwargs=True))
        if self.engine:
            self.engine._decode = self._timed(self.engine._decode)
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.engine:
            del self.engine._decode  # the class's own again

    def _timed(self, decode):
        """llama.cpp's calls: a prompt pass feeds embeddings (each clip's, or the shared prefix once), a step tokens,
        one a clip, each at its position (so the clip's real length is the position + 1)."""

        def timed(sequences, positions, want_logits, embeddings=None, tokens=None):
            started = self.clock()
            logits = decode(sequences, positions, want_logits, embeddings, tokens)
            call = {"phase": "prompt" if embeddings is not None else "step", "seconds": self.clock() - started}
            call |= {"new": len(sequences), "lengths": (np.asarray(positions) + 1).tolist()}
            self.calls.append(call)
            return logits

        return timed

    def _start(self, module, args, kwargs):
        self._started = self.clock()

    def _stopper(self, name):
        def stop(module, args, kwargs, output):
            call = {"phase": name, "seconds": self.clock() - self._started}
            if name == "encoder":
                call["frames"] = args[1].tolist()  # (mel, mel_frames)
            else:
                embeds = kwargs.get("inputs_embeds")
                rows, positions = (embeds if embeds is not None else kwargs["input_ids"]).shape[:2]
                call |= {"new": positions, "lengths": real_lengths(kwargs, rows, positions)}
                call["phase"] = "prompt" if embeds is not None else "step"  # a step feeds the last token's id
            self.calls.append(call)

        return stop

    def seconds(self, phase: str) -> float:
        return sum(c["seconds"] for c in self.calls if c["phase"] == phase)

    def of(self, phase: str) -> list[dict]:
        return [c for c in self.calls if c["phase"] == phase]


def real_lengths(llm_kwargs: dict, rows: int, positions: int) -> list[int]:
    """Each row's real positions so far: its attention mask, or (generate leaves out a mask of all ones) the cache's
    length, which the forward has already extended by the new positions."""
    mask, cache = llm_kwargs.get("attention_mask"), llm_kwargs.get("cache")
    if mask is not None:
        return mask.sum(-1).tolist()
    return [cache.get_seq_length() if cache is not None else positions] * rows


def fraction(floor: float, measured: float) -> float | None:
    return floor / measured if measured > 0 else None


# --- recognition ------------------------------------------------------------------------------------------------


def recognition(
    model, decoder, audios, costs, rates, clock, *, batch_size, num_beams, audio_mode, max_new_tokens
) -> dict:
    model.processor.audio_mode = audio_mode
    order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))  # longest first, as recognize.py decodes
    prompt_lengths = [int(model.processor([audio], [None])["attention_mask"].sum()) for audio in audios]
    hypotheses = []
    with PeakMemory(model.llm.device) as memory, Phases(model, clock, decoder) as phases:
        start = clock()
        for first in range(0, len(order), batch_size):
            batch = [audios[i] for i in order[first : first + batch_size]]
            hypotheses += decoder.decode_batch(batch, num_beams=num_beams, max_new_tokens=max_new_tokens)
        total = clock() - start
    audio_seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    flops, bandwidth = rates["matmul_flops"], rates["read_bytes_per_s"]

    prompts, steps = phases.of("prompt"), phases.of("step")
    prompt_floor = costs.prompt_flops(prompt_lengths) / flops  # each clip's prompt once, whatever the beams
    step_floors = [
        max(costs.step_bytes(c["lengths"]) / bandwidth, costs.step_flops(c["lengths"]) / flops) for c in steps
    ]
    encoder_floor = costs.encoder_flops(real_frames(audios)) / flops
    row_steps = sum(len(c["lengths"]) for c in steps)
    # Greedy: a row is useful until its stop token (the prompt pass wrote its first token).
    useful_row_steps = sum(len(h.token_ids) + h.finished - 1 for h in hypotheses) if num_beams == 1 else None
    step_seconds = phases.seconds("step")
    return {
        "engine": "llama.cpp" if phases.engine else "torch",
        "batch_size": batch_size,
        "num_beams": num_beams,
        "audio_mode": audio_mode,
        "clips": len(audios),
        "audio_seconds": audio_seconds,
        "seconds": total,
        "rtf": total / audio_seconds,
        "peak_memory_bytes": memory.peak,
        "encoder": {"seconds": phases.seconds("encoder"), "floor_seconds": encoder_floor},
        "prompt": {"seconds": phases.seconds("prompt"), "floor_seconds": prompt_floor, "calls": len(prompts)},
        "steps": {
            "seconds": step_seconds,
            "floor_seconds": sum(step_floors),
            "count": len(steps),
            "mean_seconds": step_seconds / len(steps) if steps else None,
            "row_steps": row_steps,
            "useful_row_fraction": useful_row_steps / row_steps if useful_row_steps is not None and row_steps else None,
        },
        "other_seconds": total - phases.seconds("encoder") - phases.seconds("prompt") - step_seconds,
        "generated_tokens": sum(len(h.token_ids) for h in hypotheses),
        "unfinished": sum(not h.finished for h in hypotheses),
    }


# --- training ---------------------------------------------------------------------------------------------------


class StepTimes(TrainerCallback):
    def __init__(self, clock: Clock):
        self.clock, self.seconds = clock, []

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(self.clock() - self._started)


def training(
    model, data_path, examples, costs, rates, clock, *, batch_size, steps, warmup_steps, bf16, encoder_cache, sampling
) -> dict:
    dataset = SpeechDataset(data_path)
    dataset.examples = examples
    step_times = StepTimes(clock)
    with tempfile.TemporaryDirectory() as output_dir:
        args = SpeechTrainingArguments(  # train.py's defaults: length-grouped batches, bf16 where native
            output_dir=output_dir,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            use_cpu=model.llm.device.type == "cpu",
            seed=0,
            bf16=bf16,
            train_sampling_strategy=sampling,
        )
        trainer = SpeechLLMTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=Collator(model.processor),
            callbacks=[step_times],
            encoder_cache_dir=os.path.join(output_dir, "encoder_cache") if encoder_cache else None,
        )
        with PeakMemory(model.llm.device) as memory, Phases(model, clock) as phases:
            trainer.train()
    timed = step_times.seconds[warmup_steps:]
    calls = phases.of("prompt")[warmup_steps:]  # one LLM forward a training step
    tokens = [sum(c["lengths"]) for c in calls]
    # Forward, then the gradient of every LLM layer's input (it flows back to the projector), then the trained
    # weights' own gradients; the output layer runs on the answer columns only (logits_to_keep), left out here.
    llm_flops = sum(
        2 * costs.prompt_flops(c["lengths"]) + 2 * costs.trained_linear_params * n for c, n in zip(calls, tokens)
    )
    audio_tokens = sum(tokens)  # an upper bound on the projector's positions: it is small either way
    encoder_flops = sum(costs.encoder_flops(c["frames"]) for c in phases.of("encoder")[warmup_steps:])
    flops = llm_flops + 6 * costs.projector_params * audio_tokens + encoder_flops
    seconds = sum(timed)
    return {
        "batch_size": batch_size,
        "bf16": trainer.args.bf16,
        "encoder_cache": encoder_cache,
        "sampling": trainer.args.train_sampling_strategy,
        "steps_timed": len(timed),
        "seconds_per_step": seconds / len(timed),
        "utterances_per_second": batch_size * len(timed) / seconds,
        "peak_memory_bytes": memory.peak,
        "floor_seconds_per_step": flops / rates["matmul_flops"] / len(timed),
        "llm_tokens_per_step": sum(tokens) / len(timed),
    }


# --- report -----------------------------------------------------------------------------------------------------


def percent(phase: dict) -> str:
    share = fraction(phase["floor_seconds"], phase["seconds"])
    return f"{phase['seconds']:.2f} s ({100 * share:.0f}%)" if share is not None else "-"


def table(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"machine: {machine['threads']} threads on {machine['device']}, {machine['dtype']}, {machine['clock']} clock: "
        f"matmul {machine['matmul_flops'] / 1e9:.0f} GFLOP/s, memory read {machine['read_bytes_per_s'] / 1e9:.1f} GB/s",
        "",
        "| engine | audio | batch | beams | RTF | peak memory | encoder (% limit) | prompt pass (% limit) | steps "
        "| ms/step (% limit) | rows useful | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["recognition"]:
        steps = r["steps"]
        step = "-"
        if steps["count"]:
            step = (
                f"{1e3 * steps['mean_seconds']:.1f} ({100 * fraction(steps['floor_seconds'], steps['seconds']):.0f}%)"
            )
        useful = f"{100 * steps['useful_row_fraction']:.0f}%" if steps["useful_row_fraction"] is not None else "-"
        lines.append(
            f"| {r['engine']} | {r['audio_mode']} | {r['batch_size']} | {r['num_beams']} | {r['rtf']:.3f} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} GB | {percent(r['encoder'])} | {percent(r['prompt'])} | "
            f"{steps['count']} | {step} | {useful} | {r['other_seconds']:.2f} s |"
        )
    train = result["training"]
    if train is not None:
        cache = ", encoder cache" if train["encoder_cache"] else ""
        lines += ["", f"training: bf16 autocast {train['bf16']}, {train['sampling']} batches{cache}"]
        share = train["floor_seconds_per_step"] / train["seconds_per_step"]
        lines += [
            "",
            "| training batch | utterances/s | s/step (% limit) | peak memory |",
            "|---|---|---|---|",
            f"| {train['batch_size']} | {train['utterances_per_second']:.3f} | {train['seconds_per_step']:.2f} "
            f"({100 * share:.0f}%) | {train['peak_memory_bytes'] / 2**30:.2f} GB |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="jsonl with references (training reads its txt)")
    parser.add_argument("--model", default="examples/tiny_en_smollm2", help="a saved SpeechLLM folder")
    parser.add_argument("--whisper_model_name_or_path", help="override the saved config's (e.g. a local copy)")
    parser.add_argument("--llm_model_name_or_path", help="override the saved config's (e.g. a local copy)")
    parser.add_argument("--model_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--llm_int8", action="store_true", help="the LLM's linear layers in int8 (CPU; no training)")
    parser.add_argument("--limit", type=int, default=8, help="first N utterances")
    parser.add_argument("--batch_size", type=int, default=8, help="the batched settings' batch (and batch 1)")
    parser.add_argument("--num_beams", type=int, default=4, help="the beam settings' beams (and greedy)")
    parser.add_argument("--audio_modes", default="dynamic,window", help="'': no recognition, training only")
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--train_steps", type=int, default=4, help="the warm-up steps included; 0: no training")
    parser.add_argument(
        "--train_warmup_steps", type=int, default=1, help="training steps not timed (an epoch's: the same clips timed)"
    )
    parser.add_argument(
        "--train_bf16", default="auto", choices=["auto", "true", "false"], help="train.py's --bf16 (default: auto)"
    )
    parser.add_argument(
        "--train_sampling_strategy",
        default="group_by_length",
        choices=["group_by_length", "random"],
        help="train.py's (group_by_length groups nothing below --limit of 8 batches: HF sorts within 4 megabatches)",
    )
    parser.add_argument(
        "--train_encoder_cache",
        action="store_true",
        help="train.py's --encoder_cache_dir (a fresh one): time the steps after the first epoch, which fills it",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--engine", default="torch", choices=["torch", "llama.cpp", "both"], help="llama.cpp: greedy settings only"
    )
    parser.add_argument("--gguf_weights", choices=WEIGHT_TYPES, help="llama.cpp's weights (default: llama_engine's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    size = "quick" if args.quick else "full"
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = SpeechLLM.from_pretrained(
        args.model,
        whisper_model_name_or_path=args.whisper_model_name_or_path,
        llm_model_name_or_path=args.llm_model_name_or_path,
        model_dtype=args.model_dtype,
    ).to(device)
    if args.llm_int8:
        quantize_llm_int8(model.llm)
    model.eval()
    examples = read_jsonl(args.data)[: args.limit]
    audios = [load_example_audio(e) for e in examples]
    clock = Clock(args.clock, device)
    dtype = getattr(torch, args.model_dtype)
    rates = machine_rates(clock, device, dtype, MATMUL_SIZE[size], BANDWIDTH_MIB[size], REPEATS[size])
    costs = Costs(model)
    if args.audio_modes:
        model.decode_batch(audios[:1], max_new_tokens=2)  # warm-up: thread pools, allocator, the prompt's tokens

    engines = ["torch", "llama.cpp"] if args.engine == "both" else [args.engine]
    engines = engines if args.audio_modes else []  # --audio_modes '': training only
    recognitions, gguf_weights = [], None
    for engine in engines:
        decoder = engine_decoder(model, engine, args.gguf_weights, threads=torch.get_num_threads())
        if engine == "llama.cpp":
            gguf_weights = decoder.weights
        engine_costs = costs.for_engine(decoder) if engine == "llama.cpp" else costs
        decoder.decode_batch(audios[:1], max_new_tokens=2)  # warm-up: llama.cpp's context and the chat prefix
        settings = [
            dict(audio_mode=mode, batch_size=batch, num_beams=beams)
            for mode in filter(None, args.audio_modes.split(","))
            for beams in dict.fromkeys([1] if engine == "llama.cpp" else [1, args.num_beams])
            for batch in dict.fromkeys([1, args.batch_size])
        ]
        for setting in settings:
            recognitions.append(
                recognition(
                    model, decoder, audios, engine_costs, rates, clock, max_new_tokens=args.max_new_tokens, **setting
                )
            )
            keys = ("engine", "audio_mode", "batch_size", "num_beams", "rtf")
            print(json.dumps({k: recognitions[-1][k] for k in keys}), flush=True)
    model.processor.audio_mode = model.config.audio_mode
    train = None
    warmup_steps = args.train_warmup_steps
    if args.train_encoder_cache:  # the first epoch fills the cache: timed steps are hits
        warmup_steps = max(warmup_steps, math.ceil(len(examples) / args.train_batch_size))
    if args.train_steps and not args.llm_int8:  # int8 layers have no gradient
        train = training(
            model, args.data, examples, costs, rates, clock,
            batch_size=args.train_batch_size, steps=args.train_steps, warmup_steps=warmup_steps,
            bf16={"auto": AUTO, "true": True, "false": False}[args.train_bf16],
            encoder_cache=args.train_encoder_cache,
            sampling=args.train_sampling_strategy,
        )  # fmt: skip
    result = {
        "command": " ".join(["python", "bench/speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "dtype": args.model_dtype + (", LLM linear int8" if args.llm_int8 else ""),
            "gguf_weights": gguf_weights,
            "clock": args.clock,
            **rates,
        },
        "costs": {
            "llm_linear_params": costs.linear_params,
            "llm_output_params": costs.output_params,
            "step_weight_bytes": costs.weight_bytes,
            "kv_bytes_per_position": costs.kv_bytes_per_position,
        },
        "recognition": recognitions,
        "training": train,
    }
    print(table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
