"""SpecAugment (--spec_augment): masks inside each window's real frames, reproducible from the seed, training batches
only. Speed perturbation (--speed_perturb): a speed per clip and epoch from the seed, training clips only, resumable."""

import numpy as np
import pytest
import torch
from test_training import (
    StopAt,
    assert_same,
    data,  # noqa: F401 (the fixture)
    train,
    train_args,
    weights,
)

from speechllm import training
from speechllm.audio import SAMPLE_RATE
from speechllm.augment import AugmentArguments, SpeedPerturbation, spec_augment
from speechllm.data import SpeechDataset
from speechllm.errors import InputError


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


def test_each_clip_gets_a_speed_drawn_from_seed_epoch_and_clip(data):  # noqa: F811
    dataset, speeds = SpeechDataset(data), [0.9, 1.1]
    seconds = [len(dataset[i]["audio"]) / SAMPLE_RATE for i in range(len(dataset))]

    def epoch(number, seed=0):
        perturbed = SpeedPerturbation(dataset, speeds, seed)
        perturbed.set_epoch(number)
        return [perturbed[i]["audio"] for i in range(len(dataset))]

    first = epoch(0)
    drawn = [seconds[i] * SAMPLE_RATE / len(audio) for i, audio in enumerate(first)]  # the speed each clip played at
    assert {round(speed, 3) for speed in drawn} == set(speeds)
    assert all(np.array_equal(a, b) for a, b in zip(epoch(0), first))  # the same seed and epoch: the same clips
    assert [len(a) for a in epoch(1)] != [len(a) for a in first]  # another epoch draws anew
    assert [len(a) for a in epoch(0, seed=1)] != [len(a) for a in first]


def samples(item: dict) -> int:
    return len(item["audio"])


def test_persistent_workers_play_each_epochs_speeds(data):  # noqa: F811
    # --dataloader_persistent_workers: the workers keep the dataset they were started with, epoch after epoch
    perturbed = SpeedPerturbation(SpeechDataset(data), [0.8, 0.9, 1.1, 1.2], seed=0)
    loader = torch.utils.data.DataLoader(
        perturbed, batch_size=None, num_workers=1, persistent_workers=True, collate_fn=samples
    )
    played, drawn = [], []
    for epoch in range(3):
        perturbed.set_epoch(epoch)  # as the Trainer does before each epoch's batches
        played.append(list(loader))
        drawn.append([samples(perturbed[i]) for i in range(len(perturbed))])  # here, in the main process
    assert played == drawn
    assert drawn[0] != drawn[1] != drawn[2]  # the epochs do draw other speeds


def test_speed_perturbation_changes_training_only_and_resumes_exactly(tiny, data, tmp_path):  # noqa: F811
    common = ["--max_steps", "6", "--save_steps", "3", "--eval_data_path", data]
    plain = train(train_args(tiny, data, tmp_path / "plain", *common))
    at_one = train(train_args(tiny, data, tmp_path / "one", *common, "--speed_perturb", "1.0"))
    assert_same(weights(tmp_path / "one"), weights(tmp_path / "plain"))  # speed 1: the very batches of no option

    perturbed = ["--speed_perturb", "0.9,1.0,1.1"]
    straight = train(train_args(tiny, data, tmp_path / "straight", *common, *perturbed))
    final = weights(tmp_path / "straight")
    assert any(not torch.equal(final[k], weights(tmp_path / "plain")[k]) for k in final), "no clip changed speed"
    args = train_args(tiny, data, tmp_path / "resumed", *common, *perturbed)
    assert straight.train_dataset.epoch == 1  # steps 5 and 6 are epoch 1's (8 clips, batch 2): drawn anew
    train(args, [StopAt(3)])  # resumed inside epoch 0, then on into epoch 1
    train(args)
    assert_same(weights(tmp_path / "resumed"), final)

    assert not isinstance(straight.eval_dataset, SpeedPerturbation)  # evaluation hears the clips as recorded
    straight.model.load_state_dict(plain.model.state_dict())
    assert straight.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"] == at_one.evaluate()["eval_loss"]


@pytest.mark.parametrize("speeds", ["0,1", "fast", "1.1,", "-0.9"])
def test_bad_speeds_are_a_one_line_error(tiny, data, tmp_path, speeds):  # noqa: F811
    with pytest.raises(InputError, match="--speed_perturb takes speeds above 0"):
        training.main(train_args(tiny, data, tmp_path, "--speed_perturb", speeds))
