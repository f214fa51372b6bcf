"""SpeechLLM: frozen Whisper encoder -> trainable projector -> frozen chat LLM, audio spliced into the prompt."""

import contextlib
import glob
import os
import shutil
import tempfile
import warnings

import safetensors.torch
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME

from . import decoding
from .decoding import shared_prompt_cache, stop_token_ids
from .encoder import load_whisper_encoder
from .errors import InputError
from .hub import DIGESTED_FILES, PUSH_OPTIONS, WEIGHTS_NAME, file_sha256, pretrained_folder, push_folder, split_options
from .hypothesis import LOOP_GUARDS
from .llm import load_llm, torch_dtype
from .lora import add_lora, is_lora_parameter
from .nbest import DEFAULT_NBEST_PROMPT, decoder_for
from .processor import AUDIO_PLACEHOLDER, IGNORE_INDEX, Processor
from .projector import Projector
from .rescore_features import FeatureWeights
from .rescoring import CHOOSER_OPTIONS, check_error_correction, score_hypotheses, second_whisper_for

DEFAULT_PROMPT = AUDIO_PLACEHOLDER + "Transcribe the audio."
STAGING_PREFIX = ".saving-"  # save_pretrained's folder inside the one it saves to, for the files it has not moved in


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
        # (the initial one, where the weights are learned)
        learned_rescore_weights: bool = False,  # "rescore": the weights of the chooser's features (rescore_features.py)
        # are trained to rank (train.py --ranking_loss) and saved with the projector
        whisper_language: str = "en",  # with nbest: the language Whisper decodes its n-best in (a code it knows:
        # "de", "zh", ...; English-only weights decode English alone)
        rescore_min_word_ratio: float = 0.8,  # "rescore": a hypothesis of fewer words than this share of Whisper's
        # first is not chosen (rescoring.py: its beam search ends some early); 0: any may be
        second_whisper_model_name_or_path: str | None = None,  # "rescore": a second Whisper, whose n-best joins the
        # first's and whose log-probabilities are averaged with its (rescoring.SecondWhisper); None or "": none
        file_sha256: dict | None = None,  # save_pretrained: the sha256 of the weights and generation config saved with
        # this config, which loading checks (hub.check_saved_model)
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
        self.learned_rescore_weights = learned_rescore_weights
        self.rescore_min_word_ratio = rescore_min_word_ratio
        self.whisper_language = whisper_language
        self.second_whisper_model_name_or_path = second_whisper_model_name_or_path
        self.file_sha256 = file_sha256
        super().__init__(**kwargs)


class SpeechLLM(PreTrainedModel):
    config_class = SpeechLLMConfig
    base_model_prefix = "speechllm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = True  # the Trainer passes num_items_in_batch only when told: forward has no **kwargs

    def __init__(self, config: SpeechLLMConfig):
        super().__init__(config)
        check_error_correction(config)
        dtype = torch_dtype(config.model_dtype)
        self.encoder = load_whisper_encoder(config.whisper_model_name_or_path, dtype)
        self.llm, self.tokenizer = load_llm(config.llm_model_name_or_path, dtype)
        self.whisper_decoder = decoder_for(config, dtype)  # error correction only
        self.second_whisper = second_whisper_for(config, dtype)  # a chooser's, where it has one
        if config.nbest:  # the chooser's weights (rescoring.py): fixed, or trained to rank
            self.rescore_weights = FeatureWeights(config.rescore_whisper_weight, config.learned_rescore_weights)
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
        hypotheses=None,
    ):
        inputs_embeds = self.embed(input_ids, audio_mask, mel, mel_frames, audio_tokens, audio_features)
        if hypotheses is not None:  # Whisper's hypotheses of each clip, scored as the chooser ranks them
            return score_hypotheses(self, inputs_embeds, attention_mask, **hypotheses)
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

    # --- decoding.py: a batch of clips to hypotheses (writing or choosing), clips or files to text ----------------
    decode_batch = decoding.decode_batch
    transcribe_batch = decoding.transcribe_batch
    transcribe = decoding.transcribe

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

    def learn_rescore_weights(self):
        """Train the weights of the chooser's features from their present values, and save them with the projector."""
        self.config.learned_rescore_weights = True
        self.rescore_weights.requires_grad_(True)

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """What training changes and a checkpoint holds: the projector, any LoRA weights and learned feature weights,
        never the frozen models."""
        trained = ("projector.", "rescore_weights.") if self.config.learned_rescore_weights else ("projector.",)
        return {n: p for n, p in self.named_parameters() if n.startswith(trained) or is_lora_parameter(n)}

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **options):
        """The config and the trained weights, nothing of the frozen models (gathered under ZeRO-3).
        push_to_hub=True then uploads them (repo_id= defaults to the folder's name; commit_message, private,
        token); options for full-model saving (state_dict, safe_serialization, ...) do not apply here."""
        trained = self.trained_parameters()
        with _gathered(list(trained.values())):
            state = {name: p.detach().cpu().contiguous() for name, p in trained.items()}
        if is_main_process:
            # Written whole beside the folder's files, then renamed over them, the config last, with the digests of
            # the files renamed before it: a save cut short (a kill, a full disk) leaves no torn file, and one cut
            # between two renames a config that loading refuses, never one read with another save's weights.
            os.makedirs(save_directory, exist_ok=True)
            for stale in glob.glob(os.path.join(glob.escape(save_directory), STAGING_PREFIX + "*")):
                shutil.rmtree(stale, ignore_errors=True)  # what a save killed before its renames left
            staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=save_directory)
            try:
                safetensors.torch.save_file(state, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
                self.generation_config.save_pretrained(staging)
                self.config.file_sha256 = file_sha256(staging)
                self.config.save_pretrained(staging)
                for name in [*DIGESTED_FILES, CONFIG_NAME]:
                    os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
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
        if config.learned_rescore_weights and overrides.get("rescore_whisper_weight") is not None:
            raise InputError(f"{path} learned its chooser's weights: rescore_whisper_weight would not be used")
        for name, value in overrides.items():
            if not hasattr(config, name):
                raise ValueError(f"{name!r} is not a SpeechLLMConfig field")
            if value is not None:
                setattr(config, name, value)
        unused = [name for name in CHOOSER_OPTIONS if overrides.get(name) not in (None, "")]  # "": no second Whisper
        if unused and config.ger_decoding != "rescore":
            raise InputError(f"{path} does not choose among Whisper's n-best: {', '.join(unused)} would not be used")
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
