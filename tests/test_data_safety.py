"""Data safety: one writer per dataset or gallery (the writer lease), commits idempotent per
source, the pinned model, no garbage codes from non-finite features, compaction keeping the order.

Each concurrency case runs on local disk and on the local S3 server (``s3_bucket``).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from face_datasets import lfw_people, write_face_dataset
from pipelines.encode.encoder import EncodeJob, NonFiniteFeaturesError, check_model
from pipelines.encode.run import EncodeConfig, encode_gallery
from pipelines.formats import faces as face_format
from pipelines.formats.checkpoint import load_checkpoint, save_checkpoint
from pipelines.formats.gallery import (ERASED_DIR, FEATURES_DIR, REJECTS_DIR, code_table, deleted_ids,
                                       erased_hashes, face_id_hash, feature_table, gallery_metadata, open_gallery,
                                       require_gallery)
from pipelines.formats.gallery_writer import commit_sources, compact, delete_faces, list_files, write_code_shard, \
    write_source
from pipelines.query.topk import ShardTask, merge_topk, shard_topk
from pipelines.train.local import TrainConfig, train_local
from storage import files, lease, urls
from storage import manifest as mf
from storage.tables import read_table


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path / "root") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/root"


@pytest.fixture(scope="module")
def faces(lfw_dir, tmp_path_factory):
    return write_face_dataset(tmp_path_factory.mktemp("safety") / "ds", lfw_dir, identities=4, photos=6, shards=3)


@pytest.fixture(scope="module")
def model_url(faces, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("model") / "m.pt")
    train_local(TrainConfig(data=str(faces), model_url=url, bits=16, codewords=16, dim=64, width=0.125, epochs=1,
                            batch_size=16, seed=0), evaluate=False)
    return url


def copy_dataset(faces, root: str) -> str:
    """The module's face shards under ``root``/ds (local or S3)."""
    fs, path = urls.resolve(root)
    fs.put(str(faces / "faces"), f"{path}/ds/faces", recursive=True)
    return urls.join(root, "ds")


def listed_face_ids(dataset: str) -> list[str]:
    return face_format.read_faces(dataset, ["face_id"]).column("face_id").to_pylist()


def gallery_face_ids(gallery_url: str) -> list[str]:
    return [fid for u in require_gallery(gallery_url).shard_urls() for fid in read_table(u).column("face_id").to_pylist()]


def rejected_ids(gallery_url: str) -> list[str]:
    """Face ids in the rejects files the gallery's manifest lists."""
    return [fid for f in mf.read_manifest(gallery_url).files if f.path.startswith(REJECTS_DIR + "/")
            for fid in read_table(mf.file_url(gallery_url, f)).column("face_id").to_pylist()]


def duplicates(ids) -> list[str]:
    return [k for k, n in Counter(ids).items() if n > 1]


# --------------------------------------------------------------------------- the lease itself

def test_second_writer_fails_naming_the_holder_and_an_expired_lease_is_taken_over(root):
    first = lease.acquire(root, "opqn encode first", seconds=1.5, heartbeat=False)
    errors = []

    def other():
        try:
            lease.acquire(root, "opqn encode second")
        except lease.LeaseHeldError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    [message] = errors
    assert "being written by another job" in message and f"pid {os.getpid()}" in message
    assert "opqn encode first" in message and "started 0 s ago" in message and "expires in" in message
    first.check()  # still ours
    time.sleep(1.6)  # the holder stalls past its expiry (no heartbeat)
    second = []
    t = threading.Thread(target=lambda: second.append(lease.acquire(root, "opqn encode second", seconds=30)))
    t.start()
    t.join()
    assert second, "an expired lease is taken over"
    with pytest.raises(lease.LeaseLostError, match="taken over by .*opqn encode second"):
        first.check()  # the stalled holder learns before its next commit
    first.release()  # a lost lease is left to its new holder: still held
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 2 and "opqn encode second" in errors[1]
    second[0].release()
    with lease.held(root, "third") as third, lease.held(root, "nested") as nested:
        assert nested is third  # the same thread nests: one lease
        third.renew()
    assert lease.is_free(lease._parse(files.read_all(urls.join(root, lease.LEASE_NAME))))


