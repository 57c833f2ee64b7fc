"""Queries in blocks: any block size gives the single-pass results; a results dataset resumes a
killed job at its first uncommitted block and a re-run with nothing new does nothing."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from face_datasets import lfw_people, write_face_dataset
from pipelines.query.results import read_results
from pipelines.query.run import MAX_TOP_K, QueryConfig, block_queries, query_batch
from storage.manifest import read_manifest
from storage.tables import read_table
from test_query import LOCAL, assert_same, brute_force, make_model, random_codes, write_gallery


@pytest.fixture(scope="module")
def queries(lfw_dir, tmp_path_factory):
    """18 faces in 3 shards (split "" takes them all), so blocks cross shard boundaries."""
    return str(write_face_dataset(tmp_path_factory.mktemp("block-faces"), lfw_dir, identities=6, photos=3, size=40,
                                  shards=3))


@pytest.fixture(scope="module")
def setup(queries, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("block-gallery")
    model_url, model_id = make_model(tmp / "model.pt", 64)
    codes = random_codes(900, 4, 64, seed=11)
    face_ids = [f"f{i}" for i in range(900)]
    gallery = write_gallery(str(tmp / "g"), model_id, 64, codes, face_ids, [400, 500], tombstones=["f5"])
    return model_url, gallery, brute_force(model_url, queries, codes, face_ids, 9, deleted={"f5"}, split="")


def test_any_block_size_gives_the_single_pass_results(queries, setup, tmp_path):
    model_url, gallery, expected = setup
    single = tmp_path / "single.parquet"
    summary = query_batch(model_url, gallery, queries, str(single),
                          QueryConfig(top_k=9, split="", batch_size=2, **LOCAL))
    assert summary["queries"] == 18 and summary["blocks"] == 1
    assert_same(single, expected)
    # blocks are whole forward batches (7 -> 6), so each query is embedded in the same batch: bit-identical
    for block, blocks in ((2, 9), (4, 5), (7, 3), (18, 1), (50, 1)):
        out = tmp_path / f"b{block}.parquet"
        cfg = QueryConfig(top_k=9, split="", query_block=block, batch_size=2, **LOCAL)
        summary = query_batch(model_url, gallery, queries, str(out), cfg)
        assert summary["blocks"] == blocks and summary["result_rows"] == 18 * 9
        assert read_table(str(out)).equals(read_table(str(single)))
        folder = tmp_path / f"b{block}"
        summary = query_batch(model_url, gallery, queries, str(folder), cfg)
        assert len(read_manifest(str(folder)).files) == blocks
        assert read_results(str(folder)).equals(read_table(str(single)))
    # a block smaller than a batch is one batch of its size: the same up to the forward pass's rounding
    query_batch(model_url, gallery, queries, str(tmp_path / "b1.parquet"),
                QueryConfig(top_k=9, split="", query_block=1, **LOCAL))
    assert_same(tmp_path / "b1.parquet", expected)


def test_block_size_from_the_memory_budget():
    cfg = QueryConfig(memory_mb=100)
    per_query = 3 * 112 * 112 + 8 * 4 * 256 + 8 * 512 + 4 * 64 * 100
    assert block_queries(cfg, 112, 4, 256, 512) == 100 * 2**20 // (2 * per_query) // 256 * 256  # two blocks held
    assert block_queries(QueryConfig(memory_mb=200), 112, 4, 256, 512) > block_queries(cfg, 112, 4, 256, 512)
    assert block_queries(QueryConfig(query_block=7), 112, 4, 256, 512) == 7  # under one batch: as asked
    assert block_queries(QueryConfig(query_block=700), 112, 4, 256, 512) == 512  # whole batches of 256
    assert block_queries(QueryConfig(memory_mb=1, top_k=MAX_TOP_K), 512, 16, 256, 1024) == 1


def test_killed_job_resumes_at_the_first_uncommitted_block(queries, setup, tmp_path):
    model_url, gallery, expected = setup
    uninterrupted = str(tmp_path / "uninterrupted")
    query_batch(model_url, gallery, queries, uninterrupted, QueryConfig(top_k=9, split="", query_block=4, **LOCAL))
    results = str(tmp_path / "results")
    args = ["query", model_url, gallery, queries, results, "--top-k", "9", "--split", "", "--query-block", "4",
            "--executor", "local", "--progress-interval", "0"]
    # kill -9 right after the 3rd block's commit (12 of the 18 queries answered)
    kill_after_third_block = (
        "import os, signal, sys\n"
        "from storage import manifest\n"
        f"manifest.COMMIT_HOOKS.append(lambda root, m: root == {results!r} and m.generation >= 3 "
        "and os.kill(os.getpid(), signal.SIGKILL))\n"
        "from pipelines.cli import main\n"
        f"sys.exit(main({args!r}))\n")
    killed = subprocess.run([sys.executable, "-c", kill_after_third_block], capture_output=True, text=True,
                            timeout=600, cwd=os.getcwd())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = read_manifest(results)
    assert len(partial.files) == 3 and partial.metadata["query_results"]["done"] == 12
    summary = query_batch(model_url, gallery, queries, results, QueryConfig(top_k=9, split="", query_block=4, **LOCAL))
    assert summary["new_queries"] == 6 and summary["blocks"] == 2 and summary["queries"] == 18
    assert read_results(results).equals(read_results(uninterrupted))
    assert_same_dataset(results, expected)
    generation = read_manifest(results).generation
    again = query_batch(model_url, gallery, queries, results, QueryConfig(top_k=9, split="", **LOCAL))
    assert again["new_queries"] == 0 and again["blocks"] == 0 and again["result_rows"] == 18 * 9
    assert read_manifest(results).generation == generation  # nothing new: nothing committed
    assert_same_dataset(results, expected)


def assert_same_dataset(results, expected):
    table = read_results(results)
    single = os.path.join(os.path.dirname(results), "as-one-file.parquet")
    import pyarrow.parquet as pq

    pq.write_table(table, single)
    assert_same(single, expected)


def test_results_dataset_refuses_other_settings_or_queries(queries, setup, lfw_dir, tmp_path):
    model_url, gallery, _ = setup
    results = str(tmp_path / "results")
    query_batch(model_url, gallery, queries, results, QueryConfig(top_k=9, split="", query_block=4, **LOCAL))
    with pytest.raises(ValueError, match="other settings .*top_k"):
        query_batch(model_url, gallery, queries, results, QueryConfig(top_k=5, split="", **LOCAL))
    other = str(write_face_dataset(tmp_path / "other", lfw_dir, identities=6, photos=3, size=40, skip=6))
    with pytest.raises(ValueError, match="another query set"):
        query_batch(model_url, gallery, other, results, QueryConfig(top_k=9, split="", **LOCAL))


def test_empty_query_set_leaves_an_empty_results_dataset(queries, setup, tmp_path):
    model_url, gallery, _ = setup
    results = str(tmp_path / "results")
    summary = query_batch(model_url, gallery, queries, results, QueryConfig(split="nosuch", **LOCAL))
    assert summary["queries"] == 0 and read_results(results).num_rows == 0


def test_folder_blocks_skip_unreadable_photos_at_their_position(lfw_dir, setup, tmp_path):
    model_url, gallery, _ = setup
    folder = tmp_path / "crops"
    for ident, paths in lfw_people(lfw_dir, 3, 2):
        (folder / ident).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, folder / ident / p.name)
    broken = sorted(folder.glob("*/*"))[2]
    broken.write_bytes(b"not an image")
    single = tmp_path / "single.parquet"
    # batch_size=1: an unreadable photo shifts the forward batches of the decoded ones, which would
    # change the tables' float rounding
    query_batch(model_url, gallery, str(folder), str(single), QueryConfig(top_k=3, batch_size=1, **LOCAL))
    assert len(set(read_table(str(single)).column("query_id").to_pylist())) == 5
    results = str(tmp_path / "results")
    summary = query_batch(model_url, gallery, str(folder), results, QueryConfig(top_k=3, query_block=2, batch_size=1,
                                                                                  **LOCAL))
    assert summary["queries"] == 5 and read_manifest(results).metadata["query_results"]["done"] == 6
    assert read_results(results).equals(read_table(str(single)))


def test_top_k_above_the_limit_is_a_clear_error(setup, queries, tmp_path, capsys):
    from pipelines.cli import main

    with pytest.raises(ValueError, match=f"limit of {MAX_TOP_K} results per query"):
        QueryConfig(top_k=MAX_TOP_K + 1)
    with pytest.raises(ValueError, match=f"rerank R={MAX_TOP_K + 1} is above the limit"):
        QueryConfig(top_k=10, rerank=MAX_TOP_K + 1)
    QueryConfig(top_k=MAX_TOP_K)
    model_url, gallery, _ = setup
    out = tmp_path / "r.parquet"
    assert main(["query", model_url, gallery, queries, str(out), "--top-k", str(MAX_TOP_K + 1)]) != 0
    assert f"limit of {MAX_TOP_K}" in capsys.readouterr().err and not out.exists()


def test_queries_appended_to_the_query_set_are_answered_by_the_next_run(lfw_dir, setup, tmp_path):
    model_url, gallery, _ = setup
    grown = tmp_path / "grown"
    write_face_dataset(grown, lfw_dir, identities=6, photos=3, size=40, shards=3)
    first = tmp_path / "first"  # the same faces as the first two shards of "grown", in one folder
    shutil.copytree(grown, first)
    (first / "faces" / "part-00002.parquet").unlink()
    results = str(tmp_path / "results")
    cfg = QueryConfig(top_k=4, split="", query_block=4, batch_size=4, **LOCAL)
    assert query_batch(model_url, gallery, str(first), results, cfg)["queries"] == 12
    summary = query_batch(model_url, gallery, str(grown), results, cfg)
    assert summary["new_queries"] == 6 and summary["queries"] == 18
    query_batch(model_url, gallery, str(grown), str(tmp_path / "all.parquet"), cfg)
    assert read_results(results).equals(read_table(str(tmp_path / "all.parquet")))
