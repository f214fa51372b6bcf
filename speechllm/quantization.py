"""int8 decoding steps on CPU: the LLM's projections that read a normalised input (attention q/k/v, MLP gate/up)
keep their float weight for the prompt pass and gain an int8 copy (per output channel, activations quantised on the
fly) for the decoding steps, which are bound by the bytes of weights they read: a byte a weight instead of four.

Dynamic quantisation gives each input one activation scale (7 bits on x86), which only some inputs survive. On
SmolLM2-135M the inputs of the MLP's down projection reach 16,000x their mean magnitude, those of the attention
output and the output layer 20-40x: quantising them too turned "The capital of France is Paris." into French
nonsense, so they stay float. And the prompt pass stays float because it holds projected audio and text side by
side: quantised, the shipped model's answers stopped following the audio. Inference only; the outputs change (measure
WER before relying on it). LoRA is merged into the weights it adapts first. torch.ao's eager quantisation is
deprecated in favour of torchao, whose CPU int8 path needs torch.compile; this one runs eagerly.
"""

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig

from .lora import merge_lora

INT8_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # LLaMA/Qwen/SmolLM/Mistral names


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


def quantize_llm_int8(llm, projections=INT8_PROJECTIONS):
    """Give these linear layers of an LLM on CPU their int8 copy for decoding steps, in place; returns the LLM."""
    if llm.device.type != "cpu":
        raise ValueError(f"int8 dynamic quantisation runs on CPU, the LLM is on {llm.device}")
    merge_lora(llm)
    for parent in list(llm.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear and name in projections:
                setattr(parent, name, Int8StepLinear(child))
    return llm
