"""Recognition with the LLM in llama.cpp: the encoder and projector run in torch, the LLM's decoding steps in
llama.cpp (through llama-cpp-python's low-level API), which on CPU runs them near the machine's memory bandwidth.

Each clip's prompt goes in as embedding rows (the chat's token embeddings with the projected audio written over the
placeholder, exactly what the torch path feeds its LLM), generated tokens as token ids. The clips of a batch decode
together, one llama.cpp sequence each (as many at a time as llama.cpp's cap allows); the chat prefix they share
(everything before the audio) is computed once and kept for the next batches, and each sequence starts from it.
Greedy only, with the torch path's stop tokens, token budget and loop guards (repetition_penalty,
no_repeat_ngram_size over the generated tokens), so the same weights write the same tokens. Beam search stays
torch's; a model that chooses among Whisper's n-best (ger_decoding "rescore") scores them in torch, as it needs
teacher-forced log-probabilities and no decoding.

Which weights llama.cpp runs is gguf_export.py's: the LLM's own GGUF file with the LoRA as an adapter ("gguf"), or
a file written with the LoRA merged ("f32", "f16", "q8_0").
"""

import math
import sys
import time

import numpy as np
import torch

from .errors import InputError
from .gguf_export import WEIGHT_TYPES, llm_gguf
from .hypothesis import LOOP_GUARDS, Hypothesis, check_batch, loop_guards, token_budgets, within_budget
from .nbest import prompt_batch

ENGINES = ("torch", "llama.cpp")
LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.16"  # 0.3.36 segfaults inside llama_decode on AVX-512/AMX machines
CONTEXT_STEP = 256  # the KV cache grows in steps of this many positions, so similar batches reuse one context
PREFIX_SEQUENCE = 0  # the llama.cpp sequence that keeps the shared chat prefix; clip n of a batch is sequence n + 1
# The weights llama.cpp runs unless told: Q8_0 with the LoRA merged, on the shipped model faster than its own Q4_1 file
# with the LoRA as an adapter (which llama.cpp computes as two more products a layer) and than f32, and as accurate
# (notes: Measured).
DEFAULT_WEIGHTS = "q8_0"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise InputError(
            f"the llama.cpp engine needs {LLAMA_CPP_REQUIREMENT}: pip install 'speechllm[llama]' (it builds llama.cpp "
            "from source: a C/C++ compiler and cmake, a few minutes)"
        ) from None
    global _log_errors_only
    if _log_errors_only is None:
        _log_errors_only = llama_cpp.llama_log_callback(_print_errors)
    llama_cpp.llama_log_set(_log_errors_only, None)  # llama.cpp's load messages and warnings fill a screen
    return llama_cpp


GGML_LOG_LEVEL_ERROR = 4


def _print_errors(level: int, text: bytes, user_data):
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


_log_errors_only = None  # the C callback, made once llama_cpp is imported and kept alive as long as the module


def engine_decoder(model, engine: str = "torch", weights: str | None = None, threads: int | None = None):
    """What decodes for engine: the model itself ("torch"), or a llama.cpp decoder for it. Both have
    decode_batch(...). A chooser (ger_decoding "rescore") is the model itself with either engine: it generates
    nothing, and scoring Whisper's n-best is torch's, so no GGUF is written or loaded for it."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "torch" or model.config.ger_decoding == "rescore":
        return model
    return LlamaCppDecoder(model, weights, threads)


def banned_ngram_tokens(generated: list[int], size: int) -> list[int]:
    """transformers' no_repeat_ngram_size: the tokens that would complete an n-gram already generated."""
    if size <= 0 or len(generated) + 1 < size:
        return []
    tail = generated[len(generated) - size + 1 :]
    return [generated[i + size - 1] for i in range(len(generated) - size + 1) if generated[i : i + size - 1] == tail]


