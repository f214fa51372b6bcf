"""Logit distillation (speechllm/distill.py) on tiny models: the teacher's batch, the KL over the answer, what it
trains, batching, and the data it needs."""

import numpy as np
import pytest
import torch
from tiny_models import write_jsonl, write_tone

from speechllm import AUDIO_PLACEHOLDER, training
from speechllm.audio import SAMPLE_RATE, num_audio_tokens
from speechllm.data import DataError
from speechllm.distill import DistillArguments, Distillation, DistillCollator, kl_sum, teacher_logits, text_batch
from speechllm.processor import IGNORE_INDEX

PROMPTS = [AUDIO_PLACEHOLDER, f"Summarise:\n{AUDIO_PLACEHOLDER}", None]  # None: the model's own prompt


def clip(seconds, seed=0):
    return np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32) * 0.1


def items(seconds, prompts, transcripts, answers):
    return [
        {"audio": clip(s, i), "prompt": p, "transcript": t, "txt": a}
        for i, (s, p, t, a) in enumerate(zip(seconds, prompts, transcripts, answers))
    ]


# Clips, transcripts and answers of different lengths, and different prompts: student rows, teacher rows and the two
# batches all differ in length.
EXAMPLES = items(
    [0.4, 1.7, 1.0],
    PROMPTS,
    ["hello world", "the quick brown fox jumps over the lazy dog", "seven"],
    ["one two", "she sells sea shells by the sea shore", "the quick brown fox"],
)


