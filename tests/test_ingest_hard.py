"""Ingest on the photos users have: the retries on a padded canvas (coordinates mapped back to
the photo, the crop filled with the canvas colour) and ``prepare --aligned`` for face sets that
already are aligned crops."""
from __future__ import annotations

import io
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipelines.formats import faces as face_format
from pipelines.ingest import retry
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.mtcnn import Detections
from pipelines.ingest.photos import Photo, process_photos

# From `benchmarks/hard_photos.py --list` (seed 0): a tight frame the first pass misses.
TIGHT_PHOTO, TIGHT_CUT = "Clint_Eastwood/Clint_Eastwood_0001.jpg", (86, 65, 164, 181)


@pytest.fixture(scope="module")
def detector():
    from pipelines.ingest.mtcnn import MTCNN

    return MTCNN()


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_canvas_coordinates_map_back_to_the_photo():
    photo = np.zeros((90, 60, 3), np.uint8)
    big, offset, scale = retry.canvas(photo, (10, 20, 30), pad=2.0, max_side=100)
    assert big.shape == (100, 67, 3) and offset == (30.0, 45.0) and scale == pytest.approx(67 / 120)
    assert tuple(big[0, 0]) == (10, 20, 30)
    points = np.array([[[5.0, 7.0], [50.0, 80.0], [0.0, 0.0], [59.0, 89.0], [30.0, 45.0]]], np.float32)
    boxes = np.array([[-4.0, 2.0, 40.0, 70.0]], np.float32)
    on_canvas = Detections((boxes + np.tile(offset, 2)) * scale, np.ones(1, np.float32), (points + offset) * scale)
    back = retry.to_photo(on_canvas, offset, scale)
    np.testing.assert_allclose(back.boxes, boxes, atol=1e-4)
    np.testing.assert_allclose(back.landmarks, points, atol=1e-4)


def test_a_face_found_on_the_canvas_lands_where_it_is_in_the_photo(lfw_dir, detector):
    photo = np.asarray(Image.open(sorted((lfw_dir / "Asa_Hutchinson").glob("*.jpg"))[0]).convert("RGB"))
    plain = detector.detect([photo])[0]
    big, offset, scale = retry.look(photo, "canvas", max_side=300)  # 438 -> 300: shifted and shrunk
    assert scale < 1
    back = retry.to_photo(detector.detect([big])[0], offset, scale)
    np.testing.assert_allclose(back.landmarks[0], plain.landmarks[0], atol=4.0)
    np.testing.assert_allclose(back.boxes[0], plain.boxes[0], atol=8.0)


def test_a_tight_frame_the_first_pass_misses_is_found_by_the_retry(lfw_dir, detector):
    whole = np.asarray(Image.open(lfw_dir / TIGHT_PHOTO).convert("RGB"))
    boxes = detector.detect([whole])[0].boxes
    x1, y1, x2, y2 = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]  # the subject
    left, top, right, bottom = TIGHT_CUT
    frame = whole[top:bottom, left:right].copy()
    first = detector.detect([frame])[0]
    assert not (first.scores >= 0.9).any()  # the plain pass keeps nothing
    faces, rejects, _ = process_photos([Photo("tight.png", "x", None, png(frame))], detector, IngestConfig(size=64))
    assert not rejects and len(faces) == 1
    bx1, by1, bx2, by2 = faces[0]["box"]
    assert abs((bx1 + bx2) / 2 - ((x1 + x2) / 2 - left)) < 15  # the face, in the frame's own pixels
    assert abs((by1 + by2) / 2 - ((y1 + y2) / 2 - top)) < 15
    crop = np.asarray(Image.open(io.BytesIO(faces[0]["image"])).convert("RGB")).astype(int)
    fill = np.array(retry.mean_colour(frame))
    assert np.abs(crop[0, 0] - fill).max() <= 3 and np.abs(crop[-1, -1] - fill).max() <= 3  # canvas colour, not black


def test_a_photo_with_a_face_is_not_retried(lfw_dir, detector):
    photo = np.asarray(Image.open(sorted((lfw_dir / "Asa_Hutchinson").glob("*.jpg"))[0]).convert("RGB"))
    found = retry.detect(detector, [photo], lambda det, img: bool((det.scores >= 0.9).any()))
    assert found[0].look == "plain" and found[0].fill is None


@pytest.fixture
def att_tree(data_root, tmp_path):
    src = tmp_path / "att"
    for person in ("s1", "s2", "s3"):
        (src / person).mkdir(parents=True)
        for k in (1, 2, 3):
            shutil.copy(data_root / "att_faces" / person / f"{k}.pgm", src / person / f"{k}.pgm")
    return src


def test_prepare_aligned_takes_crops_without_detection_and_records_it(att_tree, tmp_path):
    from pipelines.ingest.run import prepare_dataset
    from storage import manifest as mf

    dataset = str(tmp_path / "ds")
    cfg = IngestConfig(size=32, aligned=True, executor="local", min_photos=3)
    result = prepare_dataset(str(att_tree), dataset, cfg, stream=io.StringIO())
    assert (result.faces, result.rejected) == (9, {})
    assert face_format.recorded_settings(mf.read_manifest(dataset))["aligned"] is True
    rows = face_format.read_faces(dataset).to_pylist()
    assert sorted(r["identity"] for r in rows) == ["s1"] * 3 + ["s2"] * 3 + ["s3"] * 3
    row = next(r for r in rows if r["source"].endswith("s2/2.pgm"))
    assert row["box"] == [0.0, 10.0, 92.0, 102.0] and row["landmarks"] is None and row["det_score"] is None
    expected = Image.open(att_tree / "s2" / "2.pgm").convert("RGB").crop((0, 10, 92, 102))
    expected = expected.resize((32, 32), Image.BILINEAR)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), np.asarray(expected))
    with pytest.raises(ValueError, match="aligned: dataset has True, asked for False"):
        prepare_dataset(str(att_tree), dataset, IngestConfig(size=32, executor="local", min_photos=3))


def test_a_dataset_recorded_before_the_aligned_setting_is_not_aligned():
    from pipelines.ingest.run import _check_settings

    older = {k: v for k, v in IngestConfig().recorded().items() if k != "aligned"}
    manifest = SimpleNamespace(metadata={"ingest": {"config": older}})
    _check_settings(manifest, "ds", IngestConfig())
    with pytest.raises(ValueError, match="aligned"):
        _check_settings(manifest, "ds", IngestConfig(aligned=True))
