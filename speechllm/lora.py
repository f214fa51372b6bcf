"""LoRA inside the frozen LLM: a few trainable low-rank weights beside its frozen ones (peft, injected in place, so
the LLM keeps its class and its forward), so a small LLM can adapt to projected audio and to transcript style."""

import contextlib

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from .errors import InputError

LORA_MARKER = "lora_"  # every parameter peft's LoRA adds has this in its name, and no frozen one does


def add_lora(llm, rank: int, alpha: float, dropout: float, target_modules: str):
    """Inject LoRA into llm in place: target_modules is "all-linear" (every linear layer but the output layer) or a
    comma-separated list of module names such as "q_proj,v_proj". Only the new weights are trainable."""
    if rank <= 0:
        raise ValueError(f"lora_rank must be positive to add LoRA, not {rank}")
    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, torch.nn.Linear)})
    if targets != "all-linear" and not set(targets) & set(linear):  # peft's own error is a multi-line traceback
        raise InputError(
            f"lora_target_modules {target_modules!r} names no layer of the LLM: 'all-linear', or some of "
            f"{','.join(linear)}"
        )
    inject_adapter_in_model(config, llm)
    for name, parameter in llm.named_parameters():
        parameter.requires_grad_(is_lora_parameter(name))
    return llm


def is_lora_parameter(name: str) -> bool:
    return LORA_MARKER in name


def merge_lora(llm):
    """Fold each LoRA layer into the weight it adapts and put that plain layer back in its place (for inference
    that needs plain layers, e.g. quantisation): afterwards the LLM has no LoRA parameters."""
    parents = {id(child): (parent, name) for parent in llm.modules() for name, child in parent.named_children()}
    for layer in [module for module in llm.modules() if isinstance(module, BaseTunerLayer)]:
        layer.merge()
        parent, name = parents[id(layer)]
        setattr(parent, name, layer.get_base_layer())
    return llm


@contextlib.contextmanager
def lora_disabled(llm):
    """The LLM as it was before LoRA (e.g. as a distillation teacher), for the duration of the block."""
    layers = [module for module in llm.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield llm
    finally:
        for layer in layers:
            layer.enable_adapters(True)
