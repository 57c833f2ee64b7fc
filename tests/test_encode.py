"""Gallery encoding with Ray Data: codes, incremental runs, crash + re-run, deletions, S3."""
import os
import shutil
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from face_datasets import write_face_dataset
from model.features import embed
from pipelines.encode.gallery_info import info
from pipelines.encode.run import EncodeConfig, encode_gallery
from pipelines.formats.gallery import deleted_ids, require_gallery
from pipelines.formats.gallery_writer import compact, delete_faces
from pipelines.formats.faces import decode_batch
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint, stored_size
from pipelines.train.local import TrainConfig, train_local
from storage.manifest import read_manifest
from storage.tables import read_table

CFG = EncodeConfig(batch_size=8)


pytestmark = pytest.mark.usefixtures("ray_local")


def make_model(data, url, seed=0):
    train_local(TrainConfig(data=str(data), model_url=str(url), bits=16, codewords=16, dim=64, width=0.125,
                            epochs=1, batch_size=16, seed=seed), evaluate=False)
    return str(url)


@pytest.fixture(scope="module")
def dataset(lfw_dir, tmp_path_factory):
    return write_face_dataset(tmp_path_factory.mktemp("enc") / "ds", lfw_dir, identities=6, photos=8, shards=3)


@pytest.fixture(scope="module")
def model_url(dataset, tmp_path_factory):
    return make_model(dataset, tmp_path_factory.mktemp("model") / "m.pt")


def gallery_codes(gallery_url):
    gallery = require_gallery(gallery_url)
    rows = {}
    for url in gallery.shard_urls():
        t = read_table(url)
        for fid, codes in zip(t.column("face_id").to_pylist(), t.column("codes").to_pylist()):
            assert fid not in rows, f"duplicate face_id {fid}"
            rows[fid] = codes
    return rows


def dataset_faces(dataset):
    return pq.read_table(dataset / "faces").to_pydict()


def test_codes_equal_the_models_argmax_codes(dataset, model_url, tmp_path):
    gallery = str(tmp_path / "gallery")
    summary = encode_gallery(model_url, str(dataset), gallery, CFG)
    assert summary["faces"] == 48 and summary["sources_encoded"] == 3 and summary["rejected"] == 0
    codes = gallery_codes(gallery)
    faces = dataset_faces(dataset)
    state = load_checkpoint(model_url)
    model = model_from_checkpoint(state)
    direct = model.codes_from_features(embed(model, torch.from_numpy(decode_batch(list(faces["image"]), stored_size(state)))))
    assert direct.dtype == torch.uint8
    assert set(codes) == set(faces["face_id"])
    for fid, expected in zip(faces["face_id"], direct.tolist()):
        assert codes[fid] == expected
    meta = read_manifest(gallery).metadata
    assert (meta["D"], meta["M"], meta["K"], meta["model_id"]) == (64, 4, 16, state["model_id"])
    schema = pq.read_schema(require_gallery(gallery).shard_urls()[0])
    codes_type = schema.field("codes").type
    assert codes_type.list_size == 4 and codes_type.value_type == pa.uint8()


def test_incremental_runs_encode_only_new_shards_and_nothing_twice(dataset, model_url, tmp_path, lfw_dir):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    gallery = str(tmp_path / "gallery")
    encode_gallery(model_url, str(ds), gallery, CFG)
    generation = read_manifest(gallery).generation
    again = encode_gallery(model_url, str(ds), gallery, CFG)
    assert again["sources_encoded"] == 0 and again["sources_skipped"] == 3
    assert read_manifest(gallery).generation == generation, "a run with nothing new must write nothing"
    extra = write_face_dataset(tmp_path / "extra", lfw_dir, identities=3, photos=3, shards=1, skip=20)
    shutil.copy(extra / "faces" / "part-00000.parquet", ds / "faces" / "part-00009.parquet")
    more = encode_gallery(model_url, str(ds), gallery, CFG)
    assert more["sources_encoded"] == 1 and more["sources_skipped"] == 3
    assert set(gallery_codes(gallery)) == set(dataset_faces(ds)["face_id"])


