"""train.py (speechllm.training.main) end to end with tiny models: exact resume, checkpoints that hold only the
projector, reloading, one data-parallel job under torchrun (plain DDP and DeepSpeed ZeRO-3 on CPU, bf16 included),
gradient accumulation and gradient checkpointing.

The single-process runs call main() in this process; the torchrun ones go through tests/dist_train.py, which has every
rank save its gathered projector and a run.json next to it.
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_models import write_jsonl, write_tone
from transformers import TrainerCallback

from speechllm import SpeechLLM, training
from speechllm.data import Collator, SpeechDataset
from speechllm.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "dist_train.py"
DS_CONFIG = ROOT / "ds_config_zero3.json"
NPROC = 2
BATCH = 2  # per device
TORCHRUN_TIMEOUT = 600  # the first ZeRO-3 run on a machine JIT-builds DeepSpeed's CPU comm op (a minute or two)

# Equal-length clips, so batches of 2 and of 4 pad the audio alike; answers of different lengths, so ranks see
# different token counts and the loss normalisation across ranks and accumulation steps matters.
TEXTS = [
    "hello world",
    "one two three four five six seven eight",
    "the quick brown fox",
    "she sells sea shells by the sea shore",
    "seven",
    "transcribe the audio please",
    "nine ten",
    "hello world this is a tiny speech model",
]
STEPS_PER_EPOCH = math.ceil(len(TEXTS) / (BATCH * NPROC))  # one data-parallel job: 2, not 8 / 2 = 4

# Deterministic, linear-in-the-gradient updates over fixed batches: a 2-rank run with batch 2 must take the same
# steps as one process with batch 4 (Accelerate hands out the sequential batches [0, 1], [2, 3], ... in turn).
SEQUENTIAL_SGD = [
    "--train_sampling_strategy",
    "sequential",
    "--optim",
    "sgd",
    "--learning_rate",
    "0.1",
    "--lr_scheduler_type",
    "constant",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train_data")
    rows = [
        {"key": f"utt{i}", "wav": os.path.basename(write_tone(str(root / f"utt{i}.wav"), 1.0, 200 + 150 * i)), "txt": t}
        for i, t in enumerate(TEXTS)
    ]
    write_jsonl(str(root / "data6.jsonl"), rows[:6])  # 6 / (2 x 2) leaves a part batch: see test_zero3_bf16
    return write_jsonl(str(root / "data.jsonl"), rows)


def train_args(tiny, data, output_dir, *extra) -> list[str]:
    return [
        "--whisper_model_name_or_path",
        tiny["whisper"],
        "--llm_model_name_or_path",
        tiny["qwen2"],
        "--model_dtype",
        "float32",
        "--projector_hidden_size",
        "32",
        "--data_path",
        data,
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        str(BATCH),
        "--logging_steps",
        "1",
        "--use_cpu",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def train(args, callbacks=()):
    """training.main(args) in this process, with extra Trainer callbacks; returns the trainer."""
    original = training.SpeechLLMTrainer

    class WithCallbacks(original):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            for callback in callbacks:
                self.add_callback(callback)

    training.SpeechLLMTrainer = WithCallbacks  # main() builds its Trainer from this module attribute
    try:
        return training.main(args)
    finally:
        training.SpeechLLMTrainer = original


class StopAt(TrainerCallback):
    """An interruption: stop after this step (the checkpoint saved at it is the last one)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class Record(TrainerCallback):
    """The steps this run took, the projector's gradient norms, and its weights when training began."""

    def __init__(self):
        self.steps, self.grad_norms, self.initial = [], [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.projector.parameters()]
        assert all(g is not None for g in grads), "a projector parameter got no gradient"
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
        assert all(p.grad is None for p in model.llm.parameters()), "the frozen LLM got gradients"

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def weights(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))


def projector_keys(model) -> set[str]:
    return {f"projector.{k}" for k in model.projector.state_dict()}


def assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max():.3g}"


def checkpoints(output_dir) -> list[Path]:
    return sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def trainer_state(checkpoint) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def llm_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.llm.parameters())


# --- single process: resume, checkpoint contents, reload ------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tiny, data, tmp_path_factory):
    """6 steps in one go, a checkpoint every 3 (AdamW, linear decay, shuffled data: the defaults)."""
    output_dir = tmp_path_factory.mktemp("straight")
    return train(train_args(tiny, data, output_dir, "--max_steps", "6", "--save_steps", "3"))


def test_resume_after_an_interruption_is_exact(tiny, data, straight, tmp_path):
    args = train_args(tiny, data, tmp_path, "--max_steps", "6", "--save_steps", "3")
    interrupted = train(args, [StopAt(3)])
    assert interrupted.state.global_step == 3
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-3"]

    record = Record()
    resumed = train(args, [record])  # no flag: main() resumes from the latest checkpoint in output_dir
    assert record.steps == [4, 5, 6], "did not continue from checkpoint-3"
    assert resumed.state.global_step == 6
    assert_same(weights(tmp_path), weights(straight.args.output_dir))
    assert_same(weights(tmp_path / "checkpoint-6"), weights(Path(straight.args.output_dir) / "checkpoint-6"))


