"""Tiny, randomly initialised models the tests build themselves: no hub, no downloads."""

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile
import torch
import whisper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "transcribe the audio please",
    "hello world this is a tiny speech model",
    "one two three four five six seven eight nine ten",
    "she sells sea shells by the sea shore",
] * 20

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_tokenizer(family: str) -> PreTrainedTokenizerFast:
    if family == "qwen2":  # ChatML, pad == eos like SmolLM2: the end of turn must still be learned
        specials, template, eos, pad = ["<|im_start|>", "<|im_end|>"], CHATML, "<|im_end|>", "<|im_end|>"
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        template, eos, pad = LLAMA3, "<|eot_id|>", "<|end_of_text|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad)
    tokenizer.chat_template = template
    return tokenizer


def make_llm(directory: str, family: str = "qwen2", seed: int = 0) -> str:
    """Save a tiny chat LLM with its tokenizer to directory; return the directory."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(family)
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,  # logits with range: a frozen random LM the projector can steer
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True))
        stops = tokenizer.convert_tokens_to_ids("<|im_end|>")
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes))
        stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_whisper(path: str, n_mels: int = 80, n_state: int = 48, seed: int = 0) -> str:
    """Save a tiny openai-whisper checkpoint (.pt) with the real 30 s context; return the path."""
    torch.manual_seed(seed)
    dims = whisper.model.ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=1500,
        n_audio_state=n_state,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=128,
        n_text_ctx=16,
        n_text_state=48,
        n_text_head=2,
        n_text_layer=1,
    )
    model = whisper.model.Whisper(dims)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def write_tone(path: str, seconds: float, frequency: float, sample_rate: int = 16000, channels: int = 1) -> str:
    """A tone with a little noise: distinct clips for distinct texts."""
    rng = np.random.default_rng(int(frequency))
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    audio = 0.5 * np.sin(2 * np.pi * frequency * t) + 0.05 * rng.standard_normal(t.size)
    audio = np.repeat(audio[:, None], channels, axis=1) if channels > 1 else audio
    soundfile.write(path, audio.astype(np.float32), sample_rate)
    return path


def write_jsonl(path: str, rows: list[dict]) -> str:
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return path


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hub_cache(cache, repo_id: str, folder) -> Path:
    """huggingface_hub's cache layout for one repository at one commit, as a download leaves it; the cache."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    shutil.copytree(folder, repo / "snapshots" / HUB_COMMIT)
    return Path(cache)
