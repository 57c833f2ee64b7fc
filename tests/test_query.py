"""The batch query stage end to end: galleries written in the contract, a tiny OPQN checkpoint,
query faces from LFW; results must equal a brute-force scoring of every code."""
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from face_datasets import lfw_people, write_face_dataset
from model.opqn import OPQN, OPQNConfig
from model.scoring import lut_scores
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, training_state
from pipelines.formats.gallery import code_numpy_dtype, code_table, gallery_metadata
from pipelines.formats.gallery_writer import list_files, write_code_shard, write_tombstones
from pipelines.formats.checkpoint import stored_size
from pipelines.query.results import RESULT_SCHEMA
from pipelines.query.run import QueryConfig, query_batch, query_tables
from pipelines.query.source import load_queries
from pipelines.train.recipe import Recipe, make_optimizer
from storage.tables import read_table

SHAPES = {16: (4, 64), 64: (4, 256), 256: (2, 512), 512: (2, 1024)}  # K -> (M, D)


def make_model(path, K, seed=0):
    M, D = SHAPES[K]
    torch.manual_seed(seed)
    model = OPQN(OPQNConfig(num_classes=4, M=M, K=K, D=D, image_size=32, width=0.125))
    opt, sched = make_optimizer(model, Recipe())
    save_checkpoint(str(path), training_state(model, opt, sched, epoch=1, history=[], classes=list("abcd"),
                                              train={"enlarge": 1.1}))
    return str(path), load_checkpoint(str(path))["model_id"]


