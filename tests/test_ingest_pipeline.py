"""The ingest pipeline end to end on Ray (in-process, 2 CPUs): bad inputs, LFW subsets, splits,
incremental and crash-resumed runs, the VGGFace2 layout, uncropped group photos, S3."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.formats import faces as face_format
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.run import prepare_dataset
from storage import manifest as mf

REPO = Path(__file__).resolve().parent.parent


def lfw_people(lfw_dir: Path, min_photos: int, count: int, skip: int = 0) -> list[Path]:
    """``count`` LFW identity folders with at least ``min_photos`` photos (sorted, deterministic)."""
    out = []
    for d in sorted(lfw_dir.iterdir()):
        if len(list(d.glob("*.jpg"))) >= min_photos:
            out.append(d)
    return out[skip:skip + count]


def copy_photos(person: Path, dest: Path, n: int) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(person.glob("*.jpg"))[:n]:
        shutil.copy(p, dest / p.name)
        out.append(dest / p.name)
    return out


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def check_dataset(dataset: str, listed: set[str], storage_options=None):
    """The invariants every dataset must hold; returns (faces, rejects) as Python rows."""
    faces = face_format.read_faces(dataset, storage_options=storage_options).to_pylist()
    rejects = face_format.read_rejects(dataset, storage_options=storage_options).to_pylist()
    index = face_format.read_sources(dataset, storage_options=storage_options).to_pylist()
    face_sources = {f["source"] for f in faces}
    reject_sources = [r["source"] for r in rejects]
    assert len(reject_sources) == len(set(reject_sources)), "a photo was rejected twice"
    assert not face_sources & set(reject_sources), "a photo is in both faces and rejects"
    assert face_sources | set(reject_sources) == listed, "every input ends in faces or rejects"
    assert len({f["face_id"] for f in faces}) == len(faces), "face_id must be unique"
    assert sorted(r["source"] for r in index) == sorted(listed), "one sources row per input"
    assert sum(r["faces"] for r in index) == len(faces)
    return faces, rejects


# --------------------------------------------------------------------------- bad inputs

def test_bad_inputs_each_end_in_faces_or_rejects(tmp_path, lfw_dir, ray_local):
    people = lfw_people(lfw_dir, 1, 9)
    photo = [sorted(p.glob("*.jpg"))[0] for p in people]
    src = tmp_path / "src"
    a = src / "alice"
    a.mkdir(parents=True)
    shutil.copy(photo[0], a / "a.jpg")
    shutil.copy(photo[0], a / "copy.jpg")  # exact duplicate: rejected, pointing at a.jpg
    shutil.copy(photo[1], a / "B.JPG")  # upper-case extension
    shutil.copy(photo[2], a / "c.png")  # JPEG bytes named .png
    (a / "cmyk.jpg").write_bytes(jpeg(Image.open(photo[3]).convert("CMYK")))
    (a / "grey.jpg").write_bytes(jpeg(Image.open(photo[4]).convert("L")))
    rgba = Image.open(photo[5]).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(a / "alpha.png")
    good = photo[6].read_bytes()
    (a / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (a / "empty.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not a photo\n")
    (a / "folder.jpg").mkdir()
    os.symlink(tmp_path / "missing.jpg", a / "dangling.jpg")
    grad = np.tile(np.linspace(0, 255, 400), (300, 1)).astype(np.uint8)
    (a / "noface.jpg").write_bytes(jpeg(Image.fromarray(grad).convert("RGB")))
    canvas = Image.new("RGB", (6000, 4000), (40, 80, 120))
    canvas.paste(Image.open(photo[7]).resize((900, 900)), (4200, 2500))
    canvas.save(a / "huge.jpg", quality=85)
    (a / "notes.txt").write_text("not an input: no image extension")
    listed = {str(p) for p in a.iterdir() if p.name != "notes.txt"}

    log = io.StringIO()
    dataset = str(tmp_path / "ds")
    cfg = IngestConfig(size=32, shard_size=5, detect_max_side=640)
    result = prepare_dataset(str(src), dataset, cfg, stream=log)
    faces, rejects = check_dataset(dataset, listed)

    reasons = {Path(r["source"]).name: r["reason"] for r in rejects}
    assert reasons == {
        "copy.jpg": "duplicate", "trunc.jpg": "corrupt_image", "empty.jpg": "empty_file",
        "text.jpg": "not_an_image", "folder.jpg": "unreadable", "dangling.jpg": "unreadable",
        "noface.jpg": "no_face",
    }
    assert "a.jpg" in next(r["detail"] for r in rejects if r["reason"] == "duplicate")
    assert {Path(f["source"]).name for f in faces} == {"a.jpg", "B.JPG", "c.png", "cmyk.jpg", "grey.jpg",
                                                       "alpha.png", "huge.jpg"}
    huge = next(f for f in faces if f["source"].endswith("huge.jpg"))
    assert huge["box"][0] > 4000 and huge["box"][1] > 2300  # boxes are in original-photo pixels
    assert all(Image.open(io.BytesIO(f["image"])).size == (32, 32) for f in faces)
    assert all(f["identity"] == "alice" for f in faces)
    assert result.faces == len(faces) and sum(result.rejected.values()) == len(rejects)
    assert result.processed == len(listed)
    text = log.getvalue()
    assert "photos/s" in text and "ETA" in text
    assert "7 faces written, 7 rejected" in text and "duplicate=1" in text

    # Nothing new: a re-run does nothing and changes nothing.
    again = prepare_dataset(str(src), dataset, cfg, stream=io.StringIO())
    assert again.processed == 0 and again.skipped == len(listed)
    assert len(face_format.read_faces(dataset)) == len(faces)

    # Different settings on the same dataset are refused with a clear message.
    with pytest.raises(ValueError, match="size: dataset has 32, asked for 64"):
        prepare_dataset(str(src), dataset, IngestConfig(size=64), stream=io.StringIO())


# --------------------------------------------------------------------------- CLI

def test_cli_prepare_runs_and_reports_errors(tmp_path, lfw_dir, ray_local, capsys):
    from pipelines.cli import main

    src = tmp_path / "src"
    copy_photos(lfw_people(lfw_dir, 2, 1, skip=100)[0], src / "person", 2)
    dataset = str(tmp_path / "ds")
    assert main(["prepare", str(src), dataset, "--size", "32", "--format", "jpeg", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "2 faces written, 0 rejected" in err
    assert len(face_format.read_faces(dataset)) == 2
    assert main(["prepare", str(tmp_path / "nowhere"), dataset]) == 1
    assert "source folder not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- LFW: splits + incremental

def test_lfw_subset_splits_min_photos_and_incremental_run(tmp_path, lfw_dir, ray_local):
    src = tmp_path / "lfw"
    many = lfw_people(lfw_dir, 5, 3)
    for person in many:
        copy_photos(person, src / person.name, 4)
    lonely = lfw_people(lfw_dir, 1, 1, skip=7)[0]
    copy_photos(lonely, src / lonely.name, 1)
    dataset = str(tmp_path / "ds")
    cfg = IngestConfig(size=32, image_format="jpeg", shard_size=4, min_photos=2, query_fraction=0.25, seed=3)
    first = prepare_dataset(str(src), dataset, cfg, stream=io.StringIO())
    listed = {str(p) for p in src.rglob("*.jpg")}
    faces, rejects = check_dataset(dataset, listed)
    assert first.processed == 13
    assert rejects and all(r["reason"] == "too_few_photos" and r["identity"] == lonely.name for r in rejects)
    for person in many:
        splits = sorted(f["split"] for f in faces if f["identity"] == person.name)
        assert splits == ["database"] * 3 + ["query"], person.name

    # Splits depend on the photos and the seed, not on the run: same data, new dataset, same splits.
    # (Checked on the function level in test_ingest_units; here: recorded config in the manifest.)
    meta = mf.read_manifest(dataset).metadata["ingest"]
    assert meta["config"]["seed"] == 3 and meta["config"]["min_photos"] == 2

    # Add a photo to a known identity, a new identity, and a second photo of the lonely one.
    extra = sorted(many[0].glob("*.jpg"))[4]
    shutil.copy(extra, src / many[0].name / extra.name)
    newcomer = next(p for p in lfw_people(lfw_dir, 2, 20) if p not in many and p != lonely)
    copy_photos(newcomer, src / newcomer.name, 2)
    lonely_photos = sorted(lonely.glob("*.jpg"))
    other = lonely_photos[1] if len(lonely_photos) > 1 else sorted(lfw_people(lfw_dir, 1, 1, skip=8)[0].glob("*.jpg"))[0]
    shutil.copy(other, src / lonely.name / "another.jpg")
    log = io.StringIO()
    more = prepare_dataset(str(src), dataset, cfg, stream=log)
    listed = {str(p) for p in src.rglob("*.jpg")}
    assert more.processed == 4 and more.skipped == 13, log.getvalue()
    faces2, rejects2 = check_dataset(dataset, listed)
    old = {f["face_id"]: f for f in faces}
    assert all(old[f["face_id"]] == f for f in faces2 if f["face_id"] in old), "old rows are never rewritten"
    # A rejection is final: the lonely identity's first photo stays rejected, so it still has one photo.
    assert [r["reason"] for r in rejects2 if r["source"].endswith("another.jpg")] == ["too_few_photos"]
    new_rows = [f for f in faces2 if f["identity"] == newcomer.name]
    assert sorted(f["split"] for f in new_rows) == ["database", "query"]


# --------------------------------------------------------------------------- VGGFace2 layout via the flow

def test_vggface2_layout_cross_domain_through_the_prefect_flow(tmp_path, lfw_dir, ray_local):
    from flows.prepare import prepare_dataset_flow

    root = tmp_path / "vggface2"
    lists = {"train": [], "test": []}
    for i, person in enumerate(lfw_people(lfw_dir, 2, 4, skip=20)):
        part = "test" if i == 3 else "train"
        ident = f"n{i + 1:06d}"
        for j, p in enumerate(sorted(person.glob("*.jpg"))[:2]):
            dest = root / part / ident / f"{j + 1:04d}_01.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
            lists[part].append(f"{ident}/{dest.name}")
    lists["train"].append("n000001/9999_01.jpg")  # listed but missing on disk
    for part, lines in lists.items():
        (root / f"{part}_list.txt").write_text("\n".join(lines) + "\n")
    (root / "identity_meta.csv").write_text('Class_ID, Name, Sample_Num, Flag, Gender\nn000001, "A", 2, 1, m\n')
    (root / "stray.jpg").write_bytes(b"not listed, not an input")

    dataset = str(tmp_path / "ds")
    out = prepare_dataset_flow.fn(str(root), dataset, size=32, protocol="cross", shard_size=3)
    listed = {str(root / part / line) for part, lines in lists.items() for line in lines}
    faces, rejects = check_dataset(dataset, listed)
    assert out["faces"] == len(faces) == 8 and out["rejected"] == {"unreadable": 1}
    assert {f["identity"] for f in faces} == {"n000001", "n000002", "n000003", "n000004"}
    by_identity = {}
    for f in faces:
        by_identity.setdefault(f["identity"], set()).add(f["split"])
    assert all(len(s) == 1 and s <= {"train", "unseen"} for s in by_identity.values())


# --------------------------------------------------------------------------- uncropped group photos

def test_uncropped_and_group_photos_keep_all(tmp_path, data_root, ray_local):
    src = tmp_path / "photos"
    src.mkdir()
    deepface = data_root / "photos" / "deepface"
    for name in ("couple.jpg", "img1.jpg", "img12.jpg", "selfie-many-people.jpg"):
        shutil.copy(deepface / name, src / name)
    shutil.copy(data_root / "photos" / "facenet_pytorch" / "multiface.jpg", src / "multiface.jpg")
    shutil.copytree(data_root / "photos" / "facenet_pytorch" / "test_images" / "paul_rudd", src / "paul_rudd")
    dataset = str(tmp_path / "ds")
    cfg = IngestConfig(size=64, keep_all=True, detect_max_side=800, shard_size=3)
    prepare_dataset(str(src), dataset, cfg, stream=io.StringIO())
    listed = {str(p) for p in src.rglob("*.jpg")}
    faces, rejects = check_dataset(dataset, listed)
    per_photo = {}
    for f in faces:
        per_photo[Path(f["source"]).name] = per_photo.get(Path(f["source"]).name, 0) + 1
    assert not rejects, rejects
    assert per_photo["couple.jpg"] >= 2 and per_photo["multiface.jpg"] >= 3 and per_photo["selfie-many-people.jpg"] >= 3
    assert {f["identity"] for f in faces if f["source"].endswith("paul_rudd/1.jpg")} == {"paul_rudd"}
    assert {f["identity"] for f in faces if f["source"].endswith("couple.jpg")} == {None}
    for f in faces:  # landmarks and boxes are in the photo's own pixels
        x1, y1, x2, y2 = f["box"]
        assert x2 > x1 and y2 > y1 and f["det_score"] >= 0.9


# --------------------------------------------------------------------------- crash and resume

def descendants(root: int) -> set[int]:
    """PIDs of every live process below ``root`` (from /proc), so a test can kill exactly its own run."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: set[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)


