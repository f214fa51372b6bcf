"""int8 LLM for CPU decoding: the linear layers dynamically quantised (int8 weights per output channel, activations
quantised on the fly), so a decoding step reads a quarter of the fp32 weight bytes and runs int8 kernels.

Inference only, and it changes the outputs a little (measure WER before relying on it): LoRA is merged into the
weights it adapts first, after which the model has no trained LLM weights left to save. torch.ao's eager
quantisation is deprecated in favour of torchao, whose CPU int8 path needs torch.compile; this one runs eagerly.
"""

import warnings

import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from .lora import merge_lora


def quantize_llm_int8(llm):
    """Quantise an LLM on CPU in place (SpeechLLM: quantize_llm_int8(model.llm)); returns it."""
    if llm.device.type != "cpu":
        raise ValueError(f"int8 dynamic quantisation runs on CPU, the LLM is on {llm.device}")
    merge_lora(llm)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*(deprecated|torchao)")
        quantize_dynamic(llm, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return llm