def test_checkpoints_hold_only_the_projector(straight):
    model = straight.model
    found = checkpoints(straight.args.output_dir)
    assert [p.name for p in found] == ["checkpoint-3", "checkpoint-6"]
    limit = llm_bytes(model)
    for checkpoint in found:
        keys = set(weights(checkpoint))
        assert all(key.startswith("projector.") for key in keys), keys
        assert keys == projector_keys(model)
        sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
        assert max(sizes.values()) < limit / 2, f"{checkpoint.name}: {sizes}, the LLM is {limit} bytes"
        assert sum(sizes.values()) < limit, f"{checkpoint.name}: {sizes}, the LLM is {limit} bytes"
        # The optimizer knows the projector's parameters and nothing else.
        optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        assert sum(len(group["params"]) for group in optimizer["param_groups"]) == len(
            list(model.projector.parameters())
        )
        moments = sum(state["exp_avg"].numel() for state in optimizer["state"].values())
        assert moments == sum(p.numel() for p in model.projector.parameters())
    assert set(weights(straight.args.output_dir)) == projector_keys(model)


def test_output_dir_reloads_to_the_trained_model(straight, data):
    trained = straight.model.eval()
    loaded = SpeechLLM.from_pretrained(straight.args.output_dir).eval()
    assert loaded.config.projector_hidden_size == 32
    dataset = SpeechDataset(data)
    batch = Collator(trained.processor)([dataset[i] for i in range(3)])
    batch.pop("labels")
    with torch.no_grad():
        expected, actual = trained(**batch).logits, loaded(**batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


# --- single process: group_by_length (the shipped recipe's sampling), interruptions, starting afresh ---------------

GROUPED = ["--train_sampling_strategy", "group_by_length", "--max_steps", "8", "--save_steps", "2"]  # 2 epochs


@pytest.fixture(scope="module")
def grouped(tiny, data, tmp_path_factory):
    """8 steps (2 epochs of 4) in one go, length-grouped, a checkpoint every 2."""
    return train(train_args(tiny, data, tmp_path_factory.mktemp("grouped"), *GROUPED))


def test_length_grouped_order_is_fixed_by_seed_and_epoch():
    lengths = [1000 + 10 * (i % 7) for i in range(64)]
    sampler = training.EpochLengthGroupedSampler(4, lengths, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(64)) and first != second  # a new order each epoch...
    again = training.EpochLengthGroupedSampler(4, lengths, seed=0)
    again.set_epoch(1)
    assert list(again) == second  # ... and the same one in a new process, whatever its global RNG did
    torch.manual_seed(123)
    assert list(again) == second


@pytest.mark.parametrize("stop", [4, 6])  # at the end of epoch 0; in the middle of epoch 1
def test_group_by_length_resume_is_exact(tiny, data, grouped, tmp_path, stop):
    args = train_args(tiny, data, tmp_path, *GROUPED)
    train(args, [StopAt(stop)])
    record = Record()
    train(args, [record])
    assert record.steps == list(range(stop + 1, 9))
    assert_same(weights(tmp_path), weights(grouped.args.output_dir))


@pytest.fixture(scope="module")
def stopped_at_6(tiny, data, tmp_path_factory):
    """Checkpoints 2, 4 and 6 of the grouped run: the folder a kill -9 during the save of checkpoint-6 leaves,
    once that checkpoint is damaged as the kill would."""
    output_dir = tmp_path_factory.mktemp("stopped_at_6") / "run"
    train(train_args(tiny, data, output_dir, *GROUPED), [StopAt(6)])
    return output_dir


# What the Trainer writes into a checkpoint, in order (config.json and generation_config.json go with the weights).
SAVE_ORDER = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]


def interrupt_save(checkpoint: Path, at: str, written: float):
    """The checkpoint a kill -9 leaves while the Trainer writes file `at`: the files before it whole, this fraction of
    it, none of the ones after it."""
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(
        SAVE_ORDER + ["config.json", "generation_config.json", "run_options.json"]
    )
    unwritten = SAVE_ORDER[SAVE_ORDER.index(at) :]
    (checkpoint / at).write_bytes((checkpoint / at).read_bytes()[: int(written * (checkpoint / at).stat().st_size)])
    for name in unwritten[1:]:
        (checkpoint / name).unlink()


@pytest.mark.parametrize("at, written", [(name, 0.5) for name in SAVE_ORDER] + [("trainer_state.json", 0.0)])
def test_resume_skips_a_checkpoint_whose_save_was_interrupted(tiny, data, grouped, stopped_at_6, tmp_path, at, written):
    output_dir = tmp_path / "run"
    shutil.copytree(stopped_at_6, output_dir)
    interrupt_save(output_dir / "checkpoint-6", at, written)
    record = Record()
    train(train_args(tiny, data, output_dir, *GROUPED), [record])
    assert record.steps == [5, 6, 7, 8], "did not resume from checkpoint-4, the newest complete one"
    assert_same(weights(output_dir), weights(grouped.args.output_dir))
    assert_same(weights(output_dir / "checkpoint-6"), weights(Path(grouped.args.output_dir) / "checkpoint-6"))
    assert trainer_state(output_dir / "checkpoint-6")["global_step"] == 6  # written again, whole