def guarded(logits: np.ndarray, generated: list[int], repetition_penalty: float, no_repeat_ngram_size: int):
    """The logits after transformers' loop guards, in its order (repetition penalty, then banned n-grams), in place."""
    if repetition_penalty != 1.0 and generated:
        ids = np.asarray(generated)
        scores = logits[ids]
        logits[ids] = np.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
    banned = banned_ngram_tokens(generated, no_repeat_ngram_size)
    if banned:
        logits[banned] = -np.inf
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class LlamaCppDecoder:
    """SpeechLLM.decode_batch with the LLM in llama.cpp (greedy). The loaded LLM (LlamaCppLLM) is kept on the model
    and reused by the next decoder for the same weights and threads; it is remade when the model's LLM weights (its
    LoRA) or these options change."""

    def __init__(self, model, weights: str | None = None, threads: int | None = None):
        import_llama_cpp()  # before writing a GGUF file for nothing
        weights = weights or DEFAULT_WEIGHTS
        if weights not in WEIGHT_TYPES:
            raise InputError(f"gguf weights must be one of {', '.join(WEIGHT_TYPES)}, not {weights!r}")
        threads = threads or torch.get_num_threads()
        files = llm_gguf(model, weights)
        llm = getattr(model, "_llama_cpp_llm", None)  # it holds no reference to the model: no cycle to collect
        if llm is None or (llm.files, llm.threads) != (files, threads):
            # f32 weights compute what the torch path computes, so their keys and values stay f32 too: llama.cpp's
            # default f16 cache moves logits by about 1e-3, enough to flip a near tie between two tokens
            llm = LlamaCppLLM(files, threads, f32_cache=weights == "f32")
            model._llama_cpp_llm = llm
        self.model, self.weights, self.llm = model, weights, llm

    def decode_batch(
        self, audios, prompts=None, num_beams=1, max_new_tokens=None, nbest=None, with_logprobs=False, **options
    ) -> list[Hypothesis]:
        """As SpeechLLM.decode_batch, greedy: num_beams must be 1; options: the loop guards."""
        model = self.model
        if num_beams != 1:
            raise InputError(
                f"the llama.cpp engine decodes greedily (num_beams 1, not {num_beams}): beams run in torch"
            )
        unknown = sorted(set(options) - set(LOOP_GUARDS))
        if unknown:
            raise InputError(f"the llama.cpp engine takes the loop guards {', '.join(LOOP_GUARDS)}, not {unknown}")
        check_batch(audios, prompts, nbest)
        started = time.perf_counter()
        prompts = prompts or [None] * len(audios)
        budgets = [max_new_tokens] * len(audios) if max_new_tokens else token_budgets(model, audios, prompts)
        guards = loop_guards(model, options)
        batch = prompt_batch(model, audios, prompts, nbest)
        device = model.llm.device
        with torch.no_grad():
            embeds = model.embed(**{k: v.to(device) for k, v in batch.items() if k != "attention_mask"})
        embeds = embeds.float().cpu().numpy()
        real = batch["attention_mask"].bool()
        rows = [embeds[i][real[i].numpy()] for i in range(len(audios))]
        prefix = shared_prefix(
            [ids[r].tolist() for ids, r in zip(batch["input_ids"], real)],
            [audio[r].tolist() for audio, r in zip(batch["audio_mask"], real)],
        )
        stops = set(model.processor.stop_token_ids)
        generated, logprobs, finished = self.llm.generate(rows, prefix, max(budgets), guards, stops, with_logprobs)
        seconds = (time.perf_counter() - started) / len(audios)  # decoded together: each clip its share
        hypotheses = []
        for ids, scored, ended, budget in zip(generated, logprobs, finished, budgets):
            ids, ended = within_budget(ids, ended, budget)
            scored = scored[: len(ids) + ended]
            text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
            avg_logprob = sum(scored) / len(scored) if with_logprobs and scored else None
            hypotheses.append(Hypothesis(text, ids, ended, avg_logprob, seconds))
        return hypotheses


