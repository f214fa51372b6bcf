"""Where a saved SpeechLLM is loaded from (folder, its weights file, a hub id offline), AutoModel, push_to_hub."""

import shutil

import huggingface_hub
import pytest
import torch
from tiny_models import HUB_COMMIT as COMMIT
from tiny_models import build_hub_cache
from transformers import AutoConfig, AutoModel, TrainingArguments

from speechllm import SpeechLLM, SpeechLLMConfig
from speechllm.data import Collator, SpeechDataset
from speechllm.training import ModelArguments, SpeechLLMTrainer, build_model


@pytest.fixture
def saved(make_model, tmp_path):
    model = make_model(projector_kernel_size=3)
    torch.nn.init.normal_(model.projector.linear2.weight)  # not what a fresh model would start from
    model.generation_config.repetition_penalty = 1.3  # saved decoding defaults travel with the weights
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and a cache of the test's own, as the environment would set them."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def projector_state(model):
    return {k: v.clone() for k, v in model.projector.state_dict().items()}


def assert_same_projector(loaded, model):
    assert loaded.config.projector_kernel_size == 3 and loaded.generation_config.repetition_penalty == 1.3
    for key, value in projector_state(model).items():
        torch.testing.assert_close(loaded.projector.state_dict()[key], value, rtol=0, atol=0)


def test_folder_weights_file_and_offline_hub_id_load_the_same_projector(saved, offline_hub):
    model, folder = saved
    assert_same_projector(SpeechLLM.from_pretrained(folder), model)
    assert_same_projector(SpeechLLM.from_pretrained(folder / "model.safetensors"), model)  # WeST's way
    build_hub_cache(offline_hub, "someone/tiny-speechllm", folder)
    assert_same_projector(SpeechLLM.from_pretrained("someone/tiny-speechllm"), model)
    assert_same_projector(SpeechLLM.from_pretrained("someone/tiny-speechllm", revision=COMMIT), model)


def test_unloadable_projector_paths_are_clear_errors(saved, offline_hub, tmp_path):
    _, folder = saved
    with pytest.raises(
        FileNotFoundError,
        match=r"^someone/absent: no such folder or file, nor in the hub cache \(HF_HUB_OFFLINE is set\)$",
    ):
        SpeechLLM.from_pretrained("someone/absent")
    with pytest.raises(FileNotFoundError, match=r"^/no/such/dir: no such folder or file$"):
        SpeechLLM.from_pretrained("/no/such/dir")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"config.json: expected a saved SpeechLLM's folder or its model.safetensors"):
        SpeechLLM.from_pretrained(tmp_path / "config.json")


def test_auto_classes_know_speechllm(saved, tiny):
    model, folder = saved
    assert isinstance(AutoConfig.from_pretrained(folder), SpeechLLMConfig)
    loaded = AutoModel.from_pretrained(folder)
    assert type(loaded) is SpeechLLM
    assert_same_projector(loaded, model)
    batch = Collator(model.processor)([SpeechDataset(tiny["jsonl"])[0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_a_saved_model_in_a_subfolder_loads_and_proxies_are_refused(saved, tmp_path):
    model, folder = saved
    shutil.copytree(folder, tmp_path / "repo" / "asr")
    assert_same_projector(AutoModel.from_pretrained(tmp_path / "repo", subfolder="asr"), model)
    with pytest.raises(ValueError, match=r"^proxies: huggingface_hub takes them from the HTTPS_PROXY"):
        SpeechLLM.from_pretrained(folder, proxies={"https": "proxy:3128"})


def test_push_to_hub_uploads_the_saved_folder(saved, monkeypatch, tmp_path):
    model, _ = saved
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kw: (
            calls.append(("create", repo_id, kw)) or huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")
        ),
    )

    def upload_folder(self, **kw):
        calls.append(("upload", kw["repo_id"], sorted(p.name for p in (tmp_path / "pushed").iterdir())))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{COMMIT}",
            commit_message="",
            commit_description="",
            oid=COMMIT,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="someone/pushed", private=True)
    assert calls == [
        ("create", "someone/pushed", {"private": True, "exist_ok": True}),
        ("upload", "someone/pushed", ["config.json", "generation_config.json", "model.safetensors"]),
    ]


def test_push_to_hub_offline_stops_with_a_clear_error_after_saving(saved, offline_hub, tmp_path):
    model, _ = saved
    with pytest.raises(RuntimeError, match=r"push_to_hub: could not push .*pushed to 'pushed'"):
        model.save_pretrained(tmp_path / "pushed", push_to_hub=True)
    assert (tmp_path / "pushed" / "model.safetensors").is_file()  # saved all the same


def test_trainer_push_to_hub_pushes_the_final_model(saved, monkeypatch, tmp_path):
    model, _ = saved
    pushed = []
    monkeypatch.setattr(SpeechLLMTrainer, "init_hf_repo", lambda self, **kw: None)  # no hub to create a repo on
    monkeypatch.setattr(SpeechLLMTrainer, "push_to_hub", lambda self, **kw: pushed.append(kw["commit_message"]))
    args = TrainingArguments(str(tmp_path / "run"), push_to_hub=True, hub_model_id="someone/run", report_to="none")
    trainer = SpeechLLMTrainer(model=model, args=args, data_collator=Collator(model.processor))
    trainer.save_model()
    assert pushed == ["Model save"] and (tmp_path / "run" / "model.safetensors").is_file()
    trainer.save_model(_internal_call=True)  # what push_to_hub itself calls: no second push
    assert pushed == ["Model save"]


def test_trainer_refuses_batch_splits_that_separate_windows_from_clips(saved, monkeypatch, tmp_path):
    model, _ = saved
    split = TrainingArguments(str(tmp_path / "a"), accelerator_config={"split_batches": True}, report_to="none")
    with pytest.raises(ValueError, match="split_batches would split audio windows from their clips"):
        SpeechLLMTrainer(model=model, args=split, data_collator=Collator(model.processor))
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"nn.DataParallel.*torchrun --nproc_per_node=N"):
        SpeechLLMTrainer(
            model=model,
            args=TrainingArguments(str(tmp_path / "b"), report_to="none"),
            data_collator=Collator(model.processor),
        )


def test_trainer_push_to_hub_without_a_hub_stops_before_training(saved, offline_hub, tmp_path):
    model, _ = saved
    args = TrainingArguments(str(tmp_path / "run"), push_to_hub=True, hub_model_id="someone/run", report_to="none")
    with pytest.raises(ConnectionError, match="offline mode is enabled"):
        SpeechLLMTrainer(model=model, args=args, data_collator=Collator(model.processor))


def test_training_starts_from_a_weights_file_or_a_hub_id_too(saved, offline_hub):
    model, folder = saved
    assert_same_projector(build_model(ModelArguments(projector_model_path=str(folder / "model.safetensors"))), model)
    build_hub_cache(offline_hub, "someone/start", folder)
    assert_same_projector(build_model(ModelArguments(projector_model_path="someone/start")), model)