class WritesEmbeddings(torch.nn.Module):
    """In place of the projector: writes the given (tokens, hidden) rows over the audio positions, one a clip."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, features):
        return torch.nn.utils.rnn.pad_sequence(self.rows, batch_first=True)


def distill(model, batch, ce_weight=0.0, temperature=1.0, num_items_in_batch=None):
    """The training loss with only the KL term (by default), as the Trainer calls it."""
    args = DistillArguments(distill_weight=1.0, ce_weight=ce_weight, distill_temperature=temperature)
    return Distillation(args)(model, model, **batch, num_items_in_batch=num_items_in_batch).loss


def test_the_teacher_reads_the_transcript_in_place_of_the_audio_and_the_same_answer(make_model):
    model = make_model()
    batch = DistillCollator(model.processor)(EXAMPLES)
    processor = model.processor
    for row, example in enumerate(EXAMPLES):
        ids = batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()].tolist()
        prompt = example["prompt"] or processor.prompt
        answer = processor.response_ids(prompt, example["txt"])
        assert ids[len(ids) - len(answer) :] == answer
        text = processor.tokenizer.decode(ids[: len(ids) - len(answer)])
        chat = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.replace(AUDIO_PLACEHOLDER, example["transcript"])}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert text == chat
    assert batch["teacher_input_ids"].shape != batch["input_ids"].shape  # the two batches differ in length


def test_zero_when_the_student_reads_the_teachers_embeddings_positive_otherwise(make_model):
    model = make_model()
    seconds = [0.3, 1.0]  # 3 and 10 audio tokens: rows of different lengths
    counts = [num_audio_tokens(int(s * SAMPLE_RATE), model.config.projector_kernel_size) for s in seconds]
    transcripts = [" ".join(["the"] * (n - 1)) for n in counts]  # "the" then " the" x (n - 1): n tokens
    examples = items(seconds, [PROMPTS[1], None], transcripts, ["one two", "she sells sea shells"])
    batch = DistillCollator(model.processor)(examples)
    transcript_ids = [model.processor._encode(t) for t in transcripts]
    assert [len(ids) for ids in transcript_ids] == counts
    # Each teacher row is its student row with the transcript's tokens at the audio positions: identical inputs.
    expected_ids = batch["input_ids"].clone()
    expected_ids[batch["audio_mask"]] = torch.tensor(sum(transcript_ids, []))
    assert torch.equal(batch["teacher_input_ids"], expected_ids)
    assert torch.equal(batch["teacher_attention_mask"], batch["attention_mask"])

    with torch.no_grad():
        real = distill(model, batch)
        embed = model.llm.get_input_embeddings()
        model.projector = WritesEmbeddings([embed(torch.tensor(ids)) for ids in transcript_ids])
        same = distill(model, batch)
    assert abs(float(same)) < 1e-6, float(same)
    assert float(real) > 1e-2, float(real)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_batch_of_different_lengths_gives_the_loss_of_each_alone(make_model, temperature):
    model = make_model()
    collate = DistillCollator(model.processor)
    batch = collate(EXAMPLES)
    tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        together = distill(model, batch, ce_weight=0.5, temperature=temperature, num_items_in_batch=tokens)
        alone = [
            distill(model, collate([e]), ce_weight=0.5, temperature=temperature, num_items_in_batch=tokens)
            for e in EXAMPLES
        ]
        # The KL term alone too, summed over the answer tokens.
        kls = []
        for b in [batch] + [collate([e]) for e in EXAMPLES]:
            student = model(**{k: v for k, v in b.items() if not k.startswith("teacher_")}).logits
            teacher = teacher_logits(model.llm, b["teacher_input_ids"], b["teacher_attention_mask"], student.shape[1])
            kls.append(kl_sum(student, teacher, b["labels"], temperature))
    assert all(float(kl) > 0 for kl in kls[1:])
    torch.testing.assert_close(kls[0], sum(kls[1:]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together, sum(alone), rtol=1e-5, atol=1e-6)


def test_temperature_scales_as_t_squared_kl_of_softened_distributions():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    labels = torch.tensor([[IGNORE_INDEX, 4, 2]])  # two answer tokens, predicted by positions 0 and 1
    expected = 0.0
    for t in (0, 1):
        p, q = (teacher[0, t] / 3).softmax(-1), (student[0, t] / 3).softmax(-1)
        expected += 9 * float((p * (p.log() - q.log())).sum())
    assert float(kl_sum(student, teacher, labels, temperature=3.0)) == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_only_the_trainable_weights(make_model):
    model = make_model()
    batch = DistillCollator(model.processor)(EXAMPLES)
    distill(model, batch).backward()  # the KL alone (ce_weight 0): it must train the projector on its own
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("projector."))


def test_with_lora_the_teacher_is_the_frozen_base_llm(make_model):
    plain = make_model()
    model = make_model(lora_rank=4, lora_target_modules="q_proj,v_proj", lora_dropout=0.0)
    with torch.no_grad():  # LoRA starts neutral (B = 0): give it weights that change what the LLM computes
        for name, parameter in model.llm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    batch = DistillCollator(model.processor)(EXAMPLES)
    teacher = batch["teacher_input_ids"], batch["teacher_attention_mask"]
    base = teacher_logits(plain.llm, *teacher, 8)
    with torch.no_grad():
        adapted = model.llm(input_ids=teacher[0], attention_mask=teacher[1]).logits[:, -8:]
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(teacher_logits(model.llm, *teacher, 8), base, rtol=0, atol=1e-6)
    distill(model, batch).backward()
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert set(lora) | {f"projector.{n}" for n, _ in model.projector.named_parameters()} == set(
        model.trained_parameters()
    )
    assert all(p.grad is None for name, p in model.named_parameters() if name not in model.trained_parameters())


def test_arguments_are_checked():
    assert not DistillArguments().enabled
    for bad in [{"distill_weight": -1.0}, {"distill_weight": 1.0, "distill_temperature": 0.0}, {"ce_weight": 0.5}]:
        with pytest.raises(ValueError):
            DistillArguments(**bad)


def test_a_line_without_transcript_names_file_and_line(tiny, tmp_path):
    wav = write_tone(str(tmp_path / "a.wav"), 0.5, 300)
    rows = [{"wav": wav, "txt": "an answer", "transcript": "what is said"}, {"wav": wav, "txt": "no transcript"}]
    data = write_jsonl(str(tmp_path / "data.jsonl"), [{**row, "key": str(i)} for i, row in enumerate(rows)])
    args = ["--data_path", data, "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none"]
    # The LLM does not exist: the data is checked before any model loads.
    args += ["--whisper_model_name_or_path", tiny["whisper"], "--llm_model_name_or_path", str(tmp_path / "no_llm")]
    with pytest.raises(DataError, match=r"data.jsonl:2: missing string field 'transcript'"):
        training.main(args + ["--distill_weight", "1"])
    with pytest.raises(ValueError, match="cannot load the LLM"):  # without distillation the data is fine
        training.main(args)


def test_text_batch_without_answers_ends_at_the_assistants_turn(make_model):
    model = make_model()
    batch = text_batch(model.processor, PROMPTS, ["hello world", "one", "the quick brown fox"])
    for row, (prompt, transcript) in enumerate(zip(PROMPTS, ["hello world", "one", "the quick brown fox"])):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == model.processor.text_prompt_ids(prompt or model.processor.prompt, transcript)
