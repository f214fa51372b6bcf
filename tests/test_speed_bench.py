"""bench/speed.py: every figure it reports, and the FLOP counts its hardware floors rest on."""

import json

import torch
from repo_scripts import load_script
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from speechllm.quantization import Int8StepLinear, quantize_llm_int8


def is_positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_quick_bench_reports_every_figure(make_model, tiny, tmp_path, capsys):
    make_model().save_pretrained(tmp_path / "model")
    bench = load_script("bench/speed.py")
    out = tmp_path / "speed.json"
    bench.main([tiny["jsonl"], "--model", str(tmp_path / "model"), "--quick", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out

    machine = result["machine"]
    assert is_positive(machine["matmul_flops"]) and is_positive(machine["read_bytes_per_s"])
    assert machine["threads"] == 1 and machine["clock"] == "wall"
    assert all(is_positive(v) for v in result["costs"].values())
    clips, batch = bench.QUICK["limit"], bench.QUICK["batch_size"]
    settings = {(r["audio_mode"], r["batch_size"], r["num_beams"]) for r in result["recognition"]}
    assert settings == {(mode, b, beams) for mode in ("dynamic", "window") for b in (1, batch) for beams in (1, 4)}
    for r in result["recognition"]:
        assert r["clips"] == clips and is_positive(r["audio_seconds"])
        for name in ("seconds", "rtf", "peak_memory_bytes", "generated_tokens"):
            assert is_positive(r[name]), (name, r)
        for phase in ("encoder", "prompt", "steps"):
            assert is_positive(r[phase]["seconds"]) and is_positive(r[phase]["floor_seconds"]), (phase, r)
        batches = -(-clips // r["batch_size"])
        # a prompt pass a batch; beam search's is in two: once a clip, then its last position once a beam
        assert r["prompt"]["calls"] == batches * (1 if r["num_beams"] == 1 else 2)
        steps = r["steps"]
        assert 0 < steps["count"] <= batches * (bench.QUICK["max_new_tokens"] - 1)
        assert is_positive(steps["mean_seconds"]) and steps["row_steps"] >= steps["count"]
        if r["num_beams"] == 1:
            assert 0 < steps["useful_row_fraction"] <= 1
        else:
            assert steps["useful_row_fraction"] is None
        assert isinstance(r["other_seconds"], float)
        assert f"| {r['audio_mode']} | {r['batch_size']} | {r['num_beams']} | {r['rtf']:.3f} |" in printed
    train = result["training"]
    assert (
        train["steps_timed"] == bench.QUICK["train_steps"] - 1
        and train["batch_size"] == bench.QUICK["train_batch_size"]
    )
    for name in ("seconds_per_step", "utterances_per_second", "peak_memory_bytes", "floor_seconds_per_step"):
        assert is_positive(train[name]), name
    assert f"| {train['batch_size']} | {train['utterances_per_second']:.3f} |" in printed


def counted_flops(work) -> int:
    # torch counts attention only as matmuls: the math kernel computes it with them
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        work()
    return counter.get_total_flops()


def test_floors_count_the_flops_torch_counts(make_model):
    """The analytic FLOPs of a decoding step, a prompt pass's linear layers and the encoder are torch's own count."""
    bench = load_script("bench/speed.py")
    model = make_model()
    costs = bench.Costs(model)
    llm, length = model.llm, 20
    embeds = torch.randn(1, length, llm.config.hidden_size)
    with torch.no_grad():
        cache = llm(inputs_embeds=embeds[:, :-1], use_cache=True).cache
    step = counted_flops(lambda: llm(inputs_embeds=embeds[:, -1:], cache=cache, logits_to_keep=1))
    assert step == costs.step_flops([length])

    # torch counts attention over every query-key pair; the floor counts the causal half.
    prompt = counted_flops(lambda: llm(inputs_embeds=embeds, logits_to_keep=1))
    full_attention = costs.attention_flops(length * length)
    assert prompt - full_attention == costs.prompt_flops([length]) - costs.attention_flops(length * (length + 1) // 2)

    frames = 200
    mel = torch.randn(1, model.encoder.dims.n_mels, frames)
    assert counted_flops(lambda: model.encoder(mel, torch.tensor([frames]))) == costs.encoder_flops([frames])

    quantize_llm_int8(model.llm)  # a step then reads the int8 copies: a byte a weight instead of four
    int8 = bench.Costs(model)
    quantized = sum(m.linear.weight.numel() for m in model.llm.modules() if isinstance(m, Int8StepLinear))
    assert (int8.linear_params, int8.output_params) == (costs.linear_params, costs.output_params)
    assert quantized and int8.weight_bytes == costs.weight_bytes - 3 * quantized


def test_training_bench_with_the_encoder_cache_times_the_epochs_after_the_first(make_model, tiny, tmp_path):
    make_model().save_pretrained(tmp_path / "model")
    bench = load_script("bench/speed.py")
    options = ["--quick", "--threads", "1", "--audio_modes", "", "--train_encoder_cache"]
    options += ["--train_sampling_strategy", "random"]
    result = bench.main([tiny["jsonl"], "--model", str(tmp_path / "model"), *options])
    assert result["recognition"] == []
    train = result["training"]
    epoch = -(-bench.QUICK["limit"] // bench.QUICK["train_batch_size"])
    assert train["encoder_cache"] and train["steps_timed"] == bench.QUICK["train_steps"] - epoch
    assert train["sampling"] == "random" and train["bf16"] is False  # tests pin fp32 (conftest)
    assert is_positive(train["utterances_per_second"])