class LlamaCppLLM:
    """An LLM's GGUF files (the model, and a LoRA adapter or None) loaded in llama.cpp, with one context whose KV cache
    the clips' sequences share and the chat prefix kept in it: greedy continuations of embedding rows."""

    def __init__(self, files: tuple[str, str | None], threads: int, f32_cache: bool = False):
        self.llama_cpp = llama_cpp = import_llama_cpp()
        self.files, self.threads, self.f32_cache = files, threads, f32_cache
        llama_cpp.llama_backend_init()
        self.llm = llama_cpp.llama_model_load_from_file(files[0].encode(), llama_cpp.llama_model_default_params())
        if not self.llm:
            raise RuntimeError(f"llama.cpp could not load {files[0]}")
        self.adapter = None
        if files[1]:
            self.adapter = llama_cpp.llama_adapter_lora_init(self.llm, files[1].encode())
            if not self.adapter:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {files[1]}")
        self.hidden_size = llama_cpp.llama_model_n_embd(self.llm)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm))
        # llama.cpp caps a context's sequences (LLAMA_MAX_SEQ, 64 in 0.3.16); one of them keeps the prefix
        self.max_rows = llama_cpp.llama_max_parallel_sequences() - 1
        self.context, self.context_positions, self.context_sequences = None, 0, 0
        self.prefix = None  # the token ids whose keys and values PREFIX_SEQUENCE holds

    def __del__(self):
        llama_cpp = getattr(self, "llama_cpp", None)
        if llama_cpp is None:
            return
        if getattr(self, "context", None):
            llama_cpp.llama_free(self.context)
        if getattr(self, "adapter", None):
            llama_cpp.llama_adapter_lora_free(self.adapter)
        if getattr(self, "llm", None):
            llama_cpp.llama_model_free(self.llm)

    # --- llama.cpp's context and batches ---------------------------------------------------------------------

    def _reserve(self, positions: int, sequences: int):
        """A context whose KV cache holds this many positions across this many sequences (one cache that they share,
        so copying the prefix to a sequence copies no data)."""
        if self.context and positions <= self.context_positions and sequences <= self.context_sequences:
            return
        llama_cpp = self.llama_cpp
        if self.context:
            llama_cpp.llama_free(self.context)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = math.ceil(positions / CONTEXT_STEP) * CONTEXT_STEP
        params.n_batch = params.n_ctx  # a whole prompt pass in one llama_decode call
        params.n_seq_max = max(sequences, self.context_sequences)
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True
        if self.f32_cache:
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        params.no_perf = True
        self.context = llama_cpp.llama_init_from_model(self.llm, params)
        if not self.context:
            raise RuntimeError(f"llama.cpp could not make a context of {params.n_ctx} positions")
        if self.adapter:
            llama_cpp.llama_set_adapter_lora(self.context, self.adapter, 1.0)
        self.context_positions, self.context_sequences = params.n_ctx, params.n_seq_max
        self.memory = llama_cpp.llama_get_memory(self.context)
        self.prefix = None

    def _decode(self, sequences, positions, want_logits, embeddings=None, tokens=None) -> np.ndarray:
        """One llama_decode call over rows of embeddings or of tokens; the logits of the rows that want them."""
        llama_cpp, count = self.llama_cpp, len(sequences)
        batch = llama_cpp.llama_batch_init(count, self.hidden_size if embeddings is not None else 0, 1)
        try:
            batch.n_tokens = count
            if embeddings is not None:
                np.ctypeslib.as_array(batch.embd, shape=(count, self.hidden_size))[:] = embeddings
            else:
                np.ctypeslib.as_array(batch.token, shape=(count,))[:] = tokens
            np.ctypeslib.as_array(batch.pos, shape=(count,))[:] = positions
            np.ctypeslib.as_array(batch.n_seq_id, shape=(count,))[:] = 1
            np.ctypeslib.as_array(batch.logits, shape=(count,))[:] = want_logits
            for i, sequence in enumerate(sequences):
                batch.seq_id[i][0] = int(sequence)
            status = llama_cpp.llama_decode(self.context, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed ({status})")
        finally:
            llama_cpp.llama_batch_free(batch)
        outputs = int(np.count_nonzero(want_logits))
        if not outputs:
            return np.zeros((0, self.vocab_size), np.float32)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.context), shape=(outputs, self.vocab_size)).copy()

    # --- greedy decoding -------------------------------------------------------------------------------------------

    def generate(self, rows, prefix, max_new_tokens, guards, stops, with_logprobs):
        """Greedy continuations of these prompts (embedding rows, the first len(prefix) shared), until a token in
        stops: per row its tokens (without the stop token), their log-probabilities (with it) and whether it stopped.
        More rows than a context's sequences hold decode in turn, each group from the same cached prefix."""
        groups = [
            self._generate(rows[first : first + self.max_rows], prefix, max_new_tokens, guards, stops, with_logprobs)
            for first in range(0, len(rows), self.max_rows)
        ]
        return tuple([row for group in groups for row in group[part]] for part in range(3))

    def _generate(self, rows, prefix, max_new_tokens, guards, stops, with_logprobs):
        llama_cpp = self.llama_cpp
        shared = len(prefix)
        positions = shared + sum(len(row) - shared + max_new_tokens for row in rows)
        self._reserve(positions, len(rows) + 1)
        for sequence in range(1, self.context_sequences):
            llama_cpp.llama_memory_seq_rm(self.memory, sequence, -1, -1)
        if self.prefix != prefix:
            llama_cpp.llama_memory_seq_rm(self.memory, PREFIX_SEQUENCE, -1, -1)
            if shared:
                self._decode([PREFIX_SEQUENCE] * shared, np.arange(shared), np.zeros(shared, np.int8), rows[0][:shared])
            self.prefix = prefix
        sequences, positions, embeddings = [], [], []
        for n, row in enumerate(rows):
            if shared:
                llama_cpp.llama_memory_seq_cp(self.memory, PREFIX_SEQUENCE, n + 1, -1, -1)
            sequences += [n + 1] * (len(row) - shared)
            positions += range(shared, len(row))
            embeddings.append(row[shared:])
        ends = np.cumsum([len(row) - shared for row in rows]) - 1
        want = np.zeros(len(sequences), np.int8)
        want[ends] = 1  # each clip's last prompt position predicts its first token
        logits = self._decode(sequences, positions, want, np.concatenate(embeddings))

        generated, logprobs = [[] for _ in rows], [[] for _ in rows]
        finished, active = [False] * len(rows), list(range(len(rows)))
        for step in range(max_new_tokens):
            tokens = []
            for k, n in enumerate(active):
                scores = guarded(logits[k], generated[n], **guards)
                token = int(np.argmax(scores))
                if with_logprobs:
                    logprobs[n].append(float(log_softmax(scores)[token]))
                if token in stops:
                    finished[n] = True
                else:
                    generated[n].append(token)
                    tokens.append(token)
            active = [n for n in active if not finished[n]]
            if not active or step == max_new_tokens - 1:
                break
            sequences = [n + 1 for n in active]
            positions = [len(rows[n]) + len(generated[n]) - 1 for n in active]
            logits = self._decode(sequences, positions, np.ones(len(active), np.int8), tokens=tokens)
        return generated, logprobs, finished


def shared_prefix(ids: list[list[int]], audio: list[list[bool]]) -> tuple[int, ...]:
    """The token ids that every row starts with before its audio: the chat's system turn and user header."""
    first = ids[0]
    length = min(row.index(True) if True in row else len(row) - 1 for row in audio)
    for row in ids[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return tuple(first[:length])
