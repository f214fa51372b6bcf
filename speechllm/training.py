"""Training glue: argument dataclasses and a Trainer that stores and restores only the projector."""

import functools
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler

from .augment import AugmentArguments, SpeedPerturbation, spec_augment
from .checkpoints import checkpoint_to_resume, save_run_options
from .data import Collator, SpeechDataset
from .distill import DistillArguments, Distillation, DistillCollator
from .encoder_cache import CachedAudioDataset, CachingCollator, EncoderCache
from .errors import InputError, run_command_line
from .hub import pretrained_folder
from .llm import MODEL_DTYPES
from .model import SpeechLLM, SpeechLLMConfig
from .nbest import DEFAULT_NBEST_PROMPT, check_task_prompt, error_correction_collator
from .precision import computes_bf16_natively
from .processor import check_system_prompt
from .ranking import (
    Ranking,
    RankingArguments,
    check_ranking_data,
    ranking_collator,
    train_rescore_weights_only,
    with_rescore_weights_group,
)

_DEFAULTS = SpeechLLMConfig()


class _Auto:
    """The default of a bool option that the device decides: not a string, which argparse would parse as a bool."""

    def __repr__(self):
        return "auto"


AUTO = _Auto()


def _option(help: str, **metadata):
    """A model option left unset (None) keeps the value saved with --projector_model_path, else the default."""
    return field(default=None, metadata={"help": help, **metadata})


@dataclass
class ModelArguments:
    projector_model_path: str | None = field(
        default=None,
        metadata={"help": "go on from this saved SpeechLLM: its trained weights and every option not given here"},
    )
    whisper_model_name_or_path: str | None = _option(
        f"openai-whisper name or .pt, faster-whisper/CTranslate2 folder, or HF Whisper folder "
        f"(default {_DEFAULTS.whisper_model_name_or_path})"
    )
    llm_model_name_or_path: str | None = _option(
        f"HF chat model: hub name, folder or .gguf file (default {_DEFAULTS.llm_model_name_or_path})"
    )
    projector_kernel_size: int | None = _option(f"default {_DEFAULTS.projector_kernel_size}")
    projector_hidden_size: int | None = _option(f"default {_DEFAULTS.projector_hidden_size}")
    prompt: str | None = _option(
        f"user turn, with <speech> where the audio goes, and <nbest> with --nbest (default {_DEFAULTS.prompt!r}; "
        "with --nbest, nbest.DEFAULT_NBEST_PROMPT)"
    )
    system_prompt: str | None = _option("default: the chat template's own")
    audio_mode: str | None = _option(f"default {_DEFAULTS.audio_mode}", choices=["dynamic", "window"])
    model_dtype: str | None = _option(f"default {_DEFAULTS.model_dtype}", choices=list(MODEL_DTYPES))
    lora_rank: int | None = _option("train LoRA of this rank inside the LLM (default 0: the LLM stays frozen)")
    lora_alpha: float | None = _option(f"default {_DEFAULTS.lora_alpha}")
    lora_dropout: float | None = _option(f"default {_DEFAULTS.lora_dropout}")
    lora_target_modules: str | None = _option(
        f"'all-linear' or comma-separated module names (default {_DEFAULTS.lora_target_modules})"
    )
    answer_max_new_tokens: int | None = _option(
        f"generation budget for prompts other than --prompt (default {_DEFAULTS.answer_max_new_tokens})"
    )
    nbest: int | None = _option("error correction: Whisper's N-best in the prompt at <nbest> (default 0: plain ASR)")
    ger_audio: bool | None = _option("with --nbest: the audio in the prompt too (default true)")
    whisper_language: str | None = _option(
        f"with --nbest: the language Whisper decodes its n-best in (default {_DEFAULTS.whisper_language})"
    )
    second_whisper_model_name_or_path: str | None = _option(
        "choosing: a second Whisper whose n-best joins the first's ('' for none: training to rank needs none)"
    )
    rescore_whisper_weight: float | None = _option(
        "choosing (ger_decoding rescore): the weight of Whisper's log-probability beside the LLM's; with "
        f"--ranking_loss its initial value (default {_DEFAULTS.rescore_whisper_weight})"
    )


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": 'training jsonl: {"wav", "txt", "key"?, "prompt"?, "transcript"?} a line'})
    eval_data_path: str | None = field(default=None, metadata={"help": "jsonl for evaluation loss"})
    recase_all_caps: bool = field(
        default=False,
        metadata={"help": "read ALL-CAPS txt in sentence case as Whisper writes (data.sentence_case); files unchanged"},
    )
    encoder_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "keep the frozen encoder's output for each clip here (encoder_cache.py): epochs after the first "
            "decode no audio and run no encoder; safe to delete, shared by runs with the same encoder"
        },
    )


