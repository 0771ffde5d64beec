"""The search index beside a people output (pipeline/people/search_index.py): the people
job writes it, a replica loads it instead of building one, a stale one is never used, and
an IVF-SQ8 index finds what exact search finds."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from pipeline import people
from pipeline.people import job, search_index
from pipeline.people.index import FaceIndex
from tests.test_people_scale import _faces, _people, _table, _write


def test_people_job_writes_the_index_a_replica_loads(ray_cluster, tmp_path):
    x, _ = _faces(40, 12, seed=5)
    table, out = _table(tmp_path, x), str(tmp_path / "people")
    summary = job.cluster_table(table, out, sheet_people=1)
    manifest = json.loads((tmp_path / "people" / "_index" / "index.json").read_text())
    assert manifest["faces"] == len(x) and manifest["kind"] == "IDMap,Flat"
    assert "_index" in summary.index and sum(s["rows"] for s in manifest["shards"]) == len(x)
    index = FaceIndex.from_uris(table, out)
    assert "_index" in index.source and len(index) == len(x)
    got = _people(out).set_index(["image_uri", "face_index"]).person
    for row in (0, 137, 479):
        (uri, fi, sim, person), *rest = index.search(x[row], k=5)[0]
        assert uri == f"photo{row:06d}.jpg" and fi == 0 and sim == pytest.approx(1.0, abs=1e-5)
        assert person == got[(uri, 0)]          # the person the people table gives that face
        assert all(p == person for *_, p in rest)   # its nearest faces: the same person (noise 0.02)


def test_no_search_index_removes_an_older_one(ray_cluster, tmp_path):
    x, _ = _faces(10, 8, seed=8)
    table, out = _table(tmp_path, x, files=1), str(tmp_path / "people")
    job.cluster_table(table, out, sheet_people=1)
    assert (tmp_path / "people" / "_index" / "index.json").exists()
    summary = job.cluster_table(table, out, sheet_people=1, search_index="none")
    assert not (tmp_path / "people" / "_index").exists() and summary.index == ""
    assert "built from the table" in FaceIndex.from_uris(table, out).source


def test_resume_rewrites_the_index_and_a_stale_one_is_not_used(ray_cluster, tmp_path):
    x, _ = _faces(20, 10, seed=6)
    root, out = tmp_path / "table", str(tmp_path / "people")
    _write(root, "part-0.parquet", x[:150], 0)
    job.cluster_table(str(root), out, sheet_people=1)
    first = json.loads((tmp_path / "people" / "_index" / "index.json").read_text())["run"]
    _write(root, "part-1.parquet", x[150:], 150)
    job.cluster_table(str(root), out, resume=True, sheet_people=1)
    manifest = json.loads((tmp_path / "people" / "_index" / "index.json").read_text())
    assert manifest["faces"] == len(x) and manifest["run"] != first
    files = [p.name for p in (tmp_path / "people" / "_index").iterdir()]
    assert not [f for f in files if f.startswith(first)]          # the older run's shards are gone
    assert len(FaceIndex.from_uris(str(root), out)) == len(x)

    manifest["people_files"] = ["part-gone-00000.parquet"]         # written for other people files
    (tmp_path / "people" / "_index" / "index.json").write_text(json.dumps(manifest))
    loaded, why = search_index.open_index(out)
    assert loaded is None and "other people files" in why
    rebuilt = FaceIndex.from_uris(str(root), out)                  # small table: built here instead
    assert "built from the table" in rebuilt.source and len(rebuilt) == len(x)
    with pytest.raises(people.PeopleError, match="cluster_faces.py"):
        FaceIndex.from_uris(str(root), out, small=100)             # big: a reason, not a 10^7 build


@pytest.mark.parametrize("codec, least", [("fp16", 0.97), ("sq8", 0.85)])
def test_ivf_index_finds_what_exact_search_finds(ray_cluster, tmp_path, codec, least):
    """An IVF index (forced on 4,000 faces) built as Ray tasks over 4 table files: ids map
    to the right rows across shards, and recall@10 against exact search is high."""
    x, _ = _faces(200, 20, seed=7, noise=0.05)
    table, out = _table(tmp_path, x, files=4), str(tmp_path / "people")
    s = search_index.build_from_table(table, out, codec, exact_max=1000)
    assert s.kind == search_index.kind_for(len(x), codec, 1000) and s.shards == 4 and s.faces == len(x)
    assert s.kind.startswith(f"IVF{search_index.lists_for(len(x))},")
    index = FaceIndex.from_uris(table, out)
    assert faiss.extract_index_ivf(index.index).nprobe == s.nprobe
    manifest = json.loads((tmp_path / "people" / "_index" / "index.json").read_text())
    assert sum(manifest["list_sizes"]) == index.index.ntotal == len(x)      # lists sized once, then filled
    rows = np.random.default_rng(0).choice(len(x), 200, replace=False)
    exact = np.argsort(-(x[rows] @ x.T), axis=1)[:, :10]
    hits = index.search(x[rows], k=10)
    found = [[int(u[5:11]) for u, *_ in h] for h in hits]
    assert all(f[0] == r for f, r in zip(found, rows))              # each face finds itself first
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= least, recall
    assert all(p is None for h in hits for *_, p in h)              # no people job: person null