def test_other_model_is_refused(dataset, model_url, tmp_path):
    gallery = str(tmp_path / "gallery")
    encode_gallery(model_url, str(dataset), gallery, EncodeConfig(batch_size=8, max_sources=1))
    other = make_model(dataset, tmp_path / "other.pt", seed=1)
    with pytest.raises(ValueError, match="encoded by model"):
        encode_gallery(other, str(dataset), gallery, CFG)
    assert require_gallery(gallery).rows == 16


def test_deletions_then_compaction_keep_every_other_face(dataset, model_url, tmp_path):
    gallery = str(tmp_path / "gallery")
    encode_gallery(model_url, str(dataset), gallery, CFG)
    before = gallery_codes(gallery)
    ids = sorted(before)
    gone = ids[::2]
    result = delete_faces(gallery, gone + ["no-such-face"])
    assert result["deleted"] == len(gone) and result["unknown"] == ["no-such-face"]
    assert deleted_ids(require_gallery(gallery)) == set(gone)
    assert info(gallery)["deleted"] == len(gone)
    compact(gallery)
    after = gallery_codes(gallery)
    assert set(after) == set(ids[1::2])
    assert all(after[f] == before[f] for f in after)
    assert info(gallery)["deleted"] == 0 and not require_gallery(gallery).tombstones


def test_killed_run_then_rerun_has_no_duplicate_or_missing_face(lfw_dir, model_url, tmp_path, ray_cluster):
    ds = write_face_dataset(tmp_path / "ds", lfw_dir, identities=8, photos=10, shards=10)
    gallery = tmp_path / "gallery"
    args = ["encode", model_url, str(ds), str(gallery), "--batch-size", "2", "--commit-seconds", "0"]
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    # kill -9 between commits, deterministically: a commit hook kills the process right after
    # the 3rd source shard is committed (--commit-seconds 0: one commit per source shard)
    kill_after_third_commit = (
        "import os, signal, sys\n"
        "from storage import manifest\n"
        "manifest.COMMIT_HOOKS.append(lambda root, m: m.generation >= 3 and os.kill(os.getpid(), signal.SIGKILL))\n"
        "from pipelines.cli import main\n"
        f"sys.exit(main({args!r}))\n")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}  # the session's cluster: no Ray start per run
    killed = subprocess.run([sys.executable, "-c", kill_after_third_commit], capture_output=True, text=True,
                            timeout=600, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = require_gallery(str(gallery))
    assert len(partial.encoded_sources) == 3
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(require_gallery(str(gallery)).encoded_sources) == 10
    assert set(gallery_codes(str(gallery))) == set(dataset_faces(ds)["face_id"])


def test_finished_source_shards_share_commits(lfw_dir, model_url, tmp_path):
    ds = write_face_dataset(tmp_path / "ds", lfw_dir, identities=6, photos=6, shards=6)
    gallery = str(tmp_path / "gallery")
    summary = encode_gallery(model_url, str(ds), gallery, EncodeConfig(batch_size=4, commit_seconds=3600))
    assert summary["sources_encoded"] == 6 and summary["commits"] == 1
    assert read_manifest(gallery).generation == 1  # six source shards, one manifest rewrite
    assert set(gallery_codes(gallery)) == set(dataset_faces(ds)["face_id"])


def test_s3_dataset_and_gallery(s3_bucket, dataset, model_url, tmp_path, ray_cluster):
    from storage import urls

    fs, root = urls.resolve(s3_bucket)
    fs.put(str(dataset / "faces"), f"{root}/ds/faces", recursive=True)
    gallery = f"{s3_bucket}/gallery"
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "encode", model_url, f"{s3_bucket}/ds", gallery,
                          "--batch-size", "8"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(gallery_codes(gallery)) == set(dataset_faces(dataset)["face_id"])
    again = subprocess.run([sys.executable, "-m", "pipelines.cli", "gallery", "info", gallery],
                           capture_output=True, text=True, timeout=120)
    assert "faces: 48" in again.stdout and "deleted: 0" in again.stdout
