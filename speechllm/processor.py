"""Text and audio in, model inputs out: the chat prompt with the audio placeholder, labels, and log-mel features.

One placeholder layer serves every task: plain ASR ("<speech>Transcribe the audio."), error correction (Whisper's
n-best hypotheses written into the prompt around "<speech>"), and speech as a prompt (a spoken instruction, with
text before or after it). The placeholder is expanded to as many positions as the clip has audio tokens, and the
model writes the projected audio over exactly those positions.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .audio import (
    ENCODER_STRIDE,
    WINDOW_FRAMES,
    batch_frames,
    log_mel_batch,
    num_audio_tokens,
    num_frames,
    split_windows,
    window_lengths,
)
from .errors import InputError

AUDIO_PLACEHOLDER = "<speech>"
NBEST_PLACEHOLDER = "<nbest>"  # error correction's (nbest.py): replaced by the hypotheses before a prompt gets here
IGNORE_INDEX = -100  # positions the loss skips
ANSWER_SLOT = "\x00answer\x00"  # rendered in place of an answer, to find where the template puts answers
# Rendered prompts kept, the most recently used: a model's own prompts stay, while error correction's (one a clip:
# its n-best written in) are rendered again rather than kept for the whole dataset (memory grew with the data).
PROMPT_CACHE_SIZE = 256


@dataclass
class EncodedAudio:
    """A clip as the frozen encoder already saw it (encoder_cache.py): in place of its samples, their count and each
    window's encoder output over its real frames (frames, encoder_dim)."""

    num_samples: int
    features: list[torch.Tensor]


def check_prompt(prompt: str):
    if prompt.count(AUDIO_PLACEHOLDER) != 1:
        raise InputError(f"a prompt must contain {AUDIO_PLACEHOLDER!r} exactly once: {prompt!r}")


def check_system_prompt(system_prompt: str | None):
    """The audio goes into the user's turn: a placeholder in the system prompt would reach the LLM as text."""
    for placeholder in (AUDIO_PLACEHOLDER, NBEST_PLACEHOLDER):
        if system_prompt is not None and placeholder in system_prompt:
            raise InputError(
                f"the system prompt holds {placeholder!r}, which only the (user) prompt may: {system_prompt!r}"
            )


