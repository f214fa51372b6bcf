"""int8 decoding steps on CPU: each linear layer of the LLM keeps its float weight for the prompt pass and gains an
int8 copy (per output channel, activations quantised on the fly) for the decoding steps, which are bound by the
bytes of weights they read: a quarter of fp32's.

The prompt pass stays in float because it holds projected audio and text side by side, whose magnitudes differ too
much for the one activation scale a dynamically quantised layer uses: quantising it too loses the audio (on the
shipped model, the answers stop following it). Inference only, and the steps' outputs change a little (measure WER
before relying on it); LoRA is merged into the weights it adapts first. torch.ao's eager quantisation is deprecated
in favour of torchao, whose CPU int8 path needs torch.compile; this one runs eagerly.
"""

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig

from .lora import merge_lora


class Int8StepLinear(nn.Module):
    """A float linear layer for inputs of many positions, its int8 copy for one new position a row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        linear.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(?s).*(deprecated|torchao)")
            self.int8 = DynamicInt8Linear.from_float(linear)
        del linear.qconfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.int8(x) if x.shape[-2] == 1 else self.linear(x)


def quantize_llm_int8(llm):
    """Give every linear layer of an LLM on CPU its int8 copy for decoding steps, in place; returns the LLM."""
    if llm.device.type != "cpu":
        raise ValueError(f"int8 dynamic quantisation runs on CPU, the LLM is on {llm.device}")
    merge_lora(llm)
    for parent in list(llm.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, Int8StepLinear(child))
    return llm