def test_resume_after_kill_9_finishes_without_duplicates(tmp_path, lfw_dir, ray_local):
    src = tmp_path / "lfw"
    for person in lfw_people(lfw_dir, 3, 6, skip=40):
        copy_photos(person, src / person.name, 3)
    listed = {str(p) for p in src.rglob("*.jpg")}
    dataset = str(tmp_path / "ds")
    stopped = tmp_path / "stopped-after-two-commits"
    # The commit hook stops the driver right after its second commit, while the other worker is
    # busy with the next shard; once that shard's files are written (never to be committed), the
    # test kills the driver, its Ray node and workers with -9.
    code = (
        "import time\n"
        "from storage import manifest\n"
        "def stop(root, m):\n"
        "    if sum(e.path.startswith('sources/') for e in m.files) >= 2:\n"
        f"        open({str(stopped)!r}, 'w').close()\n"
        "        time.sleep(600)\n"
        "manifest.COMMIT_HOOKS.append(stop)\n"
        "from pipelines.ingest.config import IngestConfig\n"
        "from pipelines.ingest.run import prepare_dataset\n"
        f"prepare_dataset({str(src)!r}, {dataset!r}, IngestConfig(size=32, shard_size=2, batch_size=2, num_workers=2, "
        "commit_seconds=0),"
        " progress_interval=0)\n"
    )
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not stopped.exists():
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        assert stopped.exists(), "no shard was committed in time"
        while time.monotonic() < deadline and not any(p.startswith("sources/") for p in mf.orphans(dataset)):
            time.sleep(0.2)
        assert any(p.startswith("sources/") for p in mf.orphans(dataset)), "the in-flight shard wrote nothing"
    finally:
        run = descendants(proc.pid) | {proc.pid}  # the driver, its Ray node and workers
        for pid in run:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        proc.stderr.close()
        wait_gone(run)
    partial = face_format.read_sources(dataset).num_rows
    assert partial == 4 < len(listed), "two shards of two photos were committed"

    log = io.StringIO()
    result = prepare_dataset(str(src), dataset, IngestConfig(size=32, shard_size=2, batch_size=2), stream=log)
    assert result.skipped == partial and result.processed == len(listed) - partial
    faces, _ = check_dataset(dataset, listed)
    assert len(faces) >= len(listed) - 2
    assert mf.orphans(dataset) == [], "files of the killed run are cleaned up"