@dataclass
class ResumeArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "start afresh: delete output_dir's checkpoints instead of resuming from the newest one"},
    )


@dataclass
class SpeechTrainingArguments(TrainingArguments):
    """HF's TrainingArguments with two defaults of this project's: bf16 autocast where the device computes bf16
    natively, and batches of clips of similar length, so less of each batch is padding."""

    # A bool option (--bf16, --bf16 False) whose default the device decides: AUTO until __post_init__.
    bf16: bool = field(
        default=AUTO,
        metadata={
            "help": "bf16 mixed precision (autocast); default: on where the device computes bf16 natively (CUDA with "
            "bf16, a CPU with AVX512-BF16 or AMX) unless --fp16, --deepspeed or ACCELERATE_MIXED_PRECISION decides"
        },
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "training batches: 'group_by_length' (default: clips of similar duration together), 'random', "
            "'sequential' or 'batch_rebalance'",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )

    def __post_init__(self):
        auto = self.bf16 is AUTO
        if auto:  # off through TrainingArguments' checks, which would ask for --use_cpu on a CPU-only machine
            self.bf16 = False
        super().__post_init__()
        decided = self.fp16 or self.deepspeed or "ACCELERATE_MIXED_PRECISION" in os.environ
        if auto and not decided and computes_bf16_natively(self.device):
            self.bf16, self.mixed_precision = True, "bf16"


def given_options(model_args: ModelArguments, ranking: bool = False) -> tuple[str | None, SpeechLLMConfig | None, dict]:
    """The saved model's folder and config (None, None for a new model) and the options given on top of them:
    --nbest on a recognition model gives it the n-best prompt unless --prompt does; a model trained to rank
    (ranking.py) chooses, by the weights it learns."""
    given = {k: v for k, v in asdict(model_args).items() if v is not None and k != "projector_model_path"}
    if ranking:
        given |= {"ger_decoding": "rescore", "learned_rescore_weights": True}
    if not model_args.projector_model_path:
        return None, None, given
    path, _ = pretrained_folder(model_args.projector_model_path, {})  # the folder, its model.safetensors or a hub id
    saved = SpeechLLMConfig.from_pretrained(path)
    if given.get("nbest") and not saved.nbest and "prompt" not in given:  # an ASR model turned to error correction:
        given["prompt"] = DEFAULT_NBEST_PROMPT  # its saved prompt has no <nbest>
    return path, saved, given


def planned_config(model_args: ModelArguments, ranking: bool = False) -> SpeechLLMConfig:
    """The config build_model's model will have, read without loading any model."""
    _, saved, given = given_options(model_args, ranking)
    if saved is None:
        return SpeechLLMConfig(**given)
    for name, value in given.items():
        setattr(saved, name, value)
    return saved


def check_model_options(config: SpeechLLMConfig, distill_args: DistillArguments):
    """Options that cannot work together, found before the models load."""
    if config.nbest < 0:
        raise InputError(f"--nbest must be 0 (plain recognition) or the number of hypotheses, not {config.nbest}")
    if config.nbest and distill_args.enabled:
        raise InputError("--nbest (error correction) and --distill_weight (speech as a prompt) do not combine")
    if config.nbest and not config.ger_audio and not config.lora_rank:
        raise InputError("--ger_audio false leaves nothing to train without --lora_rank: the projector reads no audio")
    try:
        check_task_prompt(config, config.prompt)
        check_system_prompt(config.system_prompt)
    except InputError as error:
        raise InputError(f"--prompt/--system_prompt: {error}") from None