class Processor:
    def __init__(self, tokenizer, stop_token_ids, *, prompt, system_prompt, n_mels, kernel_size, audio_mode):
        if audio_mode not in ("dynamic", "window"):
            raise InputError(f"audio_mode must be 'dynamic' or 'window', not {audio_mode!r}")
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        self.prompt, self.system_prompt = prompt, system_prompt
        self.n_mels, self.kernel_size, self.audio_mode = n_mels, kernel_size, audio_mode
        check_prompt(prompt)
        check_system_prompt(system_prompt)
        self._prompt_cache = OrderedDict()

    def _messages(self, prompt: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return system + [{"role": "user", "content": prompt}]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the chat template holds every special

    def _rendered(self, prompt: str) -> tuple[tuple[list[int], list[int]], tuple[str, str]]:
        """Once a prompt: the chat up to the assistant's turn as token ids split at the placeholder, and the text the
        template writes before and after an answer (one render for all answers, so a template that renders today's
        date gives every sample the same chat, also across midnight; kept for the PROMPT_CACHE_SIZE most recent)."""
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
        else:
            check_prompt(prompt)
            if NBEST_PLACEHOLDER in prompt:  # a model with no n-best to write there: the LLM would read it as text
                raise InputError(f"{NBEST_PLACEHOLDER!r} in a prompt for a model without error correction: {prompt!r}")
            messages = self._messages(prompt)
            for _ in range(2):  # two renders could still straddle midnight: a second pair cannot
                chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                answered = messages + [{"role": "assistant", "content": ANSWER_SLOT}]
                full = self.tokenizer.apply_chat_template(answered, tokenize=False)
                if full.startswith(chat) and full.count(ANSWER_SLOT) == 1:
                    break
            else:
                raise InputError("the chat template does not render a reply as a continuation of the generation prompt")
            before, after = chat.split(AUDIO_PLACEHOLDER)
            answer_wrapping = tuple(full[len(chat) :].split(ANSWER_SLOT))
            self._prompt_cache[prompt] = (self._encode(before), self._encode(after)), answer_wrapping
            if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        return self._prompt_cache[prompt]

    def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids of the chat up to the assistant's turn, split at the audio placeholder."""
        return self._rendered(prompt)[0]

    def text_prompt_ids(self, prompt: str, text: str) -> list[int]:
        """Token ids of the same chat with the placeholder replaced by text, rendered and tokenised whole: what the
        LLM reads when it is given the words instead of the audio."""
        self._rendered(prompt)  # the same checks as the audio prompt
        chat = self.tokenizer.apply_chat_template(
            self._messages(prompt.replace(AUDIO_PLACEHOLDER, text)), tokenize=False, add_generation_prompt=True
        )
        return self._encode(chat)

    def response_ids(self, prompt: str, response: str) -> list[int]:
        """The assistant's answer and its end-of-turn token, as the chat template writes them; nothing after."""
        lead, tail = self._rendered(prompt)[1]
        ids = self._encode(lead + response + tail)
        ends = [i for i, token in enumerate(ids) if token in self.stop_token_ids]
        return ids[: ends[0] + 1] if ends else ids + self.stop_token_ids[:1]

    def __call__(self, audios: list[np.ndarray], prompts: list[str | None], responses: list[str] | None = None):
        """A left-padded batch: input_ids, attention_mask, audio_mask, labels, and per window mel, mel_frames and
        audio_tokens. An audio of None is a text-only example: its placeholder takes no positions. A batch of
        EncodedAudio has audio_features, the encoder's output as it would compute it, in place of mel (None)."""
        windows, features, window_samples, audio_tokens, rows = [], [], [], [], []
        for i, (audio, prompt) in enumerate(zip(audios, prompts)):
            if isinstance(audio, EncodedAudio):
                clip_samples = window_lengths(audio.num_samples)
                features += audio.features
            else:
                clip_windows = split_windows(audio) if audio is not None else []
                clip_samples = [len(window) for window in clip_windows]
                windows += clip_windows
            window_samples += clip_samples
            clip_tokens = [num_audio_tokens(samples, self.kernel_size) for samples in clip_samples]
            audio_tokens += clip_tokens
            before, after = self.prompt_ids(prompt or self.prompt)
            n_audio = sum(clip_tokens)
            ids = before + [self.pad_token_id] * n_audio + after
            is_audio = [False] * len(before) + [True] * n_audio + [False] * len(after)
            labels = [IGNORE_INDEX] * len(ids)
            if responses is not None:
                answer = self.response_ids(prompt or self.prompt, responses[i])
                ids, is_audio, labels = ids + answer, is_audio + [False] * len(answer), labels + answer
            rows.append((ids, is_audio, labels))

        length = max(len(ids) for ids, _, _ in rows)
        audio_features = None
        if features:
            if windows:
                raise ValueError("a batch is all audio or all EncodedAudio")
            mel, mel_frames, audio_features = None, *self._padded_features(features, window_samples)
        elif windows:
            mel, mel_frames = log_mel_batch(windows, self.n_mels, self.pad_frames_to)
        else:  # a batch without audio: no windows, which the encoder and projector pass through
            mel, mel_frames = torch.zeros(0, self.n_mels, ENCODER_STRIDE * self.kernel_size), torch.zeros(0).long()
        batch = {
            "input_ids": torch.tensor([[self.pad_token_id] * (length - len(r[0])) + r[0] for r in rows]),
            "attention_mask": torch.tensor([[0] * (length - len(r[0])) + [1] * len(r[0]) for r in rows]),
            "audio_mask": torch.tensor([[False] * (length - len(r[1])) + r[1] for r in rows]),
            "mel": mel,
            "mel_frames": mel_frames,
            "audio_tokens": torch.tensor(audio_tokens, dtype=torch.long),
        }
        if responses is not None:
            batch["labels"] = torch.tensor([[IGNORE_INDEX] * (length - len(r[2])) + r[2] for r in rows])
        if audio_features is not None:
            batch["audio_features"] = audio_features
        return batch

    def _padded_features(self, features: list[torch.Tensor], window_samples: list[int]):
        """Windows' encoder outputs padded as the encoder pads them, with zeros to the batch's mel frames halved by its
        stride, and the windows' mel_frames as log_mel_batch gives them."""
        frames = [num_frames(samples) for samples in window_samples]
        padded = batch_frames(frames, self.pad_frames_to)
        mel_frames = torch.tensor(frames) if self.pad_frames_to else torch.full((len(frames),), WINDOW_FRAMES)
        batch = features[0].new_zeros(len(features), math.ceil(padded / ENCODER_STRIDE), features[0].shape[-1])
        for i, window in enumerate(features):
            batch[i, : len(window)] = window
        return mel_frames, batch

    @property
    def pad_frames_to(self) -> int | None:
        """Dynamic batches pad mel frames to a multiple of both strides, so every frame lands in a whole token."""
        return ENCODER_STRIDE * self.kernel_size if self.audio_mode == "dynamic" else None
