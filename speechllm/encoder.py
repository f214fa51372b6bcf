"""The frozen Whisper encoder, for clips of any length up to 30 s, in any dtype."""

import math

import torch
import torch.nn.functional as F
import whisper
from safetensors import SafetensorError
from torch import nn

from .audio import ENCODER_STRIDE
from .errors import InputError
from .whisper_formats import load_whisper_checkpoint


class LayerNorm(nn.LayerNorm):
    """Normalise in fp32 even when the weights were cast to bf16 (DeepSpeed casts the whole model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


class WhisperEncoder(whisper.model.AudioEncoder):
    def __init__(self, dims: whisper.model.ModelDimensions):
        super().__init__(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
        self.dims = dims
        for block in self.blocks:
            block.attn_ln, block.mlp_ln = LayerNorm(dims.n_audio_state), LayerNorm(dims.n_audio_state)
        self.ln_post = LayerNorm(dims.n_audio_state)

    def forward(self, mel: torch.Tensor, mel_frames: torch.Tensor) -> torch.Tensor:
        """mel (batch, n_mels, frames) -> (batch, ceil(frames / 2), n_audio_state), frames up to 3000.

        Frames past each window's mel_frames are padding: zeroed before each convolution and never attended to,
        and their outputs are zero, so a window's encoding does not depend on what it is batched with. On CPU,
        windows of unequal length are encoded one at a time, each cut to its own frames: the same output, without
        computing the batch's padding (up to half of a batch's encoder time); an accelerator runs the batch whole.
        """
        if mel.device.type == "cpu" and len(mel) > 1 and bool(mel_frames.min() < mel_frames.max()):
            cut = [
                self.encode(mel[i : i + 1, :, :n], mel_frames[i : i + 1])[0] for i, n in enumerate(mel_frames.tolist())
            ]
            length = math.ceil(mel.shape[-1] / ENCODER_STRIDE)
            return torch.stack([F.pad(window, (0, 0, 0, length - len(window))) for window in cut])
        return self.encode(mel, mel_frames)

    def encode(self, mel: torch.Tensor, mel_frames: torch.Tensor) -> torch.Tensor:
        """forward's encoding of the batch as it is, its padding computed (and masked) with it."""
        real = torch.arange(mel.shape[-1], device=mel.device) < mel_frames[:, None]
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype))) * real[:, None]
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        real = real[:, ::ENCODER_STRIDE]  # frame t of conv2's output is real when input frame 2t is
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        key_mask = real[:, None, None, :]  # (batch, heads, queries, keys)
        for block in self.blocks:
            x = x + self_attention(block.attn, block.attn_ln(x), key_mask)
            x = x + block.mlp(block.mlp_ln(x))
        return self.ln_post(x) * real[..., None]


def self_attention(attention: whisper.model.MultiHeadAttention, x: torch.Tensor, key_mask: torch.Tensor):
    """Whisper's self-attention, plus a key mask for padded frames (Whisper's own takes only a causal mask)."""
    split = lambda t: t.unflatten(-1, (attention.n_head, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(attention.query(x)), split(attention.key(x)), split(attention.value(x))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    return attention.out(out.transpose(1, 2).flatten(2))


def load_whisper_encoder(name_or_path: str, dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Whisper's encoder from any checkpoint format; the decoder's weights are never kept."""
    try:
        dims, state_dict = load_whisper_checkpoint(name_or_path)
    except (OSError, ValueError, SafetensorError) as error:  # not a format it reads, a torn file, or not downloaded
        raise InputError(f"cannot load the Whisper model {name_or_path!r}: {error}") from error
    encoder = WhisperEncoder(dims)
    prefix = "encoder."
    encoder_state = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    encoder.load_state_dict(encoder_state, strict=True)
    return encoder.to(dtype).requires_grad_(False).eval()