def test_an_incomplete_checkpoint_asked_for_is_a_clear_error(tiny, data, stopped_at_6, tmp_path):
    checkpoint = tmp_path / "checkpoint-6"
    shutil.copytree(stopped_at_6 / "checkpoint-6", checkpoint)
    (checkpoint / "trainer_state.json").unlink()
    args = train_args(tiny, data, tmp_path / "run", *GROUPED, "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(InputError, match="checkpoint-6: not a complete checkpoint"):
        training.main(args)


def test_overwrite_output_dir_starts_afresh(tiny, data, grouped, stopped_at_6, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(stopped_at_6, output_dir)
    record = Record()
    train(train_args(tiny, data, output_dir, *GROUPED, "--overwrite_output_dir"), [StopAt(2), record])
    assert record.steps == [1, 2]
    assert [p.name for p in checkpoints(output_dir)] == ["checkpoint-2"]  # the old run's are gone: none to resume
    assert_same(weights(output_dir), weights(Path(grouped.args.output_dir) / "checkpoint-2"))


@pytest.mark.parametrize(
    "options, changed",
    [
        (
            ["--prompt", "<speech>Write it down.", "--learning_rate", "0.01"],
            "--prompt None there, '<speech>Write it down.' now",
        ),
        (["--data_path_of", "data6.jsonl"], "--data_path"),
        (["--recase_all_caps", "true"], "--recase_all_caps False there, True now"),
    ],
)
def test_a_run_with_other_options_does_not_resume_another_runs_checkpoints(
    tiny, data, stopped_at_6, tmp_path, options, changed
):
    output_dir = tmp_path / "run"
    shutil.copytree(stopped_at_6, output_dir)
    if options[0] == "--data_path_of":
        data, options = str(Path(data).parent / options[1]), []
    args = train_args(tiny, data, output_dir, *GROUPED, *options)
    with pytest.raises(InputError) as error:
        training.main(args)
    message = str(error.value)
    assert message.startswith(f"{output_dir / 'checkpoint-6'}: trained with other options (") and changed in message
    assert "--overwrite_output_dir" in message and "\n" not in message
    assert [p.name for p in checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # kept
    asked = train_args(tiny, data, tmp_path / "new", *GROUPED, *options)
    with pytest.raises(InputError, match=r"checkpoint-6: trained with other options .*--projector_model_path"):
        training.main(asked + ["--resume_from_checkpoint", str(output_dir / "checkpoint-6")])


def test_train_py_with_another_prompt_in_a_runs_folder_stops_with_one_line(tiny, data, stopped_at_6, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(stopped_at_6, output_dir)
    args = train_args(tiny, data, output_dir, *GROUPED, "--prompt", "<speech>Write it down.")
    saved = (output_dir / "model.safetensors").read_bytes()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "Warning" not in line and "warn(" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: {output_dir / 'checkpoint-6'}: trained with")
    assert trainer_state(checkpoints(output_dir)[-1])["global_step"] == 6
    assert (output_dir / "model.safetensors").read_bytes() == saved  # not the old weights saved under a new config


def test_evaluation_with_group_by_length(tiny, data, tmp_path):
    eval_args = ["--eval_data_path", data, "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no"]
    trainer = train(train_args(tiny, data, tmp_path, *GROUPED[:2], "--max_steps", "2", *eval_args))
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), trainer.state.log_history


# --- the command line -----------------------------------------------------------------------------------------------


def test_errors_in_the_input_are_one_line_without_traceback(tiny, tmp_path):
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [{"wav": "missing.wav", "txt": "x"}])
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *train_args(tiny, bad, tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "Warning" not in line and "warn(" not in line]
    assert lines == [f"train.py: error: {bad}:1: audio file not found: {tmp_path / 'missing.wav'}"], result.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--fp16", "--bf16"], "At most one of fp16 and bf16"),  # TrainingArguments' own check
        (["--eval_strategy", "steps"], "--eval_strategy needs --eval_data_path"),
        (["--resume_from_checkpoint", "x", "--overwrite_output_dir"], "contradict each other"),
    ],
)
def test_contradicting_options_are_input_errors(tiny, data, tmp_path, options, message):
    with pytest.raises(InputError, match=message):
        training.main(train_args(tiny, data, tmp_path, *options))


@pytest.mark.parametrize(
    "options, message",
    [
        (["--nbest", "2", "--distill_weight", "1"], "--nbest .error correction. and --distill_weight"),
        (["--nbest", "2", "--prompt", "<speech>Transcribe."], "an error correction prompt must contain '<nbest>'"),
        (["--nbest", "-1"], "--nbest must be 0 .plain recognition. or the number of hypotheses, not -1"),
        (["--nbest", "2", "--ger_audio", "false"], "--ger_audio false leaves nothing to train without --lora_rank"),
        (["--system_prompt", "Listen: <speech>"], "the system prompt holds '<speech>'"),
        (["--prompt", "<nbest><speech>"], "'<nbest>' in a prompt for a model without error correction"),
    ],
)
def test_model_options_that_cannot_work_are_input_errors_before_the_models_load(
    tiny, data, tmp_path, monkeypatch, options, message
):
    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("the models were loaded first"))
    with pytest.raises(InputError, match=message) as error:
        training.main(train_args(tiny, data, tmp_path, *options))
    assert "\n" not in str(error.value)


