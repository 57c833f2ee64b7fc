"""Train -> encode -> delete -> query: the query stage on a gallery written by `opqn encode`."""
import sys

import numpy as np
import pytest
import torch

from face_datasets import write_face_dataset
from model.scoring import lut_scores
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint
from pipelines.formats.gallery import deleted_ids, read_codes, require_gallery
from pipelines.formats.checkpoint import stored_size
from pipelines.query.run import query_tables
from pipelines.query.source import load_queries
from storage.tables import read_table


pytestmark = pytest.mark.usefixtures("ray_local")


def test_query_a_gallery_written_by_encode(lfw_dir, tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.formats.gallery_writer import delete_faces
    from pipelines.encode.run import EncodeConfig, encode_gallery
    from pipelines.train.local import TrainConfig, train_local

    data = write_face_dataset(tmp_path / "faces", lfw_dir, identities=6, photos=6, size=40, shards=3)
    model_url = str(tmp_path / "model.pt")
    train_local(TrainConfig(data=str(data), model_url=model_url, bits=16, codewords=16, dim=64, width=0.125,
                            epochs=1, batch_size=16, max_steps=3), evaluate=False)
    gallery_url = str(tmp_path / "gallery")
    # out= explicitly: encode_gallery's default stream is bound when the module is first imported
    summary = encode_gallery(model_url, str(data), gallery_url,
                             EncodeConfig(splits=("database",), batch_size=8, shard_rows=7), out=sys.stderr)
    gallery = require_gallery(gallery_url)
    assert summary["code_shards_written"] == len(gallery.shards) > summary["sources_encoded"]  # sources cut at 7 rows
    face_ids, codes = zip(*[read_codes(u, gallery.M) for u in gallery.shard_urls()])
    face_ids = [f for part in face_ids for f in part.to_pylist()]
    codes = np.concatenate(codes)
    delete_faces(gallery_url, face_ids[:2])
    deleted = deleted_ids(require_gallery(gallery_url))
    assert deleted == set(face_ids[:2])

    results = str(tmp_path / "results.parquet")
    assert main(["query", model_url, gallery_url, str(data), results, "--top-k", "1000", "--json"]) == 0
    assert "query: 6 queries" in capsys.readouterr().err

    state = load_checkpoint(model_url)
    ids, images = load_queries(str(data), "query", stored_size(state))
    tables = query_tables(model_from_checkpoint(state), images, 64)
    scores = lut_scores(torch.from_numpy(tables), torch.from_numpy(codes.astype(np.int64))).numpy()
    live = np.array([i for i, f in enumerate(face_ids) if f not in deleted])
    got = read_table(results).to_pylist()
    assert len(got) == len(ids) * len(live) == 6 * 28
    for q, qid in enumerate(ids):
        order = live[np.lexsort((live, -scores[q, live]))]
        mine = [r for r in got if r["query_id"] == qid]
        assert [r["face_id"] for r in mine] == [face_ids[i] for i in order]
        np.testing.assert_allclose([r["score"] for r in mine], scores[q, order], atol=1e-6, rtol=0)
