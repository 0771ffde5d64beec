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


def _gone(uris: list[str]) -> "pa.Table":
    import pyarrow as pa

    return pa.table({"image_uri": uris, "face_index": pa.array(np.zeros(len(uris), np.int32)),
                     "_gone": np.ones(len(uris), bool)})


def test_forget_scrubs_people_parts_and_index_in_tasks(ray_cluster, tmp_path):
    """``--forget``'s people step (people/scrub.py) over 3 part files: the forgotten faces'
    rows go, every part holding their persons is rewritten with the sizes counted again,
    the json and sheet follow; the index loses their vectors and keys yet stays in use."""
    from pipeline.people.scrub import scrub_people

    x, _ = _faces(30, 10, seed=9)
    table, out = _table(tmp_path, x, files=4), str(tmp_path / "people")   # parts of photos 0-74, 75-149, …
    job.cluster_table(table, out, sheet_people=3)
    (tmp_path / "people" / "_people.html").unlink()
    before = _people(out).set_index("image_uri")
    big, other = before.person["photo000070.jpg"], before.person["photo000299.jpg"]   # parts 0+1, part 3
    lost = list(before.index[before.person == big]) + ["photo000299.jpg"]
    old_files = people.parquet_files(out)[1]
    s = scrub_people(out, _gone(lost), "nobody")
    assert s.removed == len(lost) and s.kept == len(x) - len(lost) and s.files == 4 and s.rewritten == 3
    assert set(old_files) - set(s.old_files) == set() and len(set(old_files) & set(s.new_files)) == 1  # part 2 kept
    before = before.reset_index()
    after = _people(out)
    want = before[~before.image_uri.isin(lost)].reset_index(drop=True)
    assert after[["image_uri", "face_index", "person"]].equals(want[["image_uri", "face_index", "person"]])
    assert (after.person_size == after.groupby("person").person.transform("size")).all()   # sizes counted again
    meta = json.loads((tmp_path / "people" / "_people.json").read_text())
    assert meta["faces"] == len(after) and meta["people"] == after.person.nunique()
    sizes = after.groupby("person").size()
    assert meta["largest"] == sizes.max() and meta["people_2plus"] == (sizes >= 2).sum()
    assert meta["single_faces"] == (sizes == 1).sum()
    assert meta["forgotten_faces"] == len(lost) and (tmp_path / "people" / "_people.html").exists()
    line = search_index.scrub_index(out, _gone(lost), s.new_files, old_files)
    assert f"{len(lost)} faces removed" in line
    index = FaceIndex.from_uris(table, out)
    assert "_index" in index.source and index.index.ntotal == len(after)
    rows = [int(u[5:11]) for u in lost] + [int(u[5:11]) for u in after.image_uri[:20]]
    hits = index.search(x[rows], k=20)
    assert not {u for h in hits for u, *_ in h} & set(lost)       # never found again
    assert all(h[0][0] == f"photo{r:06d}.jpg" for h, r in zip(hits[len(lost):], rows[len(lost):]))
    manifest = json.loads((tmp_path / "people" / "_index" / "index.json").read_text())
    named = {"index.json"} | {sh[k] for sh in manifest["shards"] for k in ("index", "keys")}
    assert {p.name for p in (tmp_path / "people" / "_index").iterdir()} == named       # replaced shards' files gone
    assert sum("-forget-" in sh["index"] for sh in manifest["shards"]) == 3            # shard 2 held none of them


def test_forget_scrubs_an_ivf_index(ray_cluster, tmp_path):
    """IVF lists keep the manifest's sizes after a scrub (the replica sizes lists from it)."""
    x, _ = _faces(200, 20, seed=3, noise=0.05)
    table, out = _table(tmp_path, x, files=4), str(tmp_path / "people")
    search_index.build_from_table(table, out, "fp16", exact_max=1000)
    lost = [f"photo{i:06d}.jpg" for i in range(0, len(x), 7)]
    line = search_index.scrub_index(out, _gone(lost), [], [])
    assert f"{len(lost)} faces removed" in line
    loaded, why = search_index.open_index(out)
    assert loaded is not None, why
    assert loaded.index.ntotal == len(x) - len(lost) == loaded.manifest["faces"]
    keep = np.setdiff1d(np.arange(len(x)), np.arange(0, len(x), 7))[:100]
    hits = FaceIndex.from_uris(table, out).search(x[keep], k=10)
    assert all(h[0][0] == f"photo{r:06d}.jpg" for h, r in zip(hits, keep))
    assert not {u for h in hits for u, *_ in h} & set(lost)