def test_projector_paths_that_hold_no_saved_model_are_input_errors_before_the_models_load(
    tiny, data, tmp_path, monkeypatch
):
    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("the models were loaded first"))
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    cases = {
        tiny["qwen2"]: "a 'qwen2' model, not a saved SpeechLLM",
        str(tmp_path / "empty"): "no config.json: not a saved SpeechLLM",
        "empty/my_modle": "^empty/my_modle: no such folder or file$",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=message):
            training.main(train_args(tiny, data, tmp_path / "run", "--projector_model_path", path))


def test_lora_target_modules_that_match_nothing_are_an_input_error(tiny, data, tmp_path):
    options = ["--lora_rank", "2", "--lora_target_modules", "q_prj,v_prj"]
    with pytest.raises(InputError, match=r"lora_target_modules 'q_prj,v_prj' names no layer of the LLM: .*q_proj"):
        training.main(train_args(tiny, data, tmp_path, *options))


# --- single process: seed, gradient accumulation, gradient checkpointing ----------------------------------------------


def test_seed_fixes_the_projector_initialisation(tiny, data, tmp_path):
    def initial(name, seed):
        record = Record()
        args = ["--max_steps", "1", "--save_strategy", "no", "--seed", str(seed)]
        train(train_args(tiny, data, tmp_path / name, *args), [record])
        return record.initial

    first = initial("a", 0)
    assert_same(initial("b", 0), first)
    assert not torch.equal(initial("c", 1)["conv.weight"], first["conv.weight"])


def test_gradient_accumulation_matches_one_big_batch(tiny, data, tmp_path):
    """The loss is normalised by the tokens of the whole optimizer step (num_items_in_batch), not per micro-batch."""
    common = [*SEQUENTIAL_SGD, "--learning_rate", "1.0", "--max_steps", "1", "--save_strategy", "no"]
    record = Record()
    one = train(train_args(tiny, data, tmp_path / "one", *common, "--per_device_train_batch_size", "6"), [record])
    accumulated = train(
        train_args(
            tiny,
            data,
            tmp_path / "accumulated",
            *common,
            "--per_device_train_batch_size",
            "3",
            "--gradient_accumulation_steps",
            "2",
        )
    )
    assert one.model_accepts_loss_kwargs
    final = weights(one.args.output_dir)
    assert not torch.equal(final["projector.conv.weight"], record.initial["conv.weight"])
    assert_same(weights(accumulated.args.output_dir), final, atol=1e-6)


def test_gradient_checkpointing_trains_the_projector(tiny, data, tmp_path):
    common = ["--max_steps", "2", "--save_strategy", "no"]
    record, plain = Record(), Record()
    checkpointed = train(train_args(tiny, data, tmp_path / "gc", *common, "--gradient_checkpointing"), [record])
    assert checkpointed.model.llm.is_gradient_checkpointing
    assert record.steps == [1, 2]
    assert all(math.isfinite(n) and n > 0 for n in record.grad_norms), record.grad_norms
    final = weights(tmp_path / "gc")
    assert all(not torch.equal(final[f"projector.{k}"], v) for k, v in record.initial.items())
    # Recomputing the activations changes nothing else.
    reference = train(train_args(tiny, data, tmp_path / "plain", *common), [plain])
    assert not reference.model.llm.is_gradient_checkpointing
    torch.testing.assert_close(record.grad_norms, plain.grad_norms, atol=1e-6, rtol=1e-5)
    assert_same(final, weights(tmp_path / "plain"), atol=1e-6)


# --- torchrun: 2 CPU ranks ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tiny, data, tmp_path_factory):
    """The reference for the 2-rank runs: one process, batch 2 x 2, same batches; checkpoint-4 is 2 epochs in."""
    output_dir = tmp_path_factory.mktemp("one_process")
    args = train_args(tiny, data, output_dir, *SEQUENTIAL_SGD, "--num_train_epochs", "3", "--save_steps", "2")
    args[args.index("--per_device_train_batch_size") + 1] = str(BATCH * NPROC)
    return train(args)