def build_model(model_args: ModelArguments, ranking: bool = False) -> SpeechLLM:
    """A new model, or a saved one with the options given on top (given_options); LoRA options on a model saved
    without LoRA add fresh LoRA weights to it, and ranking on one saved without learned feature weights learns them
    from the saved ones."""
    path, saved, given = given_options(model_args, ranking)
    if saved is None:
        return SpeechLLM(SpeechLLMConfig(**given))
    new_lora = {k: given.pop(k) for k in list(given) if k.startswith("lora_")} if not saved.lora_rank else {}
    learn_weights = given.pop("learned_rescore_weights", False) and not saved.learned_rescore_weights
    model = SpeechLLM.from_pretrained(path, **given)
    if new_lora.get("lora_rank"):
        model.add_lora(**new_lora)
    if learn_weights:
        model.learn_rescore_weights()
    return model


class SpeechLLMTrainer(Trainer):
    def __init__(
        self,
        *args,
        distill_args: DistillArguments | None = None,
        ranking_args: RankingArguments | None = None,
        augment_args: AugmentArguments | None = None,
        run_options: dict | None = None,
        encoder_cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.run_options = run_options  # saved with every checkpoint, so a resume can check it continues this run
        self.encoder_cache = None
        if encoder_cache_dir:
            speechllm = self.accelerator.unwrap_model(self.model)
            self.encoder_cache = EncoderCache(
                encoder_cache_dir, speechllm.encoder, speechllm.config.audio_mode, self.args.mixed_precision
            )
            if self.train_dataset is not None:
                self.train_dataset = CachedAudioDataset(self.train_dataset, self.encoder_cache)
            if self.eval_dataset is not None:
                self.eval_dataset = CachedAudioDataset(self.eval_dataset, self.encoder_cache)
            self.data_collator = CachingCollator(self.data_collator)
        self.distillation = Distillation(distill_args) if distill_args and distill_args.enabled else None
        self.ranking = Ranking(ranking_args) if ranking_args and ranking_args.enabled else None
        self.ranking_args = ranking_args
        self.augment = augment_args if augment_args and augment_args.spec_augment else None
        # mel, mel_frames and audio_tokens have a row per 30 s window, not per clip: a split of the batch along its
        # first dimension would hand a replica other clips' audio once a clip is longer than 30 s.
        if self.args.n_gpu > 1:
            raise ValueError(
                "several GPUs in one process (nn.DataParallel) would split audio windows from their "
                "clips: launch one process a GPU, torchrun --nproc_per_node=N train.py ..."
            )
        if self.args.accelerator_config.split_batches:
            raise ValueError(
                "accelerator_config split_batches would split audio windows from their clips: leave it off"
            )
        if self.is_deepspeed_enabled:  # DeepSpeed checkpoints hold no frozen weights (below): resume without them
            self.model.register_load_state_dict_post_hook(_frozen_weights_optional)
        self._epoch_setter = _SetSamplerEpoch()
        self.add_callback(self._epoch_setter)
        if augment_args and augment_args.speeds and self.train_dataset is not None:  # training clips only
            self.train_dataset = SpeedPerturbation(self.train_dataset, augment_args.speeds, self._data_seed)
            self._epoch_setter.speed_perturbation = self.train_dataset

    # accelerate's mixed precision wraps the model's forward in autocast and leaves it wrapped: after train() or
    # evaluate() a forward outside the Trainer (a notebook's, a later fp32 run on the same model) still computed in
    # bf16. So each step autocasts here, as the precision options ask, and the wrapper comes off when they return.
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        return self.accelerator.autocast()

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)  # in place

    def evaluation_loop(self, *args, **kwargs):
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            if not self.is_in_train:  # evaluate() or predict() on their own: its wrapper stays while training
                self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Every rank joins (ZeRO-3 gathers the projector), the main one writes; the frozen models are never gathered.
        self.model.save_pretrained(output_dir or self.args.output_dir, is_main_process=self.args.should_save)
        if self.run_options is not None and self.args.should_save:
            save_run_options(output_dir or self.args.output_dir, self.run_options)
        if self.args.push_to_hub and not _internal_call:  # what Trainer.save_model does after saving
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.ranking is not None:
            speechllm = self.accelerator.unwrap_model(model or self.model)
            with_rescore_weights_group(optimizer, speechllm, self.ranking_args.rescore_weights_learning_rate)
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str):
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # By default DeepSpeed also stores each rank's shard of every frozen weight (ZeRO-3: over the ranks, the
        # whole encoder and LLM, gigabytes a checkpoint); they are rebuilt from their names, so leave them out.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "cache_keys" in inputs:  # a batch the encoder cache lacks: encoded here, as the model would, and kept
            inputs = self._encode_and_cache(model, inputs)
        if self.augment is not None and model.training:  # training batches only, never evaluation
            inputs = inputs | {"mel": spec_augment(inputs["mel"], inputs["mel_frames"], self.augment)}
        if self.distillation is not None:  # in place of the model, so the Trainer scales the combined loss as its own
            model = functools.partial(self.distillation, model, self.accelerator.unwrap_model(model))
        if self.ranking is not None:  # the model scores the hypotheses, the ranking loss ranks them
            model = functools.partial(self.ranking, model)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _encode_and_cache(self, model, inputs: dict) -> dict:
        inputs = dict(inputs)
        keys, clip_samples = inputs.pop("cache_keys"), inputs.pop("clip_samples")
        with torch.no_grad(), self.accelerator.autocast():  # the precision the model's forward runs the encoder in
            features = self.accelerator.unwrap_model(model).encoder(inputs["mel"], inputs["mel_frames"])
        self.encoder_cache.save_batch(keys, clip_samples, features, inputs["mel_frames"])
        return inputs | {"mel": None, "audio_features": features}

    def log(self, logs, *args, **kwargs):
        if self.distillation is not None and "loss" in logs:
            logs = logs | self.distillation.pop_means()
        super().log(logs, *args, **kwargs)

    def _save_rng_state(self, output_dir: str):
        super()._save_rng_state(output_dir)  # each process's last file of a checkpoint
        # The main process writes trainer_state.json next, which marks the checkpoint complete (speechllm.checkpoints):
        # only once every process has written its files.
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        (model or self.model).load_trained(resume_from_checkpoint)

    # The Trainer's group_by_length samplers read lengths from input_ids; ours are the clips' durations.
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset or self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length":
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            self._epoch_setter.sampler = EpochLengthGroupedSampler(batch, dataset.lengths, self._data_seed)
            return self._epoch_setter.sampler
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy == "group_by_length":
            return EpochLengthGroupedSampler(self.args.eval_batch_size, eval_dataset.lengths, self._data_seed)
        return super()._get_eval_sampler(eval_dataset)

    @property
    def _data_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """group_by_length with each epoch's order drawn from (seed, epoch) alone, like accelerate's seedable random
    sampler: a resumed run draws the order the uninterrupted one drew (a draw from the global RNG would replay
    epoch 0's)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class _SetSamplerEpoch(TrainerCallback):
    """Tells the sampler which epoch begins: accelerate's set_epoch reaches it through a process shard or through the
    batches a resumed epoch skips, but not through both (torchrun, resumed mid-epoch). And the speed perturbation,
    which nothing else tells (before the epoch's data loader starts its workers, which copy it)."""

    sampler = None
    speed_perturbation = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        for target in (self.sampler, self.speed_perturbation):
            if target is not None:
                target.set_epoch(int(state.epoch or 0))  # a resumed run starts inside the epoch it stopped in


def _frozen_weights_optional(model, incompatible_keys):
    """A load_state_dict post-hook: the frozen weights may be missing (DeepSpeed's resume loads strictly)."""
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if key not in frozen]


