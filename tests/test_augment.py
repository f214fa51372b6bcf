"""SpecAugment (--spec_augment): masks inside each window's real frames, reproducible from the seed, training batches
only."""

import torch
from test_training import (
    assert_same,
    data,  # noqa: F401 (the fixture)
    train,
    train_args,
    weights,
)

from speechllm.augment import AugmentArguments, spec_augment


def test_masks_are_bands_within_the_real_frames():
    mel, frames = torch.rand(3, 80, 400) + 1, torch.tensor([400, 250, 100])
    args = AugmentArguments(spec_augment=True, freq_masks=2, time_masks=2)
    torch.manual_seed(0)
    masked = spec_augment(mel, frames, args)
    kept = masked != 0
    assert torch.equal(masked[kept], mel[kept])  # what is not masked is untouched
    assert not kept.all()
    for window, length in enumerate(frames.tolist()):
        full_bins = (~kept[window, :, :length]).all(1)  # bins masked at every real frame: the frequency bands
        full_frames = (~kept[window]).all(0)  # frames masked in every bin: the time bands
        assert full_bins.sum() <= 2 * int(0.15 * 80)
        assert full_frames.sum() <= 2 * int(0.05 * length)
        assert not full_frames[length:].any()  # frames past the window's own are never time-masked
        assert torch.equal(~kept[window], full_bins[:, None] | full_frames[None, :])  # nothing but the bands
    torch.manual_seed(0)
    assert torch.equal(spec_augment(mel, frames, args), masked)  # the same seed, the same masks
    nothing = AugmentArguments(spec_augment=True, freq_mask_fraction=0, time_mask_fraction=0)
    assert torch.equal(spec_augment(mel, frames, nothing), mel)


def test_augments_training_batches_and_never_evaluation(tiny, data, tmp_path):  # noqa: F811
    common = ["--max_steps", "2", "--save_strategy", "no", "--eval_data_path", data]
    plain = train(train_args(tiny, data, tmp_path / "plain", *common))
    augmented = train(train_args(tiny, data, tmp_path / "augmented", *common, "--spec_augment", "--freq_masks", "4"))
    final, other = weights(tmp_path / "augmented"), weights(tmp_path / "plain")
    assert any(not torch.equal(final[k], other[k]) for k in final), "the masks changed nothing"
    # Evaluation of one model, with the augmenting Trainer and the plain one: the same batches, the same loss.
    augmented.model.load_state_dict(plain.model.state_dict())
    assert augmented.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"]
    # Off (the default) trains exactly as before the option existed: no random draws, identical steps.
    again = train(train_args(tiny, data, tmp_path / "again", *common))
    assert_same(weights(again.args.output_dir), other)