def torchrun(args, output_dir, deepspeed=False):
    """tests/dist_train.py on NPROC CPU ranks; returns each rank's run.json and projector weights."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    # The driver lives in tests/, so Python would import an installed speechllm (perhaps another checkout's): this one.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if deepspeed:
        env["DS_ACCELERATOR"] = "cpu"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={NPROC}",
        str(DRIVER),
        *args,
    ]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun timed out after {TORCHRUN_TIMEOUT} s:\n{_tail(error.stdout)}\n{_tail(error.stderr)}")
    assert result.returncode == 0, (
        f"torchrun exited {result.returncode}:\n{_tail(result.stdout)}\n{_tail(result.stderr)}"
    )
    runs = [json.loads((Path(output_dir) / f"rank{r}" / "run.json").read_text()) for r in range(NPROC)]
    return runs, [weights(Path(output_dir) / f"rank{r}") for r in range(NPROC)]


def _tail(text, size=12000):
    text = text.decode(errors="replace") if isinstance(text, bytes) else text or ""
    lines = [line for line in text.splitlines() if "FutureWarning" not in line and "return func(" not in line]
    return "\n".join(lines)[-size:]


def assert_one_data_parallel_job(runs, rank_weights, output_dir, steps):
    assert [run["world_size"] for run in runs] == [NPROC] * NPROC
    assert [run["global_step"] for run in runs] == [steps[-1]] * NPROC
    assert [run["steps"] for run in runs] == [steps] * NPROC
    assert trainer_state(checkpoints(output_dir)[-1])["global_step"] == steps[-1]
    assert_same(rank_weights[1], rank_weights[0])
    assert_same(weights(output_dir), rank_weights[0])


def test_torchrun_ddp_is_one_data_parallel_job(tiny, data, one_process, tmp_path):
    args = train_args(tiny, data, tmp_path, *SEQUENTIAL_SGD, "--num_train_epochs", "2", "--save_steps", "2")
    runs, rank_weights = torchrun(args, tmp_path)
    assert_one_data_parallel_job(runs, rank_weights, tmp_path, list(range(1, 2 * STEPS_PER_EPOCH + 1)))
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert set(weights(tmp_path / "checkpoint-4")) == projector_keys(one_process.model)
    # Gradients averaged over the ranks with the loss normalised by the tokens of both: the one-process steps.
    assert_same(rank_weights[0], weights(Path(one_process.args.output_dir) / "checkpoint-4"), atol=1e-4)


def test_torchrun_group_by_length_resumed_mid_epoch_is_exact(tiny, data, tmp_path):
    """Stopped one step into epoch 1 and resumed: each rank skips its first batch of that epoch and must still draw
    epoch 1's order (accelerate's set_epoch does not reach the sampler through both its shard and its skip)."""
    grouped_sgd = [*SEQUENTIAL_SGD[2:], "--train_sampling_strategy", "group_by_length", "--save_steps", "1"]
    steps = 3 * STEPS_PER_EPOCH
    reference = train_args(tiny, data, tmp_path / "one", *grouped_sgd, "--max_steps", str(steps))
    reference[reference.index("--per_device_train_batch_size") + 1] = str(BATCH * NPROC)  # the same global batches
    train(reference)
    args = train_args(tiny, data, tmp_path / "two", *grouped_sgd, "--max_steps", str(STEPS_PER_EPOCH + 1))
    torchrun(args, tmp_path / "two")
    args[args.index("--max_steps") + 1] = str(steps)  # the constant learning rate does not depend on it
    runs, rank_weights = torchrun(args, tmp_path / "two")
    assert [run["steps"] for run in runs] == [list(range(STEPS_PER_EPOCH + 2, steps + 1))] * NPROC
    assert_same(rank_weights[0], weights(tmp_path / "one"), atol=1e-4)


@pytest.fixture(scope="module")
def zero3(tiny, data, tmp_path_factory):
    """2 epochs under ZeRO-3 (checkpoints at steps 2 and 4); returns the runs and a copy of the output dir as it was."""
    output_dir = tmp_path_factory.mktemp("zero3")
    args = train_args(
        tiny,
        data,
        output_dir,
        *SEQUENTIAL_SGD,
        "--num_train_epochs",
        "2",
        "--save_steps",
        "2",
        "--deepspeed",
        str(DS_CONFIG),
    )
    runs, rank_weights = torchrun(args, output_dir, deepspeed=True)
    snapshot = tmp_path_factory.mktemp("zero3_after_2_epochs") / "output"
    shutil.copytree(output_dir, snapshot)
    return {"args": args, "output_dir": output_dir, "snapshot": snapshot, "runs": runs, "weights": rank_weights}


def test_zero3_is_one_data_parallel_job(zero3, one_process):
    runs, snapshot = zero3["runs"], zero3["snapshot"]
    assert_one_data_parallel_job(runs, zero3["weights"], snapshot, list(range(1, 2 * STEPS_PER_EPOCH + 1)))
    assert set(weights(snapshot)) == projector_keys(one_process.model)
    # ZeRO-3 really sharded the frozen LLM: each rank holds about half of it.
    for run in runs:
        llm = run["modules"]["llm"]
        assert llm["zero3"] and llm["numel"] / NPROC <= llm["local_numel"] < llm["numel"], llm
    # The same batches a step as one process, so the same weights (and the loss on each batch went down).
    assert_same(zero3["weights"][0], weights(Path(one_process.args.output_dir) / "checkpoint-4"), atol=1e-4)
    losses = runs[0]["losses"]
    assert all(math.isfinite(loss) for loss in losses.values()), losses
    assert losses["3"] < losses["1"] and losses["4"] < losses["2"], losses


def test_zero3_checkpoints_hold_no_frozen_weights(zero3, one_process):
    model = one_process.model
    projector_numel = sum(p.numel() for p in model.projector.parameters())
    found = checkpoints(zero3["snapshot"])
    assert [p.name for p in found] == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in found:
        assert set(weights(checkpoint)) == projector_keys(model)
        (engine_dir,) = checkpoint.glob("global_step*")
        states = sorted(engine_dir.glob("*model_states.pt"))
        assert len(states) == NPROC, sorted(p.name for p in engine_dir.iterdir())
        for file in states:
            state = torch.load(file, weights_only=False, map_location="cpu")
            # No rank's shard of the frozen encoder and LLM (DeepSpeed's default for stages 2 and 3) ...
            assert not state.get("frozen_param_fragments"), f"{file.name}: frozen weights stored"
            # ... and the module's parameters are ZeRO-3 placeholders: only (small, unsharded) buffers have data.
            stored = {k: v.numel() for k, v in state["module"].items() if k not in state["buffer_names"] and v.numel()}
            assert not stored, f"{file.name}: {stored}"
        # The optimizer's partitions together are the projector (plus alignment padding), nothing else.
        optimizer_files = sorted(engine_dir.glob("*optim_states.pt"))
        assert len(optimizer_files) == NPROC
        flat = sum(
            t.numel()
            for file in optimizer_files
            for t in torch.load(file, weights_only=False, map_location="cpu")["optimizer_state_dict"][
                "fp32_flat_groups"
            ]
        )
        assert projector_numel <= flat < projector_numel + 64 * NPROC * 2, (flat, projector_numel)


def test_zero3_resumes_from_its_checkpoint(zero3, one_process):
    """Run again on the same output dir with a third epoch: it continues from checkpoint-4, not from step 0."""
    output_dir, args = zero3["output_dir"], list(zero3["args"])
    args[args.index("--num_train_epochs") + 1] = "3"
    runs, rank_weights = torchrun(args, output_dir, deepspeed=True)
    assert_one_data_parallel_job(runs, rank_weights, output_dir, [5, 6])
    assert [p.name for p in checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert_same(rank_weights[0], weights(one_process.args.output_dir), atol=1e-4)


def test_zero3_bf16(tiny, data, tmp_path):
    six = str(Path(data).with_name("data6.jsonl"))
    args = train_args(
        tiny, six, tmp_path, "--num_train_epochs", "1", "--save_steps", "1", "--bf16", "--deepspeed", str(DS_CONFIG)
    )
    args[args.index("--model_dtype") + 1] = "bfloat16"
    runs, rank_weights = torchrun(args, tmp_path, deepspeed=True)
    # 6 examples, 2 ranks of batch 2: ceil(6 / 4) = 2 steps (the last global batch is topped up from the start).
    assert_one_data_parallel_job(runs, rank_weights, tmp_path, [1, 2])
    for run in runs:
        assert run["modules"]["llm"]["dtype"] == run["modules"]["encoder"]["dtype"] == "bfloat16", run["modules"]
        assert run["modules"]["llm"]["zero3"]
        assert all(math.isfinite(loss) for loss in run["losses"].values()), run["losses"]
    # DeepSpeed's bf16 optimizer wrote the states, and the second step changed the projector.
    assert (
        len(glob.glob(str(tmp_path / "checkpoint-2" / "global_step2" / "bf16_zero_pp_rank_*_optim_states.pt"))) == NPROC
    )
    step1, step2 = weights(tmp_path / "checkpoint-1"), weights(tmp_path / "checkpoint-2")
    assert all(not torch.equal(step1[k], step2[k]) for k in step1)


# --- distillation (speechllm/distill.py): one process, resumed, and 2 ZeRO-3 ranks ------------------------------------

DISTILL = ["--distill_weight", "2.0", "--distill_temperature", "2.0", "--ce_weight", "0.5"]


@pytest.fixture(scope="module")
def distill_data(data):
    """The same clips and answers, each with a transcript (another line's text: teacher rows differ in length)."""
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    for row, transcript in zip(rows, TEXTS[1:] + TEXTS[:1]):
        row["transcript"] = transcript
    return write_jsonl(str(Path(data).with_name("distill.jsonl")), rows)


@pytest.fixture(scope="module")
def distilled(tiny, distill_data, tmp_path_factory):
    """One process, batch 2 x 2, 2 epochs with distillation: the reference for the ZeRO-3 and the resumed runs."""
    output_dir = tmp_path_factory.mktemp("distilled")
    args = train_args(tiny, distill_data, output_dir, *SEQUENTIAL_SGD, *DISTILL, "--num_train_epochs", "2")
    args[args.index("--per_device_train_batch_size") + 1] = str(BATCH * NPROC)
    return train(args + ["--save_steps", "2"])


def test_distillation_logs_its_terms_and_resumes_exactly(tiny, distill_data, distilled, tmp_path):
    logged = [h for h in distilled.state.log_history if "loss" in h]
    assert len(logged) == 2 * STEPS_PER_EPOCH
    for h in logged:  # one process, no accumulation: the loss is exactly the weighted sum of the logged terms
        assert h["kl"] > 0 and h["ce"] > 0, h
        assert h["loss"] == pytest.approx(0.5 * h["ce"] + 2.0 * h["kl"], rel=1e-4), h
    assert set(weights(distilled.args.output_dir)) == projector_keys(distilled.model)

    args = train_args(tiny, distill_data, tmp_path, *SEQUENTIAL_SGD, *DISTILL, "--num_train_epochs", "2")
    args[args.index("--per_device_train_batch_size") + 1] = str(BATCH * NPROC)
    train(args + ["--save_steps", "2"], [StopAt(2)])
    record = Record()
    train(args + ["--save_steps", "2"], [record])
    assert record.steps == [3, 4]
    assert_same(weights(tmp_path), weights(distilled.args.output_dir))


def test_distillation_with_gradient_checkpointing_takes_the_same_steps(tiny, distill_data, distilled, tmp_path):
    args = train_args(tiny, distill_data, tmp_path, *SEQUENTIAL_SGD, *DISTILL, "--num_train_epochs", "2")
    args[args.index("--per_device_train_batch_size") + 1] = str(BATCH * NPROC)
    checkpointed = train(args + ["--save_strategy", "no", "--gradient_checkpointing"])
    assert checkpointed.model.llm.is_gradient_checkpointing  # the teacher runs through it too, without gradients
    assert_same(weights(tmp_path), weights(distilled.args.output_dir), atol=1e-6)


def test_zero3_distillation_is_one_data_parallel_job(tiny, distill_data, distilled, tmp_path):
    args = train_args(tiny, distill_data, tmp_path, *SEQUENTIAL_SGD, *DISTILL, "--num_train_epochs", "2")
    runs, rank_weights = torchrun(args + ["--save_steps", "2", "--deepspeed", str(DS_CONFIG)], tmp_path, deepspeed=True)
    assert_one_data_parallel_job(runs, rank_weights, tmp_path, list(range(1, 2 * STEPS_PER_EPOCH + 1)))
    assert all(run["modules"]["llm"]["zero3"] for run in runs)
    assert set(weights(tmp_path / "checkpoint-2")) == projector_keys(distilled.model)
    # Teacher and KL normalised over both ranks' answer tokens: the one-process steps.
    assert_same(rank_weights[0], weights(distilled.args.output_dir), atol=1e-4)


def test_zero3_distillation_with_lora_takes_the_one_process_steps(tiny, distill_data, tmp_path):
    """With LoRA the teacher is the LLM with its adapters off, switched off and on again inside every step: under
    ZeRO-3 the LoRA weights still train, and as one process trains them."""
    lora = ["--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0.0", "--lora_target_modules", "q_proj,v_proj"]
    common = [*SEQUENTIAL_SGD, *DISTILL, *lora, "--num_train_epochs", "1", "--save_steps", "2"]
    one_args = train_args(tiny, distill_data, tmp_path / "one", *common)
    one_args[one_args.index("--per_device_train_batch_size") + 1] = str(BATCH * NPROC)
    one = train(one_args)
    output_dir = tmp_path / "zero3"
    args = train_args(tiny, distill_data, output_dir, *common, "--deepspeed", str(DS_CONFIG))
    runs, rank_weights = torchrun(args, output_dir, deepspeed=True)
    assert_one_data_parallel_job(runs, rank_weights, output_dir, list(range(1, STEPS_PER_EPOCH + 1)))
    final = weights(output_dir)
    assert set(final) == set(one.model.trained_parameters())
    assert any(final[k].abs().max() > 0 for k in final if "lora_B" in k), "LoRA's B never left zero"
    assert_same(rank_weights[0], weights(one.args.output_dir), atol=1e-4)


# --- training the chooser to rank (speechllm/ranking.py): one process and 2 ZeRO-3 ranks ------------------------------

# The tiny LLM's scores of alike hypotheses lie hundreds of nats apart: a softmax softened this much still moves.
RANKING = ["--nbest", "3", "--ranking_loss", "mwer", "--ranking_temperature", "100"]
LORA = ["--lora_rank", "2", "--lora_dropout", "0.0", "--lora_target_modules", "q_proj,v_proj"]


@pytest.fixture(scope="module")
def ranking_data(data):
    """The same clips, each with a cached n-best: its own text, another line's, its words backwards (2 or 3 distinct
    hypotheses, so ranks pad answers of other counts and lengths)."""
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    for row, other in zip(rows, TEXTS[1:] + TEXTS[:1]):
        row["nbest"] = [other, row["txt"], " ".join(row["txt"].split()[::-1])]
    return write_jsonl(str(Path(data).with_name("ranking.jsonl")), rows)


def test_zero3_ranking_with_lora_takes_the_one_process_steps(tiny, ranking_data, tmp_path):
    """The ranking loss, its prompt pass shared through the KV cache, with LoRA and the feature weights trained:
    2 ZeRO-3 ranks of batch 2 take the steps of one process of batch 4 (the loss a mean over clips)."""
    from speechllm.packaged_models import whisper_tiny_en

    def ranking_args(output_dir, *extra):
        args = train_args(tiny, ranking_data, output_dir, *SEQUENTIAL_SGD, *RANKING, *LORA, *extra)
        args[args.index("--whisper_model_name_or_path") + 1] = whisper_tiny_en()  # Whisper's scores need its text
        return args + ["--num_train_epochs", "1", "--save_strategy", "no"]

    one_args = ranking_args(tmp_path / "one")
    one_args[one_args.index("--per_device_train_batch_size") + 1] = str(BATCH * NPROC)
    one = train(one_args)
    args = ranking_args(tmp_path / "zero3", "--deepspeed", str(DS_CONFIG))
    runs, rank_weights = torchrun(args, tmp_path / "zero3", deepspeed=True)
    assert [run["steps"] for run in runs] == [list(range(1, STEPS_PER_EPOCH + 1))] * NPROC
    assert all(run["modules"]["llm"]["zero3"] for run in runs)
    final = weights(tmp_path / "zero3")
    assert set(final) == set(one.model.trained_parameters()) >= {"rescore_weights.weight"}
    assert any(final[k].abs().max() > 0 for k in final if "lora_B" in k), "LoRA's B never left zero"
    assert not torch.equal(final["rescore_weights.weight"], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    assert_same(rank_weights[1], rank_weights[0])
    assert_same(rank_weights[0], weights(one.args.output_dir), atol=1e-4)


class OutputDtypes(TrainerCallback):
    """The dtype of the LLM's output layer's results during training: bf16 under autocast, fp32 without."""

    def __init__(self):
        self.dtypes = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.llm.get_output_embeddings().register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype))


