"""Where bf16 is native: CUDA with bf16, or a CPU whose kernels use AVX512-BF16 or AMX. There bf16 runs 1.7-3x faster
than fp32; elsewhere it is emulated, 5-13x slower (README: Measured), so anything "auto" takes fp32."""

import torch

NATIVE_BF16_CPU_CAPABILITY = "AVX512"  # torch's kernel level (ATEN_CPU_CAPABILITY can cap it lower, e.g. avx2)


def computes_bf16_natively(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return instructions and torch.backends.cpu.get_cpu_capability() == NATIVE_BF16_CPU_CAPABILITY
    return False
