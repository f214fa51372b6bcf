import os

import pytest
import torch
from tiny_models import make_llm, make_whisper, write_jsonl, write_tone

from speechllm import SpeechLLM, SpeechLLMConfig


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of tiny models and a small dataset of distinct tones, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    texts = ["hello world", "one two three", "the quick brown fox", "she sells sea shells"]
    rows = [
        {
            "key": f"utt{i}",
            "wav": os.path.basename(write_tone(str(root / f"utt{i}.wav"), 0.6 + 0.5 * i, 220 * (i + 1))),
            "txt": text,
        }
        for i, text in enumerate(texts)
    ]
    return {
        "whisper": make_whisper(str(root / "whisper.pt")),
        "whisper128": make_whisper(str(root / "whisper128.pt"), n_mels=128),
        "qwen2": make_llm(str(root / "qwen2"), "qwen2"),
        "llama": make_llm(str(root / "llama"), "llama"),
        "jsonl": write_jsonl(str(root / "data.jsonl"), rows),
        "root": root,
        "texts": texts,
    }


@pytest.fixture
def make_model(tiny):
    def make(llm="qwen2", whisper="whisper", **config):
        config = {"projector_hidden_size": 32, "model_dtype": "float32", **config}
        torch.manual_seed(0)
        return SpeechLLM(
            SpeechLLMConfig(whisper_model_name_or_path=tiny[whisper], llm_model_name_or_path=tiny[llm], **config)
        )

    return make


@pytest.fixture(autouse=True, scope="session")
def fp32_training():
    """Training in tests is fp32 on every machine unless a test asks for bf16: train.py's default autocasts to bf16
    where the CPU computes it natively, which would make figures depend on the machine that runs them. Session-wide,
    so that module fixtures which train are pinned too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        yield


@pytest.fixture(autouse=True)
def torch_threads():
    """Each test starts with the session's thread count: bench/speed.py sets torch's for its run (tests call it in
    process), and a test comparing its decodes with a subprocess's must not depend on which tests ran before it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
