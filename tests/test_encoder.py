import numpy as np
import torch
import torch.nn.functional as F
import whisper

from speechllm.audio import SAMPLE_RATE, log_mel_batch
from speechllm.encoder import load_whisper_encoder


def test_full_window_matches_whispers_own_encoder(tiny):
    encoder = load_whisper_encoder(tiny["whisper"])
    reference = whisper.model.AudioEncoder(
        *[getattr(encoder.dims, f) for f in ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")]
    )
    reference.load_state_dict(encoder.state_dict())
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        torch.testing.assert_close(encoder(mel, torch.tensor([3000, 3000])), reference(mel), atol=1e-5, rtol=1e-5)


def test_a_clip_encodes_the_same_alone_and_in_a_padded_batch(tiny):
    encoder = load_whisper_encoder(tiny["whisper"])
    rng = np.random.default_rng(0)
    short, long = (rng.standard_normal(int(s * SAMPLE_RATE)).astype(np.float32) * 0.1 for s in (1.23, 4.5))
    mel, frames = log_mel_batch([short, long], 80, pad_frames_to=10)
    assert frames[0] % 2 == 1  # an odd count: its last output frame reads one padded frame
    with torch.no_grad():
        alone = encoder(*log_mel_batch([short], 80, pad_frames_to=10))
        whole = encoder.encode(mel, frames)  # the batch at once, padding masked (an accelerator's way)
        widths, encode = [], encoder.encode
        encoder.encode = lambda mel, frames: widths.append(mel.shape[-1]) or encode(mel, frames)
        cut = encoder(mel, frames)  # on CPU: each window at its own length
    assert widths == frames.tolist()  # no padded frame computed
    assert alone.shape[1] < whole.shape[1] and cut.shape == whole.shape
    for batched in (whole, cut):
        torch.testing.assert_close(batched[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)
        assert batched[0, alone.shape[1] :].abs().max() == 0  # padding comes out as zeros
    torch.testing.assert_close(cut[1], whole[1], atol=1e-5, rtol=1e-5)


def test_bf16_weights_still_normalise_in_fp32(tiny):
    encoder = load_whisper_encoder(tiny["whisper"], dtype=torch.bfloat16)
    norms = [encoder.ln_post] + [norm for block in encoder.blocks for norm in (block.attn_ln, block.mlp_ln)]
    # Like the residual stream, far from zero mean: there a bf16 layer norm misses the fp32 result in some elements.
    x = (
        torch.randn(4, 200, encoder.dims.n_audio_state, generator=torch.Generator().manual_seed(0)) * 3 + 100
    ).bfloat16()
    for norm in norms:
        assert norm.weight.dtype == torch.bfloat16
        weight, bias = norm.weight.float(), norm.bias.float()
        fp32 = F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).bfloat16()
        with torch.no_grad():
            assert torch.equal(norm(x), fp32)  # computed in fp32, rounded to bf16 once
        bf16 = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        assert not torch.equal(bf16, fp32)  # what a plain bf16 layer norm would give: the check can tell them apart
    mel = torch.randn(1, 80, 200)
    with torch.no_grad():
        out = encoder(mel, torch.tensor([200]))
        full = load_whisper_encoder(tiny["whisper"])(mel, torch.tensor([200]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full, atol=0.1, rtol=0.05)