def test_lease_of_a_killed_process_is_taken_over_at_once(tmp_path):
    root = str(tmp_path / "ds")
    code = ("import os, signal\nfrom storage import lease\n"
            f"lease.acquire({root!r}, 'doomed', seconds=3600)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with lease.held(root, "next run"):  # same host, holder gone: no need to wait an hour
        pass


def test_orphan_sweep_spares_files_newer_than_the_lease(tmp_path):
    dataset = str(tmp_path / "ds")
    old = face_format.write_shard(dataset, [], [], [])  # a crashed run's sources file
    time.sleep(0.05)
    with lease.held(dataset, "sweeper"):
        new = face_format.write_shard(dataset, [], [], [])  # written after the lease: a live writer's
        assert face_format.delete_uncommitted(dataset) == [old[0].path]
    assert mf.orphans(dataset) == [new[0].path]


# --------------------------------------------------------------------------- two writers, one dataset/gallery

BLOCK_AFTER_FIRST_COMMIT = """
import os, sys, time
from storage import manifest
def hold(root, m, marker={marker!r}, release={release!r}):
    if not os.path.exists(marker):
        open(marker, "w").close()
        deadline = time.time() + 300
        while not os.path.exists(release) and time.time() < deadline:
            time.sleep(0.1)
manifest.COMMIT_HOOKS.append(hold)
from pipelines.cli import main
sys.exit(main({args!r}))
"""


def run_two_writers(args: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess, int]:
    """Writer A commits once and waits; writer B runs the same command meanwhile; then A goes on."""
    marker, release = str(tmp_path / "a-committed"), str(tmp_path / "release-a")
    a = subprocess.Popen([sys.executable, "-c", BLOCK_AFTER_FIRST_COMMIT.format(marker=marker, release=release,
                                                                                  args=args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(marker):
            assert a.poll() is None, a.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "writer A never committed"
            time.sleep(0.1)
        b = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300)
    finally:
        open(release, "w").close()
    out, err = a.communicate(timeout=300)
    return subprocess.CompletedProcess(a.args, a.returncode, out, err), b, a.pid


def photo_tree(lfw_dir, path) -> str:
    for person, photos in lfw_people(lfw_dir, identities=3, photos=4):
        (path / person).mkdir(parents=True)
        for p in photos:
            shutil.copy(p, path / person / p.name)
    return str(path)


def test_two_concurrent_prepares_list_every_face_once(lfw_dir, root, tmp_path):
    src = photo_tree(lfw_dir, tmp_path / "photos")
    dataset = urls.join(root, "ds")
    a, b, a_pid = run_two_writers(["prepare", src, dataset, "--crop-size", "32", "--shard-size", "2",
                                   "--executor", "local"], tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    assert b.returncode != 0 and "being written by another job" in b.stderr and f"pid {a_pid}" in b.stderr, \
        b.stderr[-3000:]
    assert len(b.stderr.strip().splitlines()) <= 5, b.stderr  # a message, not a traceback
    ids = listed_face_ids(dataset)
    assert len(ids) == 12 and duplicates(ids) == []
    assert face_format.read_sources(dataset).num_rows == 12
    assert mf.orphans(dataset) == []  # nothing the second writer did is left behind
    # a re-run after the fact finds nothing to do and lists nothing twice
    again = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", src, dataset, "--crop-size", "32",
                            "--executor", "local"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(listed_face_ids(dataset)) == sorted(ids)


def test_two_concurrent_encodes_list_every_face_once(faces, model_url, root, tmp_path):
    dataset = copy_dataset(faces, root)
    gallery = urls.join(root, "gallery")
    a, b, a_pid = run_two_writers(["encode", model_url, dataset, gallery, "--batch-size", "8", "--commit-seconds",
                                   "0", "--executor", "local"], tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    assert b.returncode != 0 and "being written by another job" in b.stderr and f"pid {a_pid}" in b.stderr, \
        b.stderr[-3000:]
    ids = gallery_face_ids(gallery)
    assert len(ids) == 24 and duplicates(ids) == []
    assert len(require_gallery(gallery).encoded_sources) == 3


def test_ingest_commit_is_idempotent_per_photo(tmp_path):
    """Two writers that processed the same photos (no lease: e.g. a commit re-applied after a race)."""
    from test_ingest_units import face_row

    dataset = str(tmp_path / "ds")

    def shard(names):
        rows = [face_row(f"{n}-0", "database") for n in names]
        sources = [{"source": r["source"], "identity": "p", "content_hash": r["face_id"][:-2], "split": "database",
                    "faces": 1, "reason": None} for r in rows]
        return face_format.write_shard(dataset, rows, [], sources)

    writers = [shard(["a", "b"]), shard(["a", "b"]), shard(["b", "c"])]
    barrier = threading.Barrier(len(writers))

    def commit(entries):
        barrier.wait()
        face_format.commit_shard(dataset, entries, {"size": 24})

    threads = [threading.Thread(target=commit, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = listed_face_ids(dataset)
    assert sorted(ids) == ["a-0", "b-0", "c-0"]
    assert sorted(face_format.read_sources(dataset).column("source").to_pylist()) == ["a-0.jpg", "b-0.jpg", "c-0.jpg"]


def test_encode_commit_is_idempotent_per_source(tmp_path):
    gallery = str(tmp_path / "gallery")
    meta = gallery_metadata("m1", 4, 2, 16, "dct-orthonormal", {})
    ids = np.array(["f1", "f2"], dtype=object)

    def written():
        return [("faces/part-0.parquet", "sha-0",
                 write_source(gallery, "faces/part-0.parquet", ids, np.array([None, None], dtype=object),
                              np.zeros((2, 2), np.uint8), 2, 16, 100))]

    assert commit_sources(gallery, meta, written()) == {"faces/part-0.parquet"}
    assert commit_sources(gallery, meta, written()) == set()  # already listed by the first writer
    assert sorted(gallery_face_ids(gallery)) == ["f1", "f2"]


# --------------------------------------------------------------------------- pinned model, finite features

def test_nan_weights_fail_the_encode_naming_model_and_shard(faces, model_url, tmp_path):
    state = load_checkpoint(model_url)
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v  # a diverged run's weights
               for k, v in state["model"].items()}
    nan_url = str(tmp_path / "nan.pt")
    save_checkpoint(nan_url, {k: v for k, v in state.items() if k != "model_id"} | {"model": weights})
    nan_id = load_checkpoint(nan_url)["model_id"]
    gallery = str(tmp_path / "gallery")
    with pytest.raises(NonFiniteFeaturesError, match=rf"model {nan_id} .*non-finite.* source shard .*part-0000\d"):
        encode_gallery(nan_url, str(faces), gallery, EncodeConfig(batch_size=8, commit_seconds=0, executor="local"))
    assert open_gallery(gallery) is None  # not one code committed
    assert not lease.holding(gallery)  # and the lease was given back


def test_a_checkpoint_rewritten_mid_encode_changes_no_code(faces, model_url, tmp_path, monkeypatch):
    """Training rewrites its checkpoint URL every epoch: an encode under way keeps the model it planned with."""
    url = str(tmp_path / "m.pt")
    shutil.copy(model_url, url)
    state = load_checkpoint(url)
    planned = state["model_id"]
    retrained = {k: v for k, v in state.items() if k != "model_id"}
    retrained["model"] = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v
                          for k, v in state["model"].items()}

    def rewrite(root, manifest):
        if manifest.generation == 1:
            save_checkpoint(url, retrained)

    monkeypatch.setattr(mf, "COMMIT_HOOKS", [rewrite])
    cfg = EncodeConfig(batch_size=8, commit_seconds=0, executor="local")
    summary = encode_gallery(url, str(faces), str(tmp_path / "gallery"), cfg)
    assert load_checkpoint(url)["model_id"] != planned  # it was rewritten after the first commit
    monkeypatch.setattr(mf, "COMMIT_HOOKS", [])
    reference = encode_gallery(model_url, str(faces), str(tmp_path / "reference"), cfg)
    assert summary["model_id"] == reference["model_id"] == planned
    assert require_gallery(str(tmp_path / "gallery")).model_id == planned

    def codes(g):
        return {f: c for u in require_gallery(g).shard_urls()
                for f, c in zip(*(read_table(u).column(n).to_pylist() for n in ("face_id", "codes")))}

    assert codes(str(tmp_path / "gallery")) == codes(str(tmp_path / "reference"))


def test_encode_task_refuses_another_model_than_planned():
    job = EncodeJob(gallery_url="g", splits=(), batch_size=1, shard_rows=1, threads=0, use_gpu=False,
                    store_features=False, model_id="aaaa")
    check_model({"model_id": "aaaa"}, job)
    with pytest.raises(ValueError, match="model bbbb.*planned with aaaa"):
        check_model({"model_id": "bbbb"}, job)


def test_relative_paths_become_absolute(faces, model_url, tmp_path, monkeypatch):
    shutil.copytree(faces, tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    summary = encode_gallery(model_url, "ds", "gallery", EncodeConfig(batch_size=8, executor="local"))
    assert summary["gallery"] == str(tmp_path / "gallery") and summary["faces"] == 24


# --------------------------------------------------------------------------- compaction order

def test_compaction_keeps_the_order_of_equal_score_ties(tmp_path):
    gallery = str(tmp_path / "gallery")
    M, K, D = 4, 16, 8
    entries = []
    for s in range(3):  # three shards of four faces, every code the same: every score ties
        ids = [f"s{s}-f{i}" for i in range(4)]
        entries += write_code_shard(gallery, code_table(ids, [None] * 4, np.zeros((4, M), np.uint8), M, K),
                                    {FEATURES_DIR: feature_table(ids, np.full((4, D), s, np.float32), D)})
    list_files(gallery, entries, gallery_metadata("m", D, M, K, "dct-orthonormal", {}, store_features=True))
    tables = np.random.default_rng(0).standard_normal((2, M, K)).astype(np.float32)

    def topk(k=6):
        g = require_gallery(gallery)
        deleted = pa.array(sorted(deleted_ids(g)), pa.string())
        shards = [ShardTask(i, urls.join(gallery, s.path), s.rows) for i, s in enumerate(g.shards)]
        best = merge_topk([shard_topk(tables, t, k, deleted) for t in shards], k)
        return best.column("face_id").to_pylist()

    delete_faces(gallery, ["s0-f1"])  # in the first shard: compaction rewrites it
    delete_faces(gallery, ["s2-f3"])  # and the last
    assert len(require_gallery(gallery).tombstones) == 1 and deleted_ids(require_gallery(gallery)) == {"s0-f1", "s2-f3"}  # one file
    before = topk()
    assert before[:6] == ["s0-f0", "s0-f2", "s0-f3", "s1-f0", "s1-f1", "s1-f2"]
    result = compact(gallery)
    assert result["removed_faces"] == 2 and result["tombstones_dropped"] == 1
    records = [f for f in mf.read_manifest(gallery).files if f.path.startswith(ERASED_DIR + "/")]
    assert len(records) == 1 and erased_hashes(gallery) == {face_id_hash("s0-f1"), face_id_hash("s2-f3")}
    assert compact(gallery)["rewritten"] == 0  # nothing left to do
    assert topk() == before
    g = require_gallery(gallery)
    assert [fid for u in g.shard_urls() for fid in read_table(u).column("face_id").to_pylist()][:3] == \
        ["s0-f0", "s0-f2", "s0-f3"]
    for code, feat in zip(g.shards, g.features):  # paired shards kept their pairing and place
        assert feat.path.rsplit("/", 1)[-1] == code.path.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- forget + vacuum

def prepared_dataset(faces, dataset: str, broken=()) -> None:
    """The module's faces as `opqn prepare` lists them: three shards, each with its sources records;
    the faces ``broken`` get a crop encode cannot decode (encode lists them in its rejects)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(faces / "faces").to_pylist()
    for r in rows:
        if r["face_id"] in broken:
            r["image"] = b"not an image " + r["face_id"].encode()
    for s in range(3):
        part = rows[s::3]
        sources = [{"source": r["source"], "identity": r["identity"], "content_hash": r["face_id"][:-2] + "f" * 44,
                    "split": r["split"], "faces": 1, "reason": None} for r in part]
        face_format.commit_shard(dataset, face_format.write_shard(dataset, part, [], sources), {"size": 40})


def every_parquet_cell(root: str):
    """(url, column, value) of every string or binary cell of every Parquet file under ``root``."""
    fs, base = urls.resolve(root)
    for path in fs.find(base):
        if path.endswith(".parquet"):
            rel = path[len(base.rstrip("/")) + 1:]
            t = read_table(urls.join(root, rel))
            for name in t.column_names:
                if pa.types.is_string(t.schema.field(name).type) or pa.types.is_binary(t.schema.field(name).type):
                    for value in t.column(name).to_pylist():
                        yield rel, name, value


def test_forget_then_vacuum_leaves_no_byte_of_the_faces(faces, model_url, root):
    import pyarrow.parquet as pq

    from pipelines.cli import main

    dataset, gallery, older = (urls.join(root, n) for n in ("ds", "gallery", "gallery-older-model"))
    first = pq.read_table(faces / "faces", columns=["face_id", "identity"]).slice(0, 1).to_pylist()[0]
    who, broken = first["identity"], first["face_id"]  # one of the forgotten faces is in encode's rejects
    prepared_dataset(faces, dataset, broken={broken})
    encode_gallery(model_url, dataset, older, EncodeConfig(batch_size=8, executor="local", refine_bytes=8))
    encode_gallery(model_url, dataset, gallery, EncodeConfig(batch_size=8, executor="local", store_features=True))
    table = face_format.read_faces(dataset, ["face_id", "identity", "image"])
    gone = {f for f, i in zip(table.column("face_id").to_pylist(), table.column("identity").to_pylist()) if i == who}
    crops = {img for img, i in zip(table.column("image").to_pylist(), table.column("identity").to_pylist()) if i == who}
    assert len(gone) == 6 and broken in gone
    for g in (gallery, older):
        assert rejected_ids(g) == [broken] and len(gallery_face_ids(g)) == 23
    holding = {rel.split("/")[1] for rel, _, v in every_parquet_cell(root) if v in gone or v in crops}
    assert {"faces", "codes", "features", "refine", "rejects"} <= holding  # every kind of file is checked below

    assert main(["forget", dataset, "--identities", who, "--json"]) == 0
    assert not gone & set(listed_face_ids(dataset))
    for g in (gallery, older):  # queries stop returning them at once: not even tombstoned, compacted away
        ids = gallery_face_ids(g)
        assert len(ids) == 18 and not gone & set(ids) and not require_gallery(g).tombstones
        assert rejected_ids(g) == []  # the rejects file naming the broken face was rewritten without it
    assert [e["faces"] for e in mf.read_manifest(dataset).metadata["erasures"]] == [6]

    time.sleep(1.1)  # S3 stamps whole seconds
    for url in (dataset, gallery, older):
        assert main(["vacuum", url, "--older-than", "0.5"]) == 0
    leftovers = [(rel, col) for rel, col, v in every_parquet_cell(root) if v in gone or v in crops]
    assert leftovers == []

    # nothing brings them back: an incremental encode, and a new model's fresh gallery
    again = encode_gallery(model_url, dataset, gallery, EncodeConfig(batch_size=8, executor="local",
                                                                     store_features=True))
    assert again["sources_encoded"] == 0 and len(gallery_face_ids(gallery)) == 18
    fresh = urls.join(root, "gallery-new-model")
    encode_gallery(model_url, dataset, fresh, EncodeConfig(batch_size=8, executor="local"))
    assert len(gallery_face_ids(fresh)) == 18 and not gone & set(gallery_face_ids(fresh)) and not rejected_ids(fresh)
    assert fresh in mf.read_manifest(dataset).metadata["galleries"]


def test_a_gallery_delete_lasts_even_before_the_face_is_encoded(faces, model_url, tmp_path):
    import pyarrow.parquet as pq

    gallery = str(tmp_path / "gallery")
    encode_gallery(model_url, str(faces), gallery, EncodeConfig(batch_size=8, executor="local", max_sources=1))
    encoded = set(gallery_face_ids(gallery))
    everyone = set(pq.read_table(faces / "faces").column("face_id").to_pylist())
    later, now = sorted(everyone - encoded)[:2], sorted(encoded)[:1]
    result = delete_faces(gallery, later + now)
    assert result["unknown"] == later and result["deleted"] == 1
    encode_gallery(model_url, str(faces), gallery, EncodeConfig(batch_size=8, executor="local"))
    assert not set(later) & set(gallery_face_ids(gallery))  # the next encode did not add them
    compact(gallery)  # drops the tombstones, keeps the erasure record
    encode_gallery(model_url, str(faces), gallery, EncodeConfig(batch_size=8, executor="local"))
    assert set(gallery_face_ids(gallery)) == everyone - set(later) - set(now)
    from storage.vacuum import vacuum

    time.sleep(1.1)
    vacuum(gallery, older_than=0.5)  # the superseded shard and the tombstones
    assert not [v for _, _, v in every_parquet_cell(gallery) if v in later + now]  # the record holds hashes only


def test_forgotten_faces_stay_out_of_a_re_prepare_and_a_retrain(lfw_dir, tmp_path):
    from pipelines.ingest.config import IngestConfig
    from pipelines.ingest.forget import forget
    from pipelines.ingest.run import prepare_dataset

    src = photo_tree(lfw_dir, tmp_path / "photos")
    dataset = str(tmp_path / "ds")
    cfg = IngestConfig(size=32, shard_size=4, executor="local", protocol="cross", unseen_fraction=0.0)
    prepare_dataset(src, dataset, cfg)
    table = face_format.read_faces(dataset, ["face_id", "identity"])
    who = table.column("identity")[0].as_py()
    gone = {f for f, i in zip(table.column("face_id").to_pylist(), table.column("identity").to_pylist()) if i == who}
    assert forget(dataset, identities=[who])["faces"] == len(gone) > 0
    one = sorted((tmp_path / "photos" / who).iterdir())[0]
    (tmp_path / "photos" / "someone-new").mkdir()
    shutil.copy(one, tmp_path / "photos" / "someone-new" / "copy.jpg")  # the same photo at another URL
    again = prepare_dataset(src, dataset, cfg)
    assert again.faces == 0 and not gone & set(listed_face_ids(dataset))
    model = str(tmp_path / "m.pt")
    train_local(TrainConfig(data=dataset, model_url=model, bits=16, codewords=16, dim=64, width=0.125, epochs=1,
                            batch_size=8, seed=0), evaluate=False)
    assert who not in load_checkpoint(model)["classes"]


def test_compact_delete_forget_and_vacuum_refuse_a_held_gallery_or_dataset(tmp_path):
    from test_ingest_units import face_row

    from pipelines.ingest.forget import forget
    from storage.vacuum import vacuum

    gallery, dataset = str(tmp_path / "gallery"), str(tmp_path / "ds")
    ids = [f"f{i}" for i in range(4)]
    list_files(gallery, write_code_shard(gallery, code_table(ids, [None] * 4, np.zeros((4, 4), np.uint8), 4, 16)),
               gallery_metadata("m", 8, 4, 16, "dct-orthonormal", {}))
    rows = [face_row("a-0", "database")]
    sources = [{"source": r["source"], "identity": "p", "content_hash": "h", "split": "database", "faces": 1,
                "reason": None} for r in rows]
    face_format.commit_shard(dataset, face_format.write_shard(dataset, rows, [], sources), {"size": 24})
    holders = {url: lease.acquire(url, f"a job on {url}", heartbeat=False) for url in (gallery, dataset)}
    failures = []

    def attempt(fn, *args):
        try:
            fn(*args)
        except lease.LeaseHeldError as exc:
            failures.append(str(exc))

    try:
        for fn, args in ((compact, (gallery,)), (delete_faces, (gallery, ["f1"])), (vacuum, (gallery, 0)),
                         (forget, (dataset, ["p"])), (vacuum, (dataset, 0))):
            t = threading.Thread(target=attempt, args=(fn, *args))
            t.start()
            t.join()
    finally:
        for held in holders.values():
            held.release()
    assert len(failures) == 5 and all("being written by another job" in f for f in failures)
    assert sorted(gallery_face_ids(gallery)) == ids and listed_face_ids(dataset) == ["a-0"]  # nothing changed


# --------------------------------------------------------------------------- two erasure jobs at once

def small_dataset_and_gallery(root: str, storage_options: dict | None = None) -> tuple[str, str]:
    """A dataset of 8 faces (identities p0, p1; two shards) and a gallery of their codes, recorded in
    it, with encode's rejects naming p0's first face: what an encode writes, without a model."""
    from test_ingest_units import face_row

    from pipelines.formats.face_erasure import record_gallery

    dataset, gallery = urls.join(root, "ds"), urls.join(root, "gallery")
    rows = [{**face_row(f"p{i % 2}-{i}-0", "database"), "identity": f"p{i % 2}"} for i in range(8)]
    for part in (rows[:4], rows[4:]):
        sources = [{"source": r["source"], "identity": r["identity"], "content_hash": r["face_id"][:-2], "split":
                    "database", "faces": 1, "reason": None} for r in part]
        face_format.commit_shard(dataset, face_format.write_shard(dataset, part, [], sources, storage_options),
                                 {"size": 24}, storage_options)
    record_gallery(dataset, gallery, storage_options)
    ids = np.array([r["face_id"] for r in rows[1:]], dtype=object)
    entries = write_source(gallery, "faces/part-0", ids, np.array([r["identity"] for r in rows[1:]], dtype=object),
                           np.zeros((7, 4), np.uint8), 4, 16, 4, rejects=([rows[0]["face_id"]], ["undecodable"]),
                           storage_options=storage_options)
    list_files(gallery, entries, gallery_metadata("m", 8, 4, 16, "dct-orthonormal", {"faces/part-0": "x"}),
               storage_options)
    return dataset, gallery


def identity_of(face_id: str) -> str:
    return face_id.split("-")[0]


@pytest.mark.parametrize("kind", ["compact", "forget", "vacuum"])
def test_two_erasure_jobs_started_together_one_fails_naming_the_holder(kind, root):
    """Two compacts, forgets or vacuums start together: one takes the lease (and is held right
    there until the other has finished), the other fails at once in one line naming it; nothing is
    listed twice or lost."""
    from pipelines.ingest.forget import forget
    from storage.vacuum import vacuum

    dataset, gallery = small_dataset_and_gallery(root)
    faces_before, gallery_before = sorted(listed_face_ids(dataset)), sorted(gallery_face_ids(gallery))
    if kind != "forget":
        delete_faces(gallery, gallery_before[:2])
    if kind == "vacuum":
        compact(gallery)  # leaves the superseded code shard and the tombstones unlisted
        if not urls.is_local(root):
            time.sleep(1.1)  # S3 stamps whole seconds
    orphans = mf.orphans(gallery)
    target = dataset if kind == "forget" else gallery
    ops = {"compact": lambda who: compact(gallery), "forget": lambda who: forget(dataset, identities=[who]),
           "vacuum": lambda who: vacuum(gallery, older_than=0)}
    barrier, finished, loser_done = threading.Barrier(2), threading.Semaphore(0), threading.Event()
    outcomes: dict[str, object] = {}

    def hold(held):  # the winner waits, holding the lease, until the other job has given up
        if held.root == target:
            assert loser_done.wait(60), "the second job never finished"

    def job(who):
        barrier.wait()
        try:
            outcomes[who] = ops[kind](who)
        except Exception as exc:  # noqa: BLE001 - the outcome is checked below
            outcomes[who] = exc
        finally:
            finished.release()

    lease.ACQUIRE_HOOKS.append(hold)
    try:
        threads = [threading.Thread(target=job, args=(who,)) for who in ("p0", "p1")]
        for t in threads:
            t.start()
        assert finished.acquire(timeout=60), "neither job finished while the other held the lease"
        loser_done.set()
        for t in threads:
            t.join(60)
    finally:
        lease.ACQUIRE_HOOKS.remove(hold)
    [loser] = [w for w, o in outcomes.items() if isinstance(o, lease.LeaseHeldError)]
    [winner] = [w for w, o in outcomes.items() if not isinstance(o, Exception)]
    message = str(outcomes[loser])
    assert "being written by another job" in message and f"pid {os.getpid()}" in message and "\n" not in message
    assert f"opqn {'gallery compact' if kind == 'compact' else kind}" in message

    mf.verify(dataset)  # no listed file lost
    mf.verify(gallery)
    faces_after, gallery_after = listed_face_ids(dataset), gallery_face_ids(gallery)
    assert duplicates(faces_after) == [] and duplicates(gallery_after) == []
    if kind == "forget":  # exactly the winner's faces are gone, the loser's all kept
        assert sorted(faces_after) == [f for f in faces_before if identity_of(f) != winner]
        assert sorted(gallery_after) == [f for f in gallery_before if identity_of(f) != winner]
    else:
        assert sorted(faces_after) == faces_before and sorted(gallery_after) == gallery_before[2:]
    if kind == "vacuum":
        assert sorted(outcomes[winner]) == orphans and len(orphans) >= 2 and mf.orphans(gallery) == []


def test_forget_and_vacuum_use_the_callers_storage_options(s3_server, s3_bucket, monkeypatch):
    """Explicit storage_options reach the dataset and every gallery (leases, reads, rewrites,
    commits), with an environment whose credentials the store refuses."""
    from pipelines.ingest.forget import forget
    from storage.errors import StorageAuthError
    from storage.vacuum import vacuum

    dataset, gallery = small_dataset_and_gallery(s3_bucket)
    opts = s3_server.storage_options()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 25)
    with pytest.raises(StorageAuthError):
        forget(dataset, identities=["p0"])  # the environment alone cannot reach the store
    summary = forget(dataset, identities=["p0"], storage_options=opts)
    assert summary["faces"] == 4 and summary["galleries"][gallery]["removed_rejects"] == 1
    time.sleep(1.1)  # S3 stamps whole seconds
    assert len(vacuum(gallery, older_than=0, storage_options=opts)) >= 3  # old code shard, rejects, tombstones
    assert len(vacuum(dataset, older_than=0, storage_options=opts)) == 2  # both face shards held p0
    monkeypatch.undo()
    assert sorted(set(map(identity_of, listed_face_ids(dataset)))) == ["p1"]
    assert sorted(set(map(identity_of, gallery_face_ids(gallery)))) == ["p1"]
    assert rejected_ids(gallery) == [] and mf.orphans(gallery) == [] and mf.orphans(dataset) == []
