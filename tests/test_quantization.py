"""int8 LLM for CPU decoding, and LoRA merged into the weights first."""

import torch

from speechllm.audio import load_audio
from speechllm.data import SpeechDataset
from speechllm.lora import is_lora_parameter, merge_lora
from speechllm.quantization import INT8_PROJECTIONS, Int8StepLinear, quantize_llm_int8


def batch_of(model, tiny):
    audios = [load_audio(e.wav) for e in SpeechDataset(tiny["jsonl"]).examples]
    return model.processor(audios, [None] * len(audios))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_merged_lora_computes_what_the_lora_layers_did(make_model, tiny):
    model = make_model(lora_rank=4).eval()  # no LoRA dropout
    torch.manual_seed(1)
    for name, parameter in model.llm.named_parameters():
        if is_lora_parameter(name):
            torch.nn.init.normal_(parameter, std=0.1)  # lora_B starts at zero: make LoRA change something
    batch = batch_of(model, tiny)
    with_lora = logits(model, batch)
    merge_lora(model.llm)
    assert not any(is_lora_parameter(name) for name, _ in model.llm.named_parameters())
    assert torch.allclose(logits(model, batch), with_lora, atol=1e-4), (logits(model, batch) - with_lora).abs().max()
    assert not torch.allclose(with_lora, logits(make_model(), batch), atol=1e-2)  # LoRA did change the logits


def test_int8_steps_leave_the_prompt_pass_as_it_was_and_decode(make_model, tiny):
    model = make_model(lora_rank=4).eval()
    batch = batch_of(model, tiny)
    prompt = logits(model, batch)
    quantize_llm_int8(model.llm)
    wrapped = {name for name, m in model.llm.named_modules() if isinstance(m, Int8StepLinear)}
    layers = model.llm.config.num_hidden_layers
    assert len(wrapped) == layers * len(INT8_PROJECTIONS) and {n.rsplit(".", 1)[1] for n in wrapped} == set(
        INT8_PROJECTIONS
    )
    assert not any(is_lora_parameter(name) for name, _ in model.llm.named_parameters())
    assert torch.equal(logits(model, batch), prompt)  # the prompt pass is still float
    # One position a row (a decoding step) goes through int8; the same position in a longer input does not.
    x = torch.randn(2, 1, model.llm.config.hidden_size)
    with torch.no_grad():
        step, full = model.llm(inputs_embeds=x).logits, model.llm(inputs_embeds=torch.cat([x, x], 1)).logits[:, :1]
    error = ((step - full).norm() / full.norm()).item()
    assert 0 < error < 0.2, error
    audios = [load_audio(e.wav) for e in SpeechDataset(tiny["jsonl"]).examples]
    hypotheses = model.decode_batch(audios, max_new_tokens=5)
    assert len(hypotheses) == 4 and all(h.finished or len(h.token_ids) == 5 for h in hypotheses)
