"""Ingest building blocks without Ray: alignment, splits, decoding of bad inputs, listing,
one photo -> face rows with the real MTCNN, CLI wiring."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest import align, decode, splits
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.photos import Photo, process_photos
from pipelines.ingest.sources import list_sources

LFW_PICK = ["Arthur_Johnson", "Asa_Hutchinson", "Arturo_Gatti"]


def lfw_photo(lfw_dir: Path, name: str = "Asa_Hutchinson") -> Path:
    return sorted((lfw_dir / name).glob("*.jpg"))[0]


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def detector():
    from pipelines.ingest.mtcnn import MTCNN

    return MTCNN()


# --------------------------------------------------------------------------- align

def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    angle, scale, shift = 0.3, 0.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = align.similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


@pytest.mark.parametrize("spread", [1.0, 0.25])  # a face much larger than the crop (shrunk first), and not
def test_warp_puts_landmarks_on_the_template(spread):
    # Draw 5 dots at known positions in a large image; after warping they sit at the template.
    size = 64
    img = Image.new("RGB", (2000, 1600), "black")
    base = np.array([[900, 700], [1100, 690], [1000, 820], [930, 930], [1080, 925]], dtype=float)
    src = (base - base.mean(0)) * spread + base.mean(0)
    arr = np.asarray(img).copy()
    for x, y in src.astype(int):
        r = max(2, int(6 * spread))
        arr[y - r:y + r + 1, x - r:x + r + 1] = 255
    out = np.asarray(align.warp_face(Image.fromarray(arr), src, size)).mean(2)
    m = align.similarity_transform(src, align.template(size))
    for tx, ty in src @ m[:, :2].T + m[:, 2]:
        x0, y0 = int(round(tx)) - 3, int(round(ty)) - 3
        patch = out[y0:y0 + 7, x0:x0 + 7]
        ys, xs = np.mgrid[y0:y0 + 7, x0:x0 + 7]
        cx, cy = (xs * patch).sum() / patch.sum(), (ys * patch).sum() / patch.sum()
        assert abs(cx - tx) < 0.5 and abs(cy - ty) < 0.5, "a landmark dot should land on its template point"
    assert out.shape == (size, size)


def test_degenerate_landmarks_are_an_error():
    with pytest.raises(ValueError, match="degenerate"):
        align.similarity_transform(np.ones((5, 2)), align.template(112))


# --------------------------------------------------------------------------- splits

def test_single_domain_split_is_deterministic_and_per_identity():
    photos = [(f"id{i % 5}", f"photo{i}") for i in range(50)] + [(None, "loose")]
    a = splits.single_domain(photos, 0.2, seed=1)
    b = splits.single_domain(list(reversed(photos)), 0.2, seed=1)
    assert a == b
    assert a["loose"] == "database"
    for k in range(5):
        members = [p for ident, p in photos if ident == f"id{k}"]
        assert sum(a[p] == "query" for p in members) == 2
    c = splits.single_domain(photos, 0.2, seed=2)
    assert c != a


def test_single_domain_keeps_a_database_photo_and_a_query_for_small_identities():
    assert splits.query_count(1, 0.5) == 0
    assert splits.query_count(2, 0.1) == 1
    assert splits.query_count(2, 0.9) == 1
    out = splits.single_domain([("a", "x"), ("a", "y")], 0.1, seed=0)
    assert sorted(out.values()) == ["database", "query"]


def test_cross_domain_holds_out_whole_identities():
    photos = [(f"id{i % 40}", f"p{i}") for i in range(400)]
    out = splits.cross_domain(photos, 0.25, seed=3)
    by_identity = {}
    for ident, p in photos:
        by_identity.setdefault(ident, set()).add(out[p])
    assert all(len(s) == 1 for s in by_identity.values())
    unseen = sum(s == {"unseen"} for s in by_identity.values())
    assert 3 <= unseen <= 20
    # adding identities never moves old ones
    more = splits.cross_domain(photos + [("new", "q")], 0.25, seed=3)
    assert all(more[p] == out[p] for _, p in photos)


# --------------------------------------------------------------------------- decode

def test_decode_rejects_broken_bytes(lfw_dir):
    good = lfw_photo(lfw_dir).read_bytes()
    cases = {
        b"": decode.EMPTY,
        b"hello, I am a text file\n": decode.NOT_AN_IMAGE,
        good[: len(good) // 2]: decode.CORRUPT,
    }
    for data, reason in cases.items():
        with pytest.raises(decode.Rejected) as exc:
            decode.decode(data)
        assert exc.value.reason == reason


def test_decode_normalises_modes(lfw_dir):
    im = Image.open(lfw_photo(lfw_dir))
    cmyk = jpeg_bytes(im.convert("CMYK"))
    grey = jpeg_bytes(im.convert("L"))
    rgba = im.convert("RGBA")
    rgba.putalpha(128)
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    for data in (cmyk, grey, buf.getvalue()):
        d = decode.decode(data)
        assert d.image.mode == "RGB" and d.detect.shape == (250, 250, 3) and d.scale == 1.0


def test_decode_shrinks_large_photos_for_detection_only():
    big = Image.new("RGB", (5000, 3000), "grey")
    d = decode.decode(jpeg_bytes(big), max_side=1000)
    assert d.image.size == (5000, 3000)
    assert d.detect.shape == (600, 1000, 3)
    assert d.scale == pytest.approx(5.0)
    with pytest.raises(decode.Rejected) as exc:
        decode.decode(jpeg_bytes(big), max_pixels=10_000_000)
    assert exc.value.reason == decode.TOO_LARGE


# --------------------------------------------------------------------------- photos (real MTCNN)

def test_one_photo_gives_one_aligned_face(lfw_dir, detector):
    data = lfw_photo(lfw_dir).read_bytes()
    cfg = IngestConfig(size=32, image_format="jpeg")
    faces, rejects, index = process_photos([Photo("a.jpg", "Asa", "database", data)], detector, cfg)
    assert not rejects and len(faces) == 1 and index[0]["faces"] == 1
    row = faces[0]
    assert Image.open(io.BytesIO(row["image"])).size == (32, 32)
    assert Image.open(io.BytesIO(row["image"])).format == "JPEG"
    assert len(row["box"]) == 4 and len(row["landmarks"]) == 10 and row["det_score"] > 0.9
    x1, y1, x2, y2 = row["box"]
    assert 40 < x1 < x2 < 210 and 40 < y1 < y2 < 230  # LFW faces sit in the centre


def test_huge_photo_is_detected_small_and_cropped_from_the_original(lfw_dir, detector):
    face = Image.open(lfw_photo(lfw_dir)).resize((1000, 1000))
    canvas = Image.new("RGB", (6000, 4000), (30, 60, 90))
    canvas.paste(face, (3500, 1500))
    cfg = IngestConfig(size=64, detect_max_side=800)
    faces, rejects, _ = process_photos([Photo("big.jpg", "x", None, jpeg_bytes(canvas))], detector, cfg)
    assert not rejects and len(faces) == 1
    x1, y1, x2, y2 = faces[0]["box"]
    assert 3500 < x1 < x2 < 4500 and 1500 < y1 < y2 < 2500  # original-photo coordinates
    crop = np.asarray(Image.open(io.BytesIO(faces[0]["image"])))
    assert crop.shape == (64, 64, 3) and crop.std() > 20  # a face, not flat background


def test_several_faces_one_or_all(lfw_dir, detector):
    a = Image.open(lfw_photo(lfw_dir, "Asa_Hutchinson"))
    b = Image.open(lfw_photo(lfw_dir, "Arthur_Johnson")).resize((180, 180))
    canvas = Image.new("RGB", (520, 300), "white")
    canvas.paste(a, (10, 20))
    canvas.paste(b, (300, 60))
    data = jpeg_bytes(canvas)
    one, _, _ = process_photos([Photo("two.jpg", None, None, data)], detector, IngestConfig(size=32))
    all_, _, _ = process_photos([Photo("two.jpg", None, None, data)], detector, IngestConfig(size=32, keep_all=True))
    assert len(one) == 1 and one[0]["box"][0] < 260  # the larger face, on the left
    assert len(all_) >= 2
    assert len({r["face_id"] for r in all_}) == len(all_)
    assert all_[0]["face_id"] == one[0]["face_id"]


def test_no_face_and_bad_bytes_are_rejected_with_reasons(detector):
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1)).astype(np.uint8)).convert("RGB")
    photos = [
        Photo("blank.jpg", "x", None, jpeg_bytes(gradient)),
        Photo("text.jpg", "x", None, b"not an image"),
        Photo("empty.jpg", "x", None, b""),
        Photo("dup.jpg", "x", None, None, reason=decode.DUPLICATE, detail="same bytes as a.jpg"),
    ]
    faces, rejects, index = process_photos(photos, detector, IngestConfig(size=32))
    assert faces == []
    assert {r["source"]: r["reason"] for r in rejects} == {
        "blank.jpg": decode.NO_FACE, "text.jpg": decode.NOT_AN_IMAGE, "empty.jpg": decode.EMPTY, "dup.jpg": decode.DUPLICATE}
    assert len(index) == 4


def test_missing_weights_error_names_the_install_command(tmp_path, monkeypatch):
    from pipelines.ingest import mtcnn

    monkeypatch.setenv("OPQN_MTCNN_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps facenet-pytorch"):
        mtcnn.MTCNN()


# --------------------------------------------------------------------------- sources

def test_listing_a_plain_tree_with_odd_entries(tmp_path, lfw_dir):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "a.JPG").write_bytes(lfw_photo(lfw_dir).read_bytes())
    (tmp_path / "alice" / "notes.txt").write_text("ignored: not an image name")
    (tmp_path / "alice" / "folder.jpg").mkdir()
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "alice" / "dangling.jpg")
    (tmp_path / "loose.png").write_bytes(b"x")
    got = {Path(s.url).name: s for s in list_sources(str(tmp_path))}
    assert set(got) == {"a.JPG", "folder.jpg", "dangling.jpg", "loose.png"}
    assert got["a.JPG"].identity == "alice" and got["a.JPG"].problem is None
    assert got["folder.jpg"].problem and got["dangling.jpg"].problem
    assert got["loose.png"].identity is None


def test_listing_the_vggface2_layout(tmp_path, lfw_dir):
    for part, ident, name in [("train", "n000001", "0001_01.jpg"), ("train", "n000001", "0002_01.jpg"),
                              ("test", "n000009", "0001_01.jpg")]:
        (tmp_path / part / ident).mkdir(parents=True, exist_ok=True)
        (tmp_path / part / ident / name).write_bytes(b"x")
    (tmp_path / "train_list.txt").write_text("n000001/0001_01.jpg\nn000001/0002_01.jpg\n")
    (tmp_path / "test_list.txt").write_text("n000009/0001_01.jpg\n")
    (tmp_path / "identity_meta.csv").write_text("Class_ID, Name, Sample_Num, Flag, Gender\n")
    got = list_sources(str(tmp_path))
    assert [(s.identity, s.partition) for s in got] == [("n000009", "test"), ("n000001", "train"), ("n000001", "train")]


def test_listing_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_sources(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no photos"):
        list_sources(str(tmp_path))


# --------------------------------------------------------------------------- CLI / config

def test_cli_registers_prepare():
    from pipelines.cli import build_parser
    from pipelines.ingest.cli import config_from_args

    args = build_parser().parse_args(["prepare", "src", "out", "--size", "64", "--format", "jpeg",
                                      "--min-photos", "2", "--query-fraction", "0.3", "--protocol", "cross",
                                      "--keep-all", "--seed", "7"])
    cfg = config_from_args(args)
    assert callable(args.func)
    assert (cfg.size, cfg.image_format, cfg.min_photos, cfg.query_fraction, cfg.protocol, cfg.keep_all, cfg.seed) == \
        (64, "jpeg", 2, 0.3, "cross", True, 7)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="image_format"):
        IngestConfig(image_format="gif")
    with pytest.raises(ValueError, match="query_fraction"):
        IngestConfig(query_fraction=1.5)


def test_face_selection_rules():
    from pipelines.ingest.mtcnn import Detections
    from pipelines.ingest.photos import select_faces

    boxes = np.array([[0, 0, 100, 100],  # largest, in a corner
                      [450, 450, 530, 530],  # central, smaller
                      [200, 700, 260, 760]], dtype=np.float32)  # small, most confident
    det = Detections(boxes, np.array([0.95, 0.97, 0.999], np.float32), np.zeros((3, 5, 2), np.float32))
    pick = lambda **kw: select_faces(det, 1000, 1000, IngestConfig(**kw))  # noqa: E731
    assert pick(select="largest") == [0]
    assert pick(select="central") == [1]
    assert pick(select="score") == [2]
    assert pick(select="largest", keep_all=True) == [0, 1, 2]
    assert pick(select="largest", min_score=0.96) == [1]
    assert pick(min_score=0.9999) == []


def test_shard_length_gives_every_worker_work_on_small_runs():
    from pipelines.ingest.run import shard_length

    assert shard_length(64, IngestConfig(shard_size=500, batch_size=16), workers=2) == 16
    assert shard_length(100_000, IngestConfig(shard_size=500), workers=8) == 500
    assert shard_length(10, IngestConfig(shard_size=500, batch_size=16), workers=2) == 16
    assert shard_length(10, IngestConfig(shard_size=2), workers=2) == 2


# --------------------------------------------------------------------------- the face dataset format

def face_row(face_id: str, split: str, size: int = 24) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return {"face_id": face_id, "identity": "p", "source": f"{face_id}.jpg", "split": split, "image": buf.getvalue(),
            "box": [0.0, 0.0, 1.0, 1.0], "landmarks": [0.0] * 10, "det_score": 0.99}


def test_face_format_lists_what_is_committed_and_deletes_the_rest(tmp_path):
    from pipelines.formats import faces as face_format
    from storage import lease
    from storage import manifest as mf

    dataset = str(tmp_path / "ds")
    rows = [face_row("a-0", "query"), face_row("b-0", "database")]
    sources = [{"source": f"{r['face_id']}.jpg", "identity": "p", "content_hash": r["face_id"], "split": r["split"],
                "faces": 1, "reason": None} for r in rows]
    rejects = [{"source": "c.jpg", "reason": "no_face", "detail": "", "identity": "p"}]
    entries = face_format.write_shard(dataset, rows, rejects, sources)
    face_format.commit_shard(dataset, entries, {"size": 24})
    face_format.write_shard(dataset, [face_row("x-0", "query")], [], [])  # a crashed run's files
    assert face_format.read_faces(dataset, ["face_id"]).column("face_id").to_pylist() == ["a-0", "b-0"]
    assert face_format.read_rejects(dataset).num_rows == 1 and face_format.read_sources(dataset).num_rows == 2
    assert face_format.recorded_settings(mf.read_manifest(dataset)) == {"size": 24}
    [(url, key, fingerprint)] = face_format.face_shards(dataset)
    assert key.startswith("faces/") and fingerprint == next(e.sha256 for e in entries if e.path == key)
    with pytest.raises(RuntimeError, match="writer lease"):  # sweeping needs the dataset's lease
        face_format.delete_uncommitted(dataset)
    with lease.held(dataset, "test"):
        assert sorted(p.split("/")[0] for p in face_format.delete_uncommitted(dataset)) == ["faces", "sources"]
    assert mf.orphans(dataset) == []
    faces = face_format.load_face_dataset(dataset, ("query",), stored_size=16)
    assert faces.paths == ["a-0"] and tuple(faces.images.shape) == (1, 3, 16, 16)
    assert faces.images[0, 1].float().mean() > 150  # the green channel survived encode + decode


def test_prepare_runs_in_process_with_the_local_executor(tmp_path, lfw_dir):
    from pipelines.formats import faces as face_format
    from pipelines.ingest.run import prepare_dataset

    src = tmp_path / "src"
    for name in LFW_PICK:
        (src / name).mkdir(parents=True)
        (src / name / "1.jpg").write_bytes(lfw_photo(lfw_dir, name).read_bytes())
    (src / LFW_PICK[0] / "broken.jpg").write_bytes(b"not a photo")
    log = io.StringIO()
    dataset = str(tmp_path / "ds")
    result = prepare_dataset(str(src), dataset, IngestConfig(size=32, shard_size=2, executor="local"), stream=log)
    assert (result.faces, result.rejected, result.nodes) == (3, {"not_an_image": 1}, {"local": 2})
    assert sorted(face_format.read_faces(dataset, ["identity"]).column("identity").to_pylist()) == sorted(LFW_PICK)
    assert "3 faces written, 1 rejected (not_an_image=1), 2 shards" in log.getvalue()