def _init_cpu_distributed(argv: list[str]):
    """DeepSpeed on CPU ranks needs gloo, set up before TrainingArguments pick a backend."""
    if "--deepspeed" in argv and "WORLD_SIZE" in os.environ and not torch.cuda.is_available():
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    _init_cpu_distributed(argv)
    parser = HfArgumentParser(
        (
            ModelArguments,
            DataArguments,
            ResumeArguments,
            DistillArguments,
            RankingArguments,
            AugmentArguments,
            SpeechTrainingArguments,
        )
    )
    try:
        parsed = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:  # TrainingArguments check their options as they are built
        raise InputError(str(error)) from error
    model_args, data_args, resume_args, distill_args, ranking_args, augment_args, training_args = parsed
    training_args.remove_unused_columns = False  # our batches are dicts the model reads whole
    if training_args.eval_strategy != "no" and not data_args.eval_data_path:
        raise InputError("--eval_strategy needs --eval_data_path")
    if data_args.encoder_cache_dir and (augment_args.spec_augment or augment_args.speeds):
        raise InputError(
            "--encoder_cache_dir keeps the encoder's output on the clean audio: --spec_augment and --speed_perturb "
            "change it every epoch"
        )
    if data_args.encoder_cache_dir and training_args.deepspeed:
        raise InputError("--encoder_cache_dir runs the encoder outside the model's forward, which --deepspeed shards")

    # Every line is checked before the models load, and the resume point found: an interrupted run picks up from
    # its newest complete checkpoint.
    dataset = functools.partial(
        SpeechDataset, require_transcript=distill_args.enabled, recase_all_caps=data_args.recase_all_caps
    )
    try:  # the saved model's files (--projector_model_path) are read and checked here, before any model loads
        config = planned_config(model_args, ranking_args.enabled)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from error
    check_model_options(config, distill_args)
    ranking_args.check(config, model_args.projector_model_path, training_args.gradient_checkpointing)
    if config.nbest and data_args.encoder_cache_dir:
        raise InputError("--encoder_cache_dir does not combine with --nbest: error correction encodes its own batches")
    train_data = dataset(data_args.data_path)
    eval_data = dataset(data_args.eval_data_path) if data_args.eval_data_path else None
    if ranking_args.enabled:
        for data in [d for d in (train_data, eval_data) if d is not None]:
            check_ranking_data(data)
        training_args.label_names = ["word_errors"]  # what evaluation's loss needs in a batch
    if training_args.train_sampling_strategy == "group_by_length":
        for data in [d for d in (train_data, eval_data) if d is not None]:
            data.lengths  # the audio headers, read now: one that cannot be read fails before the models load
    run_options = {**asdict(model_args), **asdict(data_args), **asdict(distill_args), **asdict(ranking_args)}
    run_options.pop("encoder_cache_dir")  # where the encoder's outputs are kept changes no result
    for name in ("data_path", "eval_data_path"):  # the files, wherever the run is started from
        run_options[name] = run_options[name] and os.path.abspath(run_options[name])
    resume = checkpoint_to_resume(
        training_args.output_dir,
        training_args.resume_from_checkpoint,
        resume_args.overwrite_output_dir,
        training_args.should_save,
        run_options,
    )
    set_seed(training_args.seed)  # before the projector is initialised (the Trainer seeds only after that)
    model = build_model(model_args, ranking_args.enabled)  # after TrainingArguments: ZeRO-3 partitions the LLM
    if ranking_args.rescore_weights_only:
        train_rescore_weights_only(model)
    if ranking_args.enabled:  # Whisper's scores of the hypotheses computed once, up front
        collator = ranking_collator(model, [train_data, eval_data], training_args.device)
    elif model.config.nbest:  # the n-best the jsonl does not cache, decoded once before training
        collator = error_correction_collator(model, [train_data, eval_data], training_args.device)
    else:
        collator = (DistillCollator if distill_args.enabled else Collator)(model.processor)
    trainer = SpeechLLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        distill_args=distill_args,
        ranking_args=ranking_args,
        augment_args=augment_args,
        run_options=run_options,
        encoder_cache_dir=data_args.encoder_cache_dir,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    return trainer


def command_line():
    """train.py and speechllm-train: errors in the user's input end with one line on stderr, no traceback."""
    try:
        run_command_line(main)
    finally:  # torchrun's processes end their process group, its threads joined, before the interpreter's exit
        # tears them down (which can abort a process whose work is done: recognition.main). Not in main: its
        # caller may go on with the trainer it returns, whose saves under ZeRO-3 involve every process.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
