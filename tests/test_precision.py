"""bf16 autocast by default only where the device computes bf16 natively (speechllm.precision), fp32 elsewhere."""

import pytest
import torch

from speechllm import precision, training


@pytest.mark.parametrize(
    "avx512_bf16, amx, capability, native",
    [
        (True, False, "AVX512", True),
        (False, True, "AVX512", True),  # AMX alone (Sapphire Rapids and later)
        (False, False, "AVX512", False),  # AVX-512 without bf16 instructions: emulated
        (True, True, "AVX2", False),  # kernels capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2): emulated
    ],
)
def test_a_cpu_computes_bf16_natively_with_its_instructions_and_avx512_kernels(
    monkeypatch, avx512_bf16, amx, capability, native
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert precision.computes_bf16_natively(torch.device("cpu")) is native


@pytest.mark.parametrize("supported", [True, False])  # an A100 and a V100
def test_cuda_computes_bf16_natively_where_torch_says_so(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert precision.computes_bf16_natively(torch.device("cuda")) is supported


@pytest.mark.parametrize(
    "native, options, env, bf16",
    [
        (True, [], None, True),  # the default where bf16 is native
        (False, [], None, False),  # and elsewhere
        (True, ["--bf16", "false"], None, False),  # the user's choice wins either way
        (False, ["--bf16"], None, True),
        (True, [], "no", False),  # accelerate's setting is a choice too
    ],
)
def test_training_autocasts_to_bf16_by_default_only_where_native(monkeypatch, tmp_path, native, options, env, bf16):
    monkeypatch.setattr(training, "computes_bf16_natively", lambda device: native)
    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    parser = training.HfArgumentParser(training.SpeechTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--use_cpu", *options])
    assert args.bf16 is bf16
    assert args.mixed_precision == ("bf16" if bf16 else "no")
