import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.features import embed
from model.opqn import OPQNConfig
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint
from pipelines.photo_folder import list_identity_folder, load_face_set, query_split
from pipelines.train.local import TrainConfig, train_local
from pipelines.train.loop import augment, train_step
from storage.checkpoints import read_bytes


@pytest.fixture(scope="module")
def small_lfw(lfw_dir, tmp_path_factory):
    """8 LFW identities x 6 photos, linked into a fresh identity folder."""
    root = tmp_path_factory.mktemp("lfw_small")
    people = [p for p in sorted(os.listdir(lfw_dir)) if len(os.listdir(lfw_dir / p)) >= 10][:8]
    for person in people:
        (root / person).mkdir()
        for name in sorted(os.listdir(lfw_dir / person))[:6]:
            os.symlink(lfw_dir / person / name, root / person / name)
    return root


def tiny_config(data, model_url, **kw):
    # the step schedule: its plan does not depend on the epoch count, so 1 epoch resumed to 3
    # must equal 3 in one go (a one-cycle plan spans the whole run)
    base = dict(data=str(data), model_url=str(model_url), bits=16, codewords=16, dim=64, image_size=32,
                width=0.125, epochs=2, batch_size=16, min_photos=2, threads=2, schedule="step")
    return TrainConfig(**{**base, **kw})


def test_training_steps_on_real_lfw_photos_lower_the_loss(small_lfw):
    torch.manual_seed(0)
    cfg = tiny_config(small_lfw, "unused", lr=0.05)
    faces = load_face_set(list_identity_folder(small_lfw), cfg.stored_size(), cfg.crop_fraction)
    classes = sorted(set(faces.labels))
    labels = torch.tensor([classes.index(c) for c in faces.labels])
    from model.losses import WithLoss
    from model.opqn import OPQN
    from pipelines.train.recipe import make_optimizer
    model = OPQN(cfg.opqn_config(len(classes)))
    opt, _ = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    images = augment(faces.images, 32, gen)
    losses = [float(train_step(WithLoss(model), opt, None, images, labels)["loss"]) for _ in range(25)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


def test_checkpoint_round_trip_and_resume(small_lfw, tmp_path):
    url = tmp_path / "model" / "ckpt.pt"
    first = train_local(tiny_config(small_lfw, url, epochs=1), evaluate=False)
    assert [h["epoch"] for h in first["history"]] == [1]
    # loads without pickle, holds everything needed to resume
    raw = torch.load(io.BytesIO(read_bytes(str(url))), weights_only=True)
    for key in ("model", "optimizer", "scheduler", "epoch", "config", "classes", "history", "generator"):
        assert key in raw
    assert {"D", "M", "K"} <= set(raw["config"])
    assert any(k == "F" for k in raw["model"]) and any(k == "W" for k in raw["model"])
    state = load_checkpoint(str(url))
    assert OPQNConfig.from_dict(state["config"]).M == 4
    second = train_local(tiny_config(small_lfw, url, epochs=3), evaluate=False)
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert second["history"][0] == first["history"][0]
    # resuming is exact: 1 epoch + resume to 3 equals 3 epochs in one go
    straight_url = tmp_path / "straight.pt"
    train_local(tiny_config(small_lfw, straight_url, epochs=3), evaluate=False)
    resumed, straight = load_checkpoint(str(url)), load_checkpoint(str(straight_url))
    assert resumed["epoch"] == straight["epoch"] == 3
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, msg=key)
    faces = load_face_set(list_identity_folder(small_lfw)[:4], 35, 0.5)
    assert embed(model_from_checkpoint(resumed), faces.images).shape == (4, 64)


def test_one_cycle_resumed_to_more_epochs_follows_the_new_cycle(small_lfw, tmp_path):
    url = tmp_path / "m.pt"
    first = train_local(tiny_config(small_lfw, url, epochs=1, schedule="onecycle", batch_size=4), evaluate=False)
    assert first["history"][-1]["lr"] < 0.01  # a one-epoch cycle ends low
    second = train_local(tiny_config(small_lfw, url, epochs=3, schedule="onecycle", batch_size=4), evaluate=False)
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert second["history"][1]["lr"] > 0.02, "the resumed run should follow its own 3-epoch cycle"


def test_resume_with_other_config_is_refused(small_lfw, tmp_path):
    url = tmp_path / "m.pt"
    train_local(tiny_config(small_lfw, url, epochs=1), evaluate=False)
    with pytest.raises(ValueError, match="another configuration"):
        train_local(tiny_config(small_lfw, url, epochs=2, bits=8), evaluate=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(str(bad))


def test_unreadable_images_are_skipped_with_a_warning(small_lfw, tmp_path, caplog):
    root = tmp_path / "mixed"
    (root / "alice").mkdir(parents=True)
    good = sorted((small_lfw).iterdir())[0]
    for i, photo in enumerate(sorted(good.iterdir())[:3]):
        os.symlink(photo, root / "alice" / f"{i}.jpg")
    (root / "alice" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "alice" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        faces = load_face_set(list_identity_folder(root), 35, 0.5)
    assert len(faces) == 3
    assert "broken.jpg" in caplog.text and "empty.jpg" in caplog.text
    assert "skipped 2 unreadable image(s) of 5" in caplog.text


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "notes.txt").write_text("no photos here")
    with pytest.raises(ValueError, match="no images found"):
        list_identity_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        list_identity_folder(tmp_path / "missing")


def test_query_split_is_deterministic_and_keeps_database_items():
    labels = np.array(["a"] * 10 + ["b"] * 2 + ["c"])
    paths = [f"{l}/{i}.jpg" for i, l in enumerate(labels)]
    mask = query_split(labels, paths, 0.2, seed=3)
    assert mask.tolist() == query_split(labels, paths, 0.2, seed=3).tolist()
    assert mask[:10].sum() == 2 and mask[10:12].sum() == 1 and not mask[12]


def test_cli_trains_and_prints_metrics(small_lfw, tmp_path):
    env = {**os.environ, "OPQN_DATA": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "train-local", "--data", str(small_lfw),
                          "--model-url", str(tmp_path / "m.pt"), "--bits", "16", "--codewords", "16", "--dim", "64",
                          "--width", "0.125", "--epochs", "1", "--batch-size", "16", "--min-photos", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "mAP" in out.stdout and "float features mAP" in out.stdout
    assert "[train] " in out.stderr and "ETA" in out.stderr
    help_out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True)
    assert "train-local" in help_out.stdout


def test_cli_error_names_bad_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "train-local", "--data", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "nope" in out.stderr