@pytest.mark.parametrize("native", [True, False])
def test_training_autocasts_to_bf16_where_the_cpu_computes_it(tiny, data, tmp_path, monkeypatch, native):
    monkeypatch.setattr(training, "computes_bf16_natively", lambda device: native)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # tests pin fp32 (conftest): here the default decides
    dtypes = OutputDtypes()
    train(train_args(tiny, data, tmp_path, "--max_steps", "1", "--save_strategy", "no"), [dtypes])
    assert dtypes.dtypes == {torch.bfloat16 if native else torch.float32}


def test_length_grouped_batches_are_the_training_default(tmp_path):
    parser = training.HfArgumentParser(training.SpeechTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--use_cpu"])
    assert args.train_sampling_strategy == "group_by_length"


@pytest.mark.parametrize("fails", [False, True])
def test_train_py_ends_its_process_group_whether_or_not_it_fails(monkeypatch, fails):
    # Under torchrun a process group left to the interpreter's exit can abort a process whose work is done (gloo's
    # threads torn down: SIGABRT); train.py ends it itself, also when the run stops on an error.
    ended = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: not ended)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda group=None: ended.append(group))

    def main(argv):
        if fails:
            raise InputError("--data_path missing.jsonl: no such file")

    monkeypatch.setattr(training, "main", main)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    if fails:
        with pytest.raises(SystemExit):
            training.command_line()
    else:
        training.command_line()
    assert ended == [None]


