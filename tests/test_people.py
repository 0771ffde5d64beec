"""cluster_faces.py on real photos: people match the true identities, ids survive --resume,
misuse exits 2.  The table and people come from conftest's ``people_run`` (shared with
test_naming.py): identities (+ unknown) photos scored once, in two steps (a first part,
then the rest with --resume), and clustered before and after."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.people import bcubed
from conftest import labelled
from jobs import cluster_faces
from pipeline import knn, people



def test_people_match_true_identities(people_run, tmp_path):
    table, _, _ = people_run
    out = str(tmp_path / "fresh")
    assert cluster_faces.main(["--table", table, "--output", out]) == 0
    p = labelled(table, out)
    prec, rec, f = bcubed(p.truth.to_numpy(), p.person.to_numpy())
    assert f >= 0.95 and prec >= 0.95, (prec, rec, f)
    # each of the 42 identities is mostly one person
    top_share = p.groupby("truth").person.agg(lambda s: s.value_counts().iloc[0] / len(s))
    assert (top_share[top_share.index.isin(p.truth[p.truth.map(p.truth.value_counts()) >= 20])] >= 0.9).all()


def test_output_contract(people_run):
    table, _, out = people_run
    df = pd.read_parquet(out)    # side files are skipped by the reader
    assert list(df.columns) == ["image_uri", "face_index", "person", "person_size", "similarity", "name"]
    schema = pq.read_schema(next(p for p in __import__("glob").glob(f"{out}/*.parquet")))
    assert schema.field("face_index").type == pa.int32() and schema.field("person_size").type == pa.int32()
    assert schema.field("similarity").type == pa.float32()
    faces = pd.read_parquet(table).query("status == 'ok'")
    assert len(df) == len(faces) and not df.duplicated(["image_uri", "face_index"]).any()
    assert (df.person_size == df.groupby("person").person.transform("size")).all()
    assert df.person.str.fullmatch(r"p\d{6,}").all() and (df.similarity <= 1.0001).all()
    assert (df.person_size == 1).any()                 # lone background faces are people of one
    meta = json.loads(open(f"{out}/_people.json").read())
    assert meta["source_table"] == table and meta["threshold"] == people.THRESHOLD and meta["faces"] == len(df)
    sheet = open(f"{out}/_people.html").read()
    assert sheet.count("data:image/jpeg;base64,") >= 40 and "p000001" in sheet


def test_resume_keeps_ids(people_run):
    _, first, out = people_run
    before = pd.read_parquet(first)
    after = pd.read_parquet(out)
    both = before.merge(after, on=["image_uri", "face_index"], suffixes=("_before", "_after"))
    assert len(both) == len(before)
    assert (both.person_before == both.person_after).all()
    new = after.merge(before[["image_uri", "face_index"]], how="left", indicator=True).query("_merge == 'left_only'")
    meta = json.loads(open(f"{out}/_people.json").read())
    assert meta["resumed"] and meta["joined"] > 0 and meta["new_people"] > 0
    # the new photos of people seen in the first part joined their existing person
    seen = set(before.image_uri.str.split("/").str[-2])
    new_known = new[new.image_uri.str.split("/").str[-2].isin(seen) & ~new.image_uri.str.contains("/unknown/")]
    assert new_known.person.isin(set(before.person)).mean() >= 0.9


def test_face_index_and_people_list(people_run):
    table, _, out = people_run
    index = people.FaceIndex.from_uris(table, out)
    faces = people.read_faces(table)
    hits = index.search(faces.embedding[:3], k=5)
    assert len(hits) == 3 and all(len(h) == 5 for h in hits)
    uri, idx, sim, person = hits[0][0]
    assert uri == faces.image_uri[0].as_py() and idx == faces.face_index[0] and sim > 0.999
    assert person is not None and person.startswith("p")
    listed = people.list_people(out, limit=5, offset=0)
    sizes = [p["size"] for p in listed]
    assert sizes == sorted(sizes, reverse=True) and listed[0]["person"] == "p000001"
    assert people.list_people(out, limit=2, offset=1) == listed[1:3]


def test_missing_embeddings_and_empty_table(tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "status": ["ok"], "face_index": pa.array([0], pa.int32())}),
                   bare / "part-0.parquet")
    assert cluster_faces.main(["--table", str(bare), "--output", str(tmp_path / "o")]) == 2
    assert "no column embedding" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "status": ["no_face"], "face_index": pa.array([None], pa.int32()),
                             "embedding": pa.array([None], pa.list_(pa.float32(), 128))}), empty / "part-0.parquet")
    assert cluster_faces.main(["--table", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "no faces" in capsys.readouterr().err
    assert cluster_faces.main(["--table", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2


def test_sharded_knn_equals_one_index():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s1, i1, _ = knn.knn_graph(x, 8)
    s2, i2, _ = knn.knn_graph(x, 8, query_rows=700, db_rows=1100)
    assert (i1 == i2).mean() > 0.999 and np.allclose(s1, s2, atol=1e-5)
    assert (i1[:, 0] == np.arange(len(x))).all()


def test_index_bytes_are_faiss_own_serialisation():
    """knn.to_bytes writes into an array of exactly the index's size: the same bytes as
    faiss.serialize_index, and an index that searches the same once read back."""
    x = np.random.default_rng(1).normal(size=(2000, 128)).astype(np.float32)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(128))
    index.add_with_ids(x, np.arange(2000, dtype=np.int64) * 3)
    data = knn.to_bytes(index)
    assert data.dtype == np.uint8 and np.array_equal(data, faiss.serialize_index(index))
    assert np.array_equal(knn.from_bytes(data).search(x[:5], 3)[1], index.search(x[:5], 3)[1])


def test_preassigned_lists_search_what_a_plain_ivf_search_finds(ray_cluster):
    """An IVF table over several index groups: each query shard's lists are assigned once
    (knn._assign) and every group scans just those; the same top-k as a plain search of
    each group, and the grid's merge finds each face itself first and its true neighbours."""
    rng = np.random.default_rng(4)
    c = rng.normal(size=(300, 128)).astype(np.float32)
    x = c[np.repeat(np.arange(300), 20)] + 0.1 * rng.normal(size=(6000, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mask = np.ones(1500, bool)
    trained = knn._train(64, x[::5])
    group = knn._group_index(trained, [0], x[:1500], mask)
    plain = knn._search_masked(group, x[1500:3000], mask, 10, 8)
    pre = knn._search_masked(group, x[1500:3000], mask, 10, 8, *knn._assign(trained, x[1500:3000], mask, 8))
    assert np.array_equal(plain[1], pre[1]) and np.allclose(plain[0], pre[0], atol=1e-6)

    import ray

    def as_is(s, i, rows):       # nested: pickled by value (workers cannot import this test module)
        return s, i, rows

    xs = [ray.put(x[i:i + 1500]) for i in range(0, 6000, 1500)]
    masks = [ray.put(np.ones(1500, bool)) for _ in xs]
    refs, note = knn.topk_refs(xs, masks, np.arange(0, 6001, 1500), 10, as_is, exact_max=1000, db_rows=3000,
                               nprobe=8)
    assert "IVF" in note and "2 index task(s)" in note
    got = np.concatenate([ray.get(r)[1] for r in refs])
    assert (got[:, 0] == np.arange(6000)).all()
    exact = np.argsort(-(x @ x.T), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]) >= 0.95


def test_threshold_from_verification_statistics():
    assert people.THRESHOLD == pytest.approx(0.939, abs=1e-3)
    assert people.odds_threshold(1.0) == pytest.approx(0.905, abs=2e-3)   # ≈ dlib's 0.6 at raw norm 1.43


def test_cluster_graph_with_a_component_bigger_than_a_batch():
    """Batches are numbered densely even when one component outgrows a batch (at 10^6
    synthetic faces the gap left an empty batch and the job failed)."""
    a, b = [], []
    for start, n in ((0, 3), (3, 12), (15, 3)):  # three chains: 3, 12 and 3 faces
        a += list(range(start, start + n - 1))
        b += list(range(start + 1, start + n))
    labels = people.cluster_graph(18, np.array(a), np.array(b), np.ones(len(a)), batch_nodes=5)
    assert len(labels) == 18 and labels.min() == 0
    assert len(set(labels[:3])) == 1 and len(set(labels[15:])) == 1   # small chains stay whole
    assert not set(labels[:3]) & set(labels[3:15]) and not set(labels[15:]) & set(labels[3:15])