# --------------------------------------------------------------------------- S3

def test_s3_source_and_dataset(s3_bucket, s3_server, lfw_dir, ray_local):
    from storage import urls

    fs, _ = urls.resolve(s3_bucket)
    bucket = s3_bucket[len("s3://"):]
    sources = set()
    for person in lfw_people(lfw_dir, 2, 2, skip=60):
        for p in sorted(person.glob("*.jpg"))[:2]:
            fs.pipe_file(f"{bucket}/raw/{person.name}/{p.name}", p.read_bytes())
            sources.add(f"{s3_bucket}/raw/{person.name}/{p.name}")
    fs.pipe_file(f"{bucket}/raw/{person.name}/broken.jpg", p.read_bytes()[:2000])  # truncated JPEG
    sources.add(f"{s3_bucket}/raw/{person.name}/broken.jpg")
    # Ray workers started before the S3 server do not see its environment: pass options explicitly.
    opts = s3_server.storage_options()
    cfg = IngestConfig(size=32, shard_size=3, storage_options=opts)
    dataset = f"{s3_bucket}/datasets/lfw32"
    result = prepare_dataset(f"{s3_bucket}/raw", dataset, cfg, stream=io.StringIO())
    faces, rejects = check_dataset(dataset, sources, storage_options=opts)
    assert len(faces) == 4 and [r["reason"] for r in rejects] == ["corrupt_image"]
    assert result.processed == 5
    assert prepare_dataset(f"{s3_bucket}/raw", dataset, cfg, stream=io.StringIO()).processed == 0


# --------------------------------------------------------------------------- a real two-node cluster

CLUSTER_SCRIPT = r"""
import json, os, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address
try:
    from pipelines.ingest.config import IngestConfig
    from pipelines.ingest.run import prepare_dataset
    r = prepare_dataset(sys.argv[1], sys.argv[2], IngestConfig(size=32, shard_size=1, batch_size=1))
    print("RESULT " + json.dumps({"faces": r.faces, "nodes": r.nodes}))
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
"""


def test_runs_on_a_two_node_cluster_named_by_ray_address(tmp_path, lfw_dir):
    src = tmp_path / "lfw"
    for person in lfw_people(lfw_dir, 3, 2, skip=80):
        copy_photos(person, src / person.name, 3)
    dataset = str(tmp_path / "ds")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(src), dataset], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = __import__("json").loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
    faces, _ = check_dataset(dataset, {str(p) for p in src.rglob("*.jpg")})
    assert result["faces"] == len(faces) == 6
    assert len(result["nodes"]) == 2, f"both nodes should process shards: {result['nodes']}"
