"""LoRA inside the LLM (--lora_rank): only the projector and the LoRA weights train, are saved and come back;
a saved projector-only model gains fresh LoRA; resume stays exact; ZeRO-3 on 2 CPU ranks gathers only them."""

from pathlib import Path

import pytest
import torch
from test_training import (
    DS_CONFIG,
    SEQUENTIAL_SGD,
    STEPS_PER_EPOCH,
    StopAt,
    assert_one_data_parallel_job,
    assert_same,
    checkpoints,
    data,  # noqa: F401 (the fixture)
    torchrun,
    train,
    train_args,
    weights,
)

from speechllm import SpeechLLM
from speechllm.data import Collator, SpeechDataset
from speechllm.lora import lora_disabled
from speechllm.training import ModelArguments, build_model

LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0.0", "--lora_target_modules", "q_proj,v_proj"]


def lora_keys(state) -> set[str]:
    return {key for key in state if "lora_" in key}


def logits(model, jsonl, n=3):
    dataset = SpeechDataset(jsonl)
    batch = Collator(model.processor)([dataset[i] for i in range(n)])
    batch.pop("labels")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_lora_adds_only_trainable_low_rank_weights_that_start_neutral(make_model, tiny):
    plain, lora = make_model(), make_model(lora_rank=4, lora_target_modules="q_proj,v_proj")
    trained = lora.trained_parameters()
    layers = lora.llm.config.num_hidden_layers
    assert len(lora_keys(trained)) == layers * 2 * 2  # A and B of q_proj and v_proj in every layer
    assert {name for name, p in lora.named_parameters() if p.requires_grad} == set(trained)
    assert not any(p.requires_grad for name, p in lora.llm.named_parameters() if "lora_" not in name)
    # LoRA's B starts at zero: the LLM computes exactly what it did without LoRA.
    torch.testing.assert_close(logits(lora, tiny["jsonl"]), logits(plain, tiny["jsonl"]), atol=1e-6, rtol=0)
    all_linear = lora_keys(make_model(lora_rank=2).trained_parameters())
    assert len(all_linear) > len(lora_keys(trained)) and not any("lm_head" in k for k in all_linear)


@pytest.fixture(scope="module")
def lora_run(tiny, data, tmp_path_factory):  # noqa: F811
    output_dir = tmp_path_factory.mktemp("lora")
    return train(train_args(tiny, data, output_dir, *LORA, "--max_steps", "4", "--save_steps", "2"))


def test_lora_trains_saves_and_reloads(lora_run, tiny):
    model, output_dir = lora_run.model, lora_run.args.output_dir
    saved = weights(output_dir)
    assert set(saved) == set(model.trained_parameters())
    assert lora_keys(saved) and all(k.startswith("projector.") for k in set(saved) - lora_keys(saved))
    assert any(saved[k].abs().max() > 0 for k in saved if "lora_B" in k), "LoRA's B never left zero: it did not train"
    for checkpoint in checkpoints(output_dir):
        assert set(weights(checkpoint)) == set(saved)
    loaded = SpeechLLM.from_pretrained(output_dir)
    assert loaded.config.lora_rank == 4
    torch.testing.assert_close(logits(loaded, tiny["jsonl"]), logits(model, tiny["jsonl"]), atol=1e-6, rtol=0)


def test_lora_disabled_is_the_frozen_llm(lora_run, make_model, tiny):
    model = lora_run.model
    plain = make_model()
    plain.projector.load_state_dict(model.projector.state_dict())
    with lora_disabled(model.llm):
        without = logits(model, tiny["jsonl"])
    torch.testing.assert_close(without, logits(plain, tiny["jsonl"]), atol=1e-6, rtol=0)
    assert (logits(model, tiny["jsonl"]) - without).abs().max() > 1e-4, "LoRA changed nothing"


def test_lora_checkpoint_refuses_a_model_without_it_or_of_another_rank(lora_run):
    with pytest.raises(ValueError, match="unexpected"):
        SpeechLLM.from_pretrained(lora_run.args.output_dir, lora_rank=0)
    with pytest.raises(ValueError, match="shape"):
        SpeechLLM.from_pretrained(lora_run.args.output_dir, lora_rank=8)


def test_lora_resume_is_exact(tiny, data, lora_run, tmp_path):  # noqa: F811
    args = train_args(tiny, data, tmp_path, *LORA, "--max_steps", "4", "--save_steps", "2")
    train(args, [StopAt(2)])
    train(args)
    assert_same(weights(tmp_path), weights(lora_run.args.output_dir))


