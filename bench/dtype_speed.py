"""fp32 against bf16 on this CPU: the tiny.en encoder on 4 x 5 s clips, and a SmolLM2-135M-shaped LLM's forward and
backward to its input embeddings (what projector training runs through the frozen LLM) on 120 tokens.

    OMP_NUM_THREADS=1 python bench/dtype_speed.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 python bench/dtype_speed.py  # a CPU without bf16

The LLM is randomly initialised with SmolLM2-135M's sizes (no GGUF to de-quantise: speed does not depend on the
values). What it measures is why model_dtype="auto" takes fp32 on CPUs.
"""

import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speechllm.audio import log_mel_batch
from speechllm.encoder import load_whisper_encoder
from speechllm.packaged_models import whisper_tiny_en

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def best_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def llm_step(llm, embeds):
    embeds = embeds.clone().requires_grad_(True)  # the projector's output: the gradient flows back to it
    llm(inputs_embeds=embeds, logits_to_keep=20).logits.float().logsumexp(-1).mean().backward()


def main():
    print(
        f"torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(16000 * 5).astype(np.float32) for _ in range(4)]
    mel, frames = log_mel_batch(clips, 80, 10)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).requires_grad_(False)
    embeds = torch.randn(1, 120, SMOLLM2_135M["hidden_size"])
    for dtype in (torch.float32, torch.bfloat16):
        encoder = load_whisper_encoder(whisper_tiny_en(), dtype)
        with torch.no_grad():
            encoder_seconds = best_seconds(lambda: encoder(mel, frames), 3)
        llm = llm.to(dtype)
        llm_seconds = best_seconds(lambda: llm_step(llm, embeds.to(dtype)), 2)
        print(f"{str(dtype):15} encoder {encoder_seconds:.2f} s   LLM forward+backward {llm_seconds:.2f} s")


if __name__ == "__main__":
    main()