def forward_dtypes(model, batch) -> set:
    """The dtypes of the LLM's output layer's results in one forward of the model, outside any Trainer."""
    dtypes = set()
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return dtypes


def test_after_bf16_training_and_evaluation_the_model_computes_in_its_own_precision(tiny, data, tmp_path, monkeypatch):
    # accelerate wraps the model's forward in bf16 autocast for the Trainer: a notebook's forward after train() or
    # evaluate() ran in bf16 too, and so did a later fp32 training of the same model
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # tests pin fp32 (conftest)
    dtypes = OutputDtypes()
    args = train_args(tiny, data, tmp_path, "--max_steps", "1", "--save_strategy", "no", "--bf16", "true")
    trainer = train(args + ["--eval_data_path", data], [dtypes])
    assert dtypes.dtypes == {torch.bfloat16}  # training autocasts
    batch = Collator(trainer.model.processor)([SpeechDataset(data)[i] for i in range(BATCH)])
    assert forward_dtypes(trainer.model, batch) == {torch.float32}
    dtypes.dtypes.clear()
    trainer.evaluate()
    assert dtypes.dtypes == {torch.bfloat16}  # and evaluation with the Trainer, after training as before it
    assert forward_dtypes(trainer.model, batch) == {torch.float32}


def test_evaluate_on_its_own_leaves_the_model_in_its_own_precision(make_model, data, tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    model = make_model()
    parser = training.HfArgumentParser(training.SpeechTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "true", "--report_to", "none", "--max_steps", "1"]
    )
    args.remove_unused_columns = False
    dataset, collator = SpeechDataset(data), Collator(model.processor)
    trainer = training.SpeechLLMTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, data_collator=collator
    )
    dtypes = OutputDtypes()
    dtypes.on_train_begin(args, None, None, model=model)
    trainer.evaluate()
    assert dtypes.dtypes == {torch.bfloat16}
    batch = collator([dataset[i] for i in range(BATCH)])
    assert forward_dtypes(model, batch) == {torch.float32}
    dtypes.dtypes.clear()
    trainer.train()  # accelerate prepares a model once: its training autocasts all the same
    assert dtypes.dtypes == {torch.bfloat16}