def test_projector_model_path_keeps_what_was_saved(make_model, tmp_path):
    saved = make_model(prompt="<speech>Write down what is said.", system_prompt="", projector_kernel_size=3)
    saved.save_pretrained(tmp_path)
    config = saved.config
    model = build_model(ModelArguments(projector_model_path=str(tmp_path)))
    for name in ("whisper_model_name_or_path", "llm_model_name_or_path", "model_dtype", "prompt", "system_prompt"):
        assert getattr(model.config, name) == getattr(config, name), name
    assert (model.config.projector_kernel_size, model.config.projector_hidden_size) == (3, 32)
    assert_same(model.state_dict(), saved.state_dict())
    assert build_model(ModelArguments(projector_model_path=str(tmp_path), prompt="<speech>Hi")).config.prompt == (
        "<speech>Hi"
    )


def test_lora_options_on_a_projector_only_model_add_fresh_lora(make_model, tmp_path):
    saved = make_model()
    saved.save_pretrained(tmp_path)
    model = build_model(ModelArguments(projector_model_path=str(tmp_path), lora_rank=4, lora_target_modules="q_proj"))
    assert model.config.lora_rank == 4
    assert lora_keys(model.trained_parameters())
    projector = {k: v for k, v in model.trained_parameters().items() if k.startswith("projector.")}
    assert_same(projector, dict(saved.projector.named_parameters(prefix="projector")))


def test_zero3_with_lora_on_two_cpu_ranks(tiny, data, tmp_path):  # noqa: F811
    args = [*SEQUENTIAL_SGD, *LORA, "--num_train_epochs", "1", "--save_steps", "1", "--deepspeed", str(DS_CONFIG)]
    runs, rank_weights = torchrun(train_args(tiny, data, tmp_path, *args), tmp_path, deepspeed=True)
    assert_one_data_parallel_job(runs, rank_weights, tmp_path, list(range(1, STEPS_PER_EPOCH + 1)))
    final = weights(tmp_path)
    assert lora_keys(final) and set(weights(checkpoints(tmp_path)[0])) == set(final)
    first = weights(Path(tmp_path) / "checkpoint-1")
    assert any(not torch.equal(first[k], final[k]) for k in lora_keys(final)), "LoRA did not train under ZeRO-3"


@pytest.fixture
def lora_with_dropout(make_model, tmp_path):
    """A saved LoRA model whose dropout would show: trained-looking B weights and a high dropout rate."""
    model = make_model(lora_rank=4, lora_target_modules="q_proj,v_proj", lora_dropout=0.5)
    torch.manual_seed(1)
    for name, parameter in model.trained_parameters().items():
        if "lora_B" in name or name.startswith("projector.linear2"):
            torch.nn.init.normal_(parameter, std=0.5)
    model.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_a_loaded_model_answers_the_same_way_twice(lora_with_dropout, tiny):
    # from_pretrained returned a model in training mode: LoRA's dropout then changed every answer (issue 21).
    loaded = SpeechLLM.from_pretrained(lora_with_dropout)
    assert not any(module.training for module in loaded.modules())
    dataset = SpeechDataset(tiny["jsonl"])
    batch = Collator(loaded.processor)([dataset[i] for i in range(3)])
    batch.pop("labels")
    with torch.no_grad():
        first, second = loaded(**batch).logits, loaded(**batch).logits
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    # In training mode the same calls differ: the dropout is there to be switched off.
    with torch.no_grad():
        assert not torch.equal(loaded.train()(**batch).logits, loaded(**batch).logits)
    loaded.eval()
    wavs = [e.wav for e in dataset.examples]
    assert loaded.transcribe(wavs, max_new_tokens=6) == loaded.transcribe(wavs, max_new_tokens=6)


def test_recognize_writes_the_same_results_twice(lora_with_dropout, tiny, tmp_path):
    from speechllm.recognition import main as recognize_main

    results = []
    for run in ("a", "b"):
        path = tmp_path / f"{run}.txt"
        recognize_main(
            [
                "--projector_model_path",
                lora_with_dropout,
                "--data_path",
                tiny["jsonl"],
                "--result_path",
                str(path),
                "--num_beams",
                "1",
                "--max_new_tokens",
                "6",
            ]
        )
        results.append(path.read_text())
    assert results[0] == results[1]
    eval_answers = (
        SpeechLLM.from_pretrained(lora_with_dropout)
        .eval()
        .transcribe([e.wav for e in SpeechDataset(tiny["jsonl"]).examples], max_new_tokens=6)
    )
    assert [line.split("\t")[1] for line in results[0].splitlines()] == [" ".join(a.split()) for a in eval_answers]
