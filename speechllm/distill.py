"""Speech as a prompt, trained by logit distillation (Kang & Roy): the frozen LLM reading the transcript as text is
the teacher, the same LLM reading the projected audio is the student, and the student learns the teacher's
next-token distributions over the answer beside the cross-entropy on the answer's tokens. Per answer token:

    loss = ce_weight * CE(answer | audio) + distill_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

Teacher and student sequences differ in length (a transcript is not as many tokens as its audio), but both are
left-padded and end with the same answer tokens, so the answer fills the same last columns of both: aligning them
is taking the last K + 1 logits of each, K the number of columns that hold any answer token in the batch.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import Collator
from .lora import lora_disabled
from .processor import IGNORE_INDEX, Processor


@dataclass
class DistillArguments:
    distill_weight: float = field(
        default=0.0,
        metadata={"help": "weight of KL(teacher || student) over the answer; > 0 needs a 'transcript' on every line"},
    )
    distill_temperature: float = field(
        default=1.0, metadata={"help": "softens both distributions; the KL is scaled by T^2 to keep its gradients"}
    )
    ce_weight: float = field(default=1.0, metadata={"help": "weight of the cross-entropy on the answer tokens"})

    def __post_init__(self):
        if self.distill_weight < 0 or self.ce_weight < 0 or self.distill_temperature <= 0:
            raise ValueError("--distill_weight and --ce_weight must be >= 0, --distill_temperature > 0")
        if self.distill_weight == 0 and self.ce_weight != 1:
            raise ValueError("--ce_weight weighs the cross-entropy against --distill_weight, which is 0")

    @property
    def enabled(self) -> bool:
        return self.distill_weight > 0


def text_batch(processor: Processor, prompts, transcripts, responses=None) -> dict[str, torch.Tensor]:
    """The same chats with each placeholder replaced by its transcript (and each answer after it), left-padded like
    the Processor's batches: input_ids and attention_mask."""
    rows = []
    for i, (prompt, transcript) in enumerate(zip(prompts, transcripts, strict=True)):
        prompt = prompt or processor.prompt
        answer = processor.response_ids(prompt, responses[i]) if responses is not None else []
        rows.append(processor.text_prompt_ids(prompt, transcript) + answer)  # the student's answer ids, exactly
    length = max(len(row) for row in rows)
    return {
        "input_ids": torch.tensor([[processor.pad_token_id] * (length - len(row)) + row for row in rows]),
        "attention_mask": torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows]),
    }


class DistillCollator(Collator):
    """The student's batch (Collator's), plus the teacher's as teacher_input_ids and teacher_attention_mask."""

    def __call__(self, items):
        batch = super().__call__(items)
        prompts, transcripts, answers = ([item[name] for item in items] for name in ("prompt", "transcript", "txt"))
        teacher = text_batch(self.processor, prompts, transcripts, answers)
        return batch | {f"teacher_{name}": tensor for name, tensor in teacher.items()}


@torch.no_grad()
def teacher_logits(llm, input_ids, attention_mask, keep: int) -> torch.Tensor:
    """The frozen LLM's logits (LoRA off) at the last keep positions of the text batch."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as SpeechLLM.forward: left padding shifts nothing
    with lora_disabled(llm):
        output = llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep)
    return output.logits


def answer_columns(labels: torch.Tensor) -> int:
    """How many last columns of the left-padded batch hold an answer token in some row."""
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    return labels.shape[1] - int(supervised[0]) if len(supervised) else 0


def kl_sum(student_logits, teacher_logits, labels, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, summed over the answer tokens. Each batch of logits covers at
    least the last answer_columns(labels) + 1 positions of its own sequence; labels are the student's."""
    columns = answer_columns(labels)
    answer = labels[:, labels.shape[1] - columns :] != IGNORE_INDEX

    def log_probs(logits):  # the logits at position t predict the token at t + 1
        return F.log_softmax(logits[:, logits.shape[1] - columns - 1 : -1][answer].float() / temperature, dim=-1)

    kl = F.kl_div(log_probs(student_logits), log_probs(teacher_logits), log_target=True, reduction="sum")
    return kl * temperature**2


class Distillation:
    """The training loss with distillation. Called in place of the model, with the teacher's inputs beside the
    student's, it returns the model's outputs with the combined loss, normalised as the model normalises its own
    cross-entropy (by num_items_in_batch, else by the batch's answer tokens); it also keeps this process's mean
    cross-entropy and KL per answer token since they were last read, for the training log."""

    def __init__(self, args: DistillArguments):
        self.args = args
        self._sums = None  # cross-entropy, KL, tokens: summed on the device, read only when logged

    def __call__(self, model, speechllm, teacher_input_ids, teacher_attention_mask, num_items_in_batch=None, **inputs):
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        columns = answer_columns(labels)
        student_answer = labels[:, labels.shape[1] - columns :]
        teacher_answer = teacher_input_ids[:, teacher_input_ids.shape[1] - columns :]
        answer = student_answer != IGNORE_INDEX
        if not torch.equal(teacher_answer[answer], student_answer[answer]):
            raise ValueError("the teacher's batch does not end with the student's answers")
        teacher = teacher_logits(speechllm.llm, teacher_input_ids, teacher_attention_mask, columns + 1)
        kl = kl_sum(outputs.logits, teacher, labels, self.args.distill_temperature)
        tokens = answer.sum()
        divisor = num_items_in_batch or tokens.clamp(min=1)
        ce = outputs.loss
        outputs.loss = self.args.ce_weight * ce + self.args.distill_weight * kl / divisor
        if speechllm.training:
            sums = torch.stack([ce.detach() * divisor, kl.detach(), tokens.to(kl.dtype)])
            self._sums = sums if self._sums is None else self._sums + sums
        return outputs

    def pop_means(self) -> dict[str, float]:
        """{"ce", "kl"} per answer token on this process since the last call ({} if nothing was trained)."""
        if self._sums is None:
            return {}
        ce, kl, tokens = self._sums.tolist()
        self._sums = None
        return {"ce": ce / max(tokens, 1), "kl": kl / max(tokens, 1)}
