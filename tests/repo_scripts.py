"""The repository's scripts (examples/, bench/) loaded as modules, so tests call their main() in process."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """The script at path, relative to the repository root (e.g. "bench/speed.py"), as a module."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