def random_codes(N, M, K, seed):
    """Codes drawn from a small pool, so identical codes (exact ties) sit in different shards."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, K, (max(2, N // 4), M))
    return pool[rng.integers(0, len(pool), N)].astype(code_numpy_dtype(K))


def write_gallery(url, model_id, K, codes, face_ids, sizes, tombstones=(), M=None, D=None):
    """Code shards of the given sizes (in manifest order) and one tombstone file, committed."""
    M0, D0 = SHAPES[K]
    M, D = M or M0, D or D0
    entries, start = [], 0
    for n in sizes:
        entries += write_code_shard(url, code_table(face_ids[start:start + n], [None] * n, codes[start:start + n], M, K))
        start += n
    assert start == len(codes)
    if tombstones:
        entries.append(write_tombstones(url, list(tombstones)))
    list_files(url, entries, gallery_metadata(model_id, D, M, K, "dct-orthonormal", {}))
    return url


def brute_force(model_url, queries, codes, face_ids, k, deleted=(), split="query"):
    """Every code scored with model.scoring.lut_scores; (score desc, global position) order."""
    state = load_checkpoint(model_url)
    model = model_from_checkpoint(state)
    ids, images = load_queries(queries, split, stored_size(state))
    tables = query_tables(model, images, 256)
    scores = lut_scores(torch.from_numpy(tables), torch.from_numpy(codes.astype(np.int64))).numpy()
    live = np.flatnonzero(~np.isin(np.asarray(face_ids), list(deleted)))
    rows = []
    for q, qid in enumerate(ids):
        order = live[np.lexsort((live, -scores[q, live]))][:k]
        rows += [{"query_id": qid, "rank": r, "face_id": face_ids[i], "score": float(scores[q, i])}
                 for r, i in enumerate(order)]
    return rows


def assert_same(results_url, expected):
    got = read_table(str(results_url))
    assert got.schema.equals(RESULT_SCHEMA)
    got = got.to_pylist()
    assert [(r["query_id"], r["rank"], r["face_id"]) for r in got] == \
           [(r["query_id"], r["rank"], r["face_id"]) for r in expected]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def queries(lfw_dir, tmp_path_factory):
    return str(write_face_dataset(tmp_path_factory.mktemp("query-faces"), lfw_dir, identities=5, photos=3, size=40))


LOCAL = dict(executor="local", progress_interval=0.0)


@pytest.mark.parametrize("K", [16, 64, 256, 512])
def test_results_equal_brute_force_for_any_shard_layout(K, queries, tmp_path):
    M, _ = SHAPES[K]
    model_url, model_id = make_model(tmp_path / "model.pt", K)
    N = 1500
    codes = random_codes(N, M, K, seed=K)
    face_ids = [f"f{i:05d}" for i in range(N)]
    expected = brute_force(model_url, queries, codes, face_ids, 20)
    layouts = {"one": [N], "three": [700, 300, 500],
               "many": [60] * 20 + [0] + [100] * 3}  # an empty shard, too
    outputs = []
    for name, sizes in layouts.items():
        gallery = write_gallery(str(tmp_path / f"gallery-{name}"), model_id, K, codes, face_ids, sizes)
        for rows_per_task in (N, 250, 1):
            out = tmp_path / f"results-{name}-{rows_per_task}.parquet"
            summary = query_batch(model_url, gallery, queries, str(out),
                                  QueryConfig(top_k=20, rows_per_task=rows_per_task, **LOCAL))
            assert summary["queries"] == 5 and summary["gallery_codes"] == N
            assert_same(out, expected)
            outputs.append(read_table(str(out)))
    assert all(o.equals(outputs[0]) for o in outputs)
    assert summary["tasks"] == len(layouts["many"])
    assert summary["kernel"] == ("fastscan" if K == 16 else "torch")


def test_task_sizes_and_scoring_batches_give_the_same_results(queries, tmp_path, monkeypatch):
    """Tasks sized by the job or by --rows-per-task, and kernel calls over several shards or one
    each: the same rows; the summary accounts for every task."""
    from pipelines.query import scan

    model_url, model_id = make_model(tmp_path / "model.pt", 256)
    N, deleted = 2000, {"f00007", "f01999"}
    codes = random_codes(N, 2, 256, seed=3)
    face_ids = [f"f{i:05d}" for i in range(N)]
    gallery = write_gallery(str(tmp_path / "g"), model_id, 256, codes, face_ids, [150] * 12 + [200], tombstones=deleted)
    expected = brute_force(model_url, queries, codes, face_ids, 15, deleted=deleted)
    outputs = []
    for rows_per_task, score_rows, tasks in ((0, scan.SCORE_ROWS, 1), (150, scan.SCORE_ROWS, 13), (0, 300, 1),
                                             (700, 1, 4)):
        monkeypatch.setattr(scan, "SCORE_ROWS", score_rows)
        out = tmp_path / f"r-{rows_per_task}-{score_rows}.parquet"
        summary = query_batch(model_url, gallery, queries, str(out),
                              QueryConfig(top_k=15, rows_per_task=rows_per_task, **LOCAL))
        assert_same(out, expected)
        outputs.append(read_table(str(out)))
        phases = summary["phases"]
        assert summary["tasks"] == phases["tasks"] == tasks and phases["node_tasks"] == {"local": tasks}
        assert phases["kernels"] == ["torch"] and summary["kernel"] == "torch"
        assert {"read_s", "score_s", "merge_s", "startup_s", "driver_merge_s", "embed_s"} <= set(phases)
    assert all(o.equals(outputs[0]) for o in outputs)
    # auto picks the kernel per block: a last block of one query goes to faiss, the same results
    cfg = dict(top_k=15, batch_size=2, **LOCAL)
    one = query_batch(model_url, gallery, queries, str(tmp_path / "one.parquet"), QueryConfig(**cfg))
    two = query_batch(model_url, gallery, queries, str(tmp_path / "two.parquet"), QueryConfig(query_block=4, **cfg))
    assert (one["blocks"], one["kernel"], two["blocks"], two["kernel"]) == (1, "torch", 2, "faiss+torch")
    assert read_table(str(tmp_path / "two.parquet")).equals(read_table(str(tmp_path / "one.parquet")))


@pytest.mark.parametrize("kernel", ["faiss", "numpy", "torch"])
def test_every_kernel_in_the_pipeline(kernel, queries, tmp_path):
    model_url, model_id = make_model(tmp_path / "model.pt", 256)
    codes = random_codes(900, 2, 256, seed=1)
    face_ids = [f"f{i}" for i in range(900)]
    gallery = write_gallery(str(tmp_path / "g"), model_id, 256, codes, face_ids, [400, 500])
    query_batch(model_url, gallery, queries, str(tmp_path / "r.parquet"),
                QueryConfig(top_k=15, kernel=kernel, split="", **LOCAL))
    assert_same(tmp_path / "r.parquet", brute_force(model_url, queries, codes, face_ids, 15, split=""))


def test_tombstoned_faces_never_appear(queries, tmp_path):
    model_url, model_id = make_model(tmp_path / "model.pt", 64)
    codes = random_codes(1200, 4, 64, seed=2)
    face_ids = [f"f{i}" for i in range(1200)]
    before = brute_force(model_url, queries, codes, face_ids, 10)
    deleted = {r["face_id"] for r in before if r["rank"] < 3} | {"f7", "f1100", "not-in-gallery"}
    gallery = write_gallery(str(tmp_path / "g"), model_id, 64, codes, face_ids, [500, 700], tombstones=sorted(deleted))
    out = tmp_path / "r.parquet"
    summary = query_batch(model_url, gallery, queries, str(out), QueryConfig(top_k=10, **LOCAL))
    assert summary["deleted"] == len(deleted)
    assert not deleted & set(read_table(str(out)).column("face_id").to_pylist())
    assert_same(out, brute_force(model_url, queries, codes, face_ids, 10, deleted=deleted))


def test_k_larger_than_gallery_returns_every_live_face(queries, tmp_path):
    model_url, model_id = make_model(tmp_path / "model.pt", 16)
    codes = random_codes(40, 4, 16, seed=3)
    face_ids = [f"f{i}" for i in range(40)]
    gallery = write_gallery(str(tmp_path / "g"), model_id, 16, codes, face_ids, [25, 15], tombstones=["f3"])
    out = tmp_path / "r.parquet"
    query_batch(model_url, gallery, queries, str(out), QueryConfig(top_k=1000, **LOCAL))
    rows = read_table(str(out)).to_pylist()
    assert len(rows) == 5 * 39
    assert_same(out, brute_force(model_url, queries, codes, face_ids, 1000, deleted={"f3"}))
    everything_deleted = write_gallery(str(tmp_path / "g0"), model_id, 16, codes[:5], face_ids[:5], [5],
                                       tombstones=face_ids[:5])
    summary = query_batch(model_url, everything_deleted, queries, str(out), QueryConfig(top_k=1000, **LOCAL))
    assert summary["result_rows"] == 0 and read_table(str(out)).num_rows == 0


def test_model_or_shape_mismatch_is_refused(queries, tmp_path):
    model_url, model_id = make_model(tmp_path / "model.pt", 64)
    other_url, _ = make_model(tmp_path / "other.pt", 64, seed=1)
    codes = random_codes(50, 4, 64, seed=4)
    gallery = write_gallery(str(tmp_path / "g"), model_id, 64, codes, [f"f{i}" for i in range(50)], [50])
    with pytest.raises(ValueError, match="was encoded by model"):
        query_batch(other_url, gallery, queries, str(tmp_path / "r.parquet"), QueryConfig(**LOCAL))
    shaped = write_gallery(str(tmp_path / "g2"), model_id, 64, codes[:, :2].copy(), [f"f{i}" for i in range(50)], [50],
                           M=2, D=256)
    with pytest.raises(ValueError, match="holds codes for D=256, M=2, K=64"):
        query_batch(model_url, shaped, queries, str(tmp_path / "r.parquet"), QueryConfig(**LOCAL))
    assert not (tmp_path / "r.parquet").exists()
    with pytest.raises(FileNotFoundError, match="no gallery"):
        query_batch(model_url, str(tmp_path / "nothing"), queries, str(tmp_path / "r.parquet"), QueryConfig(**LOCAL))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        query_batch(model_url, gallery, str(tmp_path / "no-queries"), str(tmp_path / "r.parquet"), QueryConfig(**LOCAL))
    with pytest.raises(ValueError, match="fastscan kernel needs 4-bit codes"):
        query_batch(model_url, gallery, queries, str(tmp_path / "r.parquet"), QueryConfig(kernel="fastscan", **LOCAL))
    assert not (tmp_path / "r.parquet").exists()


def test_empty_query_set_gives_empty_result_and_warning(queries, tmp_path, caplog):
    model_url, model_id = make_model(tmp_path / "model.pt", 64)
    gallery = write_gallery(str(tmp_path / "g"), model_id, 64, random_codes(30, 4, 64, 5),
                            [f"f{i}" for i in range(30)], [30])
    out = tmp_path / "r.parquet"
    summary = query_batch(model_url, gallery, queries, str(out), QueryConfig(split="nosuch", **LOCAL))
    assert summary["queries"] == 0 and summary["result_rows"] == 0
    table = read_table(str(out))
    assert table.num_rows == 0 and table.schema.equals(RESULT_SCHEMA)
    assert "no queries" in caplog.text and "nosuch" in caplog.text
    caplog.clear()
    (tmp_path / "empty-folder").mkdir()
    summary = query_batch(model_url, gallery, str(tmp_path / "empty-folder"), str(out), QueryConfig(**LOCAL))
    assert summary["queries"] == 0 and "no queries" in caplog.text


def test_image_folder_queries(lfw_dir, tmp_path):
    folder = tmp_path / "crops"
    for ident, paths in lfw_people(lfw_dir, 2, 2):
        (folder / ident).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, folder / ident / p.name)
    model_url, model_id = make_model(tmp_path / "model.pt", 256)
    codes = random_codes(300, 2, 256, seed=6)
    face_ids = [f"f{i}" for i in range(300)]
    gallery = write_gallery(str(tmp_path / "g"), model_id, 256, codes, face_ids, [100, 200])
    out = tmp_path / "r.parquet"
    query_batch(model_url, gallery, str(folder), str(out), QueryConfig(top_k=7, **LOCAL))
    expected = brute_force(model_url, str(folder), codes, face_ids, 7)
    assert len({r["query_id"] for r in expected}) == 4 and expected[0]["query_id"].count("/") == 1
    assert_same(out, expected)


def test_ray_tasks_bounded_in_flight_match_local(queries, tmp_path, ray_local, monkeypatch):
    import ray

    waited = []  # the scan's waits (the driver's main thread; workers are warmed in another thread)
    wait = ray.wait
    main = threading.main_thread()
    monkeypatch.setattr(ray, "wait", lambda refs, **kw: (threading.current_thread() is main and waited.append(len(refs)))
                        or wait(refs, **kw))
    model_url, model_id = make_model(tmp_path / "model.pt", 256)
    codes = random_codes(3000, 2, 256, seed=7)
    face_ids = [f"f{i}" for i in range(3000)]
    gallery = write_gallery(str(tmp_path / "g"), model_id, 256, codes, face_ids, [300] * 10, tombstones=["f0", "f2999"])
    out = tmp_path / "r.parquet"
    summary = query_batch(model_url, gallery, queries, str(out),
                          QueryConfig(top_k=25, rows_per_task=600, max_in_flight=2, progress_interval=0.0))
    assert summary["tasks"] == 5 and summary["task_slots"] == 2
    assert len(waited) == 5 and max(waited) == 2  # never more than max_in_flight tasks submitted
    expected = brute_force(model_url, queries, codes, face_ids, 25, deleted={"f0", "f2999"})
    assert_same(out, expected)

    # by default one task per core: a local Ray's spare CPU (start_ray declares cores + 1) is left out
    from pipelines import execution

    monkeypatch.setattr(execution, "_spare_cpus", 1)  # as if this 2-CPU Ray were 1 core + the spare
    waited.clear()
    summary = query_batch(model_url, gallery, queries, str(tmp_path / "r1.parquet"),
                          QueryConfig(top_k=25, rows_per_task=600, progress_interval=0.0))
    assert summary["task_slots"] == 1 and max(waited) == 1
    assert_same(tmp_path / "r1.parquet", expected)


def test_cli_end_to_end_and_progress(queries, tmp_path, capsys, ray_local):
    from pipelines.cli import main

    model_url, model_id = make_model(tmp_path / "model.pt", 16)
    codes = random_codes(2000, 4, 16, seed=8)
    face_ids = [f"f{i}" for i in range(2000)]
    gallery = write_gallery(str(tmp_path / "g"), model_id, 16, codes, face_ids, [1000, 600, 400])
    out = tmp_path / "r.parquet"
    assert main(["query", model_url, gallery, queries, str(out), "--top-k", "5", "--rows-per-task", "1000",
                 "--progress-interval", "0", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["queries"] == 5 and summary["tasks"] == 2 and summary["result_rows"] == 25
    assert "[query] 3/3 shards (100%)" in captured.err and "codes/s" in captured.err and "ETA" in captured.err
    assert "query: 5 queries x 2000 codes (3 shards, 2 tasks, 0 deleted) -> 25 results" in captured.err
    assert_same(out, brute_force(model_url, queries, codes, face_ids, 5))

    other_url, _ = make_model(tmp_path / "other.pt", 16, seed=3)
    assert main(["query", other_url, gallery, queries, str(out), "--executor", "local"]) == 1
    assert "was encoded by model" in capsys.readouterr().err


def test_prefect_flow_calls_the_pipeline(queries, tmp_path):
    from flows.query import query_batch_flow

    model_url, model_id = make_model(tmp_path / "model.pt", 64)
    codes = random_codes(200, 4, 64, seed=9)
    face_ids = [f"f{i}" for i in range(200)]
    gallery = write_gallery(str(tmp_path / "g"), model_id, 64, codes, face_ids, [200])
    out = tmp_path / "r.parquet"
    result = query_batch_flow.fn(model_url, gallery, queries, str(out), top_k=3, options={"executor": "local"})
    assert result["result_rows"] == 15 and result["kernel"] == "torch"
    assert_same(out, brute_force(model_url, queries, codes, face_ids, 3))
    with pytest.raises(ValueError, match="unknown query options"):
        query_batch_flow.fn(model_url, gallery, queries, str(out), options={"topk": 3})


def test_s3_gallery_and_results_with_ray_workers(queries, tmp_path, s3_bucket, ray_local):
    model_url, model_id = make_model(tmp_path / "model.pt", 64)
    codes = random_codes(800, 4, 64, seed=10)
    face_ids = [f"f{i}" for i in range(800)]
    gallery = write_gallery(f"{s3_bucket}/gallery", model_id, 64, codes, face_ids, [300, 500], tombstones=["f1"])
    out = f"{s3_bucket}/results/r.parquet"
    summary = query_batch(model_url, gallery, queries, out,
                          QueryConfig(top_k=12, rows_per_task=300, progress_interval=0.0))
    assert summary["tasks"] == 2
    assert_same(out, brute_force(model_url, queries, codes, face_ids, 12, deleted={"f1"}))
