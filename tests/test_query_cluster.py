"""`opqn query` on a two-node Ray cluster (two raylets on this machine, RAY_ADDRESS)."""
import json
import os
import subprocess
import sys


from test_query import assert_same, brute_force, make_model, random_codes, write_gallery


def test_query_tasks_spread_over_two_nodes(ray_cluster, lfw_dir, tmp_path):
    from face_datasets import write_face_dataset

    queries = str(write_face_dataset(tmp_path / "queries", lfw_dir, identities=4, photos=2, size=40))
    model_url, model_id = make_model(tmp_path / "model.pt", 64)
    codes = random_codes(3000, 4, 64, seed=11)
    face_ids = [f"f{i}" for i in range(3000)]
    gallery = write_gallery(str(tmp_path / "g"), model_id, 64, codes, face_ids, [500] * 6, tombstones=["f10"])
    results = str(tmp_path / "r.parquet")
    cmd = [sys.executable, "-m", "pipelines.cli", "query", model_url, gallery, queries, results, "--top-k", "30",
           "--rows-per-task", "500", "--json"]
    proc = subprocess.run(cmd, env={**os.environ, "RAY_ADDRESS": ray_cluster}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tasks"] == 6 and summary["nodes"] == 2
    assert_same(results, brute_force(model_url, queries, codes, face_ids, 30, deleted={"f10"}))
