"""The shared training loop: batched augmentation, per-step schedules, the balance term, and the
recipe switches surviving a checkpoint."""
import math

import numpy as np
import pytest
import torch

from model.losses import WithLoss, usage_deficit
from model.opqn import OPQN, OPQNConfig
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, training_state
from pipelines.train.loop import augment, batches, parse_augment, train_epoch
from pipelines.train.recipe import Recipe, make_optimizer


def test_batched_crop_and_flip_equal_the_per_image_loop():
    images = torch.randint(0, 256, (9, 3, 35, 35), dtype=torch.uint8)
    got = augment(images, 32, torch.Generator().manual_seed(5), "crop,flip")
    gen = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 4, (9, 2), generator=gen)
    flips = torch.rand(9, generator=gen) < 0.5
    for i in range(9):
        y, x = int(offsets[i, 0]), int(offsets[i, 1])
        crop = images[i, :, y:y + 32, x:x + 32]
        crop = crop.flip(-1) if flips[i] else crop
        torch.testing.assert_close(got[i], crop.float().div(127.5).sub(1.0))
    assert flips.any() and not flips.all(), "the draw should mix flipped and plain images"


def test_without_crop_the_centre_is_taken():
    images = torch.randint(0, 256, (3, 3, 36, 36), dtype=torch.uint8)
    got = augment(images, 32, torch.Generator().manual_seed(0), "")
    torch.testing.assert_close(got, images[..., 2:34, 2:34].float().div(127.5).sub(1.0))


def test_photometric_augmentation_stays_in_range_and_varies_per_image():
    images = torch.full((64, 3, 35, 35), 128, dtype=torch.uint8)
    images[:, 0] = 200  # a coloured face: grey conversion must change it
    out = augment(images, 32, torch.Generator().manual_seed(1), "crop,flip,light,grey,blur")
    assert out.min() >= -1.0 and out.max() <= 1.0
    per_image = out.mean(dim=(1, 2, 3))
    assert per_image.std() > 0.05, "brightness/contrast should differ between images"
    grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert 0 < int(grey.sum()) < 64, "some, not all, images should be grey"


def test_unknown_augmentation_is_named():
    with pytest.raises(ValueError, match="sharpen"):
        parse_augment("crop,sharpen")


def test_usage_deficit_is_zero_for_even_use_and_log_k_for_one_sink():
    K = 8
    even = torch.eye(K).repeat(2, 1).reshape(16, 1, K)  # 16 samples, each codeword used twice
    assert float(usage_deficit(even)) == pytest.approx(0.0, abs=1e-6)
    sink = torch.zeros(16, 1, K)
    sink[..., 3] = 1.0
    assert float(usage_deficit(sink)) == pytest.approx(math.log(K), rel=1e-5)


def test_balance_term_spreads_assignments_of_one_class():
    """With one class, classification alone lets every face take the same codewords; the
    balance term makes the batch use more of them."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 35, 35), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 16)
    used = {}
    for balance in (0.0, 2.0):
        recipe = Recipe(bits=8, codewords=16, dim=64, width=0.125, epochs=30, batch_size=32, balance=balance,
                        schedule="step", lr=0.05, augment="crop,flip")
        torch.manual_seed(0)
        model = OPQN(recipe.opqn_config(2))
        opt, sched = make_optimizer(model, recipe, 1)
        gen = torch.Generator().manual_seed(0)
        for _ in range(recipe.epochs):
            train_epoch(WithLoss(model), opt, sched, images, labels, recipe, gen)
        model.eval()
        with torch.no_grad():
            codes = model.codes_from_features(model.features(augment(images, 32, gen, "")))
        used[balance] = len(torch.unique(codes[:, 0]))
    assert used[2.0] > used[0.0], used


@pytest.mark.parametrize("schedule", ["onecycle", "step"])
def test_schedules_advance_per_step(schedule):
    recipe = Recipe(epochs=4, schedule=schedule, lr=0.1, lr_step=2)
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, recipe, steps=5)
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    if schedule == "step":
        assert lrs[8] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.05) and lrs[19] == pytest.approx(0.025)
    else:
        assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.002 and lrs[0] < 0.05


def test_epoch_steps_are_capped_for_equal_worker_steps():
    gen = torch.Generator().manual_seed(0)
    assert len(batches(100, 16, gen)) == 6 and len(batches(100, 16, gen, steps=4)) == 4
    assert [len(b) for b in batches(10, 16, gen)] == [10]


def test_recipe_switches_round_trip_through_the_checkpoint(tmp_path):
    recipe = Recipe(bits=8, codewords=16, dim=64, width=0.125, balance=0.3, schedule="onecycle",
                    augment="crop,flip,light,grey,blur")
    model = OPQN(recipe.opqn_config(3))
    opt, sched = make_optimizer(model, recipe, 2)
    url = str(tmp_path / "m.pt")
    from dataclasses import asdict
    save_checkpoint(url, training_state(model, opt, sched, epoch=1, history=[], classes=["a", "b", "c"],
                                        train=asdict(recipe)))
    state = load_checkpoint(url)
    assert OPQNConfig.from_dict(state["config"]).balance == 0.3
    assert Recipe(**state["train"]) == recipe
    restored = model_from_checkpoint(state)
    assert restored.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    np.testing.assert_allclose(restored.features(x).detach().numpy(), model.features(x).detach().numpy())
