"""The people job as Ray tasks (pipeline/people/spread.py): the same people as the
single-process clustering, big components re-split, a killed clustering task retried
with no face lost or doubled, ``--resume`` joining new faces through the same tasks."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.people import bcubed
from pipeline import people
from pipeline.people import job, spread
from pipeline.people.graph import split_big


def _faces(n_people: int, per: int, seed: int, noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n_people, 128)).astype(np.float32)
    lab = np.repeat(np.arange(n_people), per)
    x = c[lab] / np.linalg.norm(c[lab], axis=1, keepdims=True) + noise * rng.normal(size=(len(lab), 128))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), lab


def _write(folder, name: str, x: np.ndarray, first: int) -> None:
    folder.mkdir(exist_ok=True)
    uris = [f"photo{i:06d}.jpg" for i in range(first, first + len(x))]
    pq.write_table(pa.table({"image_uri": uris, "status": ["ok"] * len(x),
                             "face_index": pa.array(np.zeros(len(x), np.int32)),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 128)}),
                   folder / name)


def _table(tmp_path, x: np.ndarray, files: int = 3):
    root = tmp_path / "table"
    for i, part in enumerate(np.array_split(np.arange(len(x)), files)):
        _write(root, f"part-{i}.parquet", x[part], int(part[0]))
    return str(root)


def _people(out: str) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values(["image_uri", "face_index"]).reset_index(drop=True)


def test_same_people_as_single_process(people_run, tmp_path):
    """On the real photos, the task pipeline finds the people one process finds."""
    table, _, _ = people_run
    out = str(tmp_path / "spread")
    job.cluster_table(table, out, sheet_people=2)
    faces = people.read_faces(table, with_bbox=True)
    linkable = faces.bbox[:, 2:].min(1) >= job.MIN_LINK_PX
    single = people.cluster(faces.embedding[linkable])
    got = _people(out)
    assert len(got) == len(faces) and not got.duplicated(["image_uri", "face_index"]).any()
    assert (got.image_uri.to_numpy() == np.asarray(faces.image_uri.to_pylist())).all()
    p, r, f = bcubed(single, got.person.to_numpy()[linkable])
    assert f >= 0.995, (p, r, f)
    assert got.person.str.fullmatch(r"p\d{6,}").all()
    assert (got.person_size == got.groupby("person").person.transform("size")).all()


def test_component_over_the_cap_is_split(ray_cluster, tmp_path):
    """One person of 60 faces is a component over a cap of 25: it is re-split by raising the
    threshold inside it, no piece over the cap reaches Infomap, and no face is lost."""
    x, _ = _faces(6, 60, seed=1)
    out = str(tmp_path / "out")
    job.cluster_table(_table(tmp_path, x), out, cap=25, sheet_people=1)
    got = _people(out)
    meta = json.loads(open(f"{out}/_people.json").read())
    assert meta["largest_component"] == 60 and meta["component_cap"] == 25
    assert len(got) == len(x) and got.person_size.max() <= 25


def test_split_big_keeps_small_components_whole():
    a = np.r_[np.arange(9), 20]
    b = np.r_[np.arange(1, 10), 21]
    w = np.r_[np.linspace(0.94, 0.99, 9), 0.94].astype(np.float32)
    keep = split_big(30, a, b, w, cap=4, threshold=0.939)
    assert keep[-1]                                   # the 2-node component is untouched
    from pipeline.people.clustering import components
    sizes = np.bincount(components(30, a[keep], b[keep]))
    assert sizes.max() <= 4


def test_killed_clustering_task_is_retried(ray_cluster, tmp_path):
    """A clustering task whose worker dies mid-run runs again: the same people, every face
    exactly once (part files have fixed names: a retried write replaces, never adds)."""
    x, truth = _faces(40, 12, seed=2)
    table = _table(tmp_path, x)
    marker = tmp_path / "crashed"
    job.cluster_table(table, str(tmp_path / "crash"), crash_marker=str(marker), sheet_people=1)
    job.cluster_table(table, str(tmp_path / "calm"), sheet_people=1)
    assert marker.exists()                            # the worker did die
    crashed, calm = _people(str(tmp_path / "crash")), _people(str(tmp_path / "calm"))
    assert len(crashed) == len(x) and not crashed.duplicated(["image_uri", "face_index"]).any()
    assert (crashed.person == calm.person).all()
    assert bcubed(truth, crashed.person.to_numpy())[2] == 1.0


def test_resume_joins_new_faces_through_the_tasks(ray_cluster, tmp_path):
    """New faces of known people join them (ids kept); new people get new ids."""
    x, truth = _faces(30, 10, seed=3)
    old = np.flatnonzero(np.arange(len(x)) % 10 < 7)[: 7 * 25]     # 25 people, 7 faces each
    root = tmp_path / "table"
    _write(root, "part-0.parquet", x[old], 0)
    out = str(tmp_path / "out")
    job.cluster_table(str(root), out, sheet_people=1)
    before = _people(out)
    new = np.setdiff1d(np.arange(len(x)), old)                   # 3 more each of the 25 + 5 new people
    _write(root, "part-1.parquet", x[new], 10_000)
    summary = job.cluster_table(str(root), out, resume=True, sheet_people=1)
    after = _people(out)
    assert len(after) == len(x) and not after.duplicated(["image_uri", "face_index"]).any()
    both = before.merge(after, on=["image_uri", "face_index"], suffixes=("_before", "_after"))
    assert len(both) == len(old) and (both.person_before == both.person_after).all()
    assert summary.kept == len(old) and summary.joined == 3 * 25 and summary.new_people == 5
    uri_truth = dict(zip([f"photo{i:06d}.jpg" for i in range(len(old))], truth[old]))
    uri_truth.update(zip([f"photo{10_000 + i:06d}.jpg" for i in range(len(new))], truth[new]))
    assert bcubed(after.image_uri.map(uri_truth).to_numpy(), after.person.to_numpy())[2] == 1.0
    assert not list((tmp_path / "out").glob("_work/*"))         # the side folder is cleaned up


def test_labels_on_shards_equal_constrain_on_every_face(ray_cluster, tmp_path):
    """``--labels`` gathers only the people holding a decided face (name_shards.py) and gives
    what ``names.constrain`` over every face, renumbered largest first, gives — here with a
    split, a merge and a `not` face that moves to an untouched look-alike (cos 0.97)."""
    import datetime as dt

    from pipeline import labels
    from pipeline.people.ids import person_numbers, ranked_ids
    from pipeline.people.names import constrain

    rng = np.random.default_rng(7)
    c = rng.normal(size=(30, 128))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    side = c[1] - (c[1] @ c[0]) * c[0]
    c[1] = 0.97 * c[0] + np.sqrt(1 - 0.97 ** 2) * side / np.linalg.norm(side)
    truth = np.repeat(np.arange(30), 8)
    x = c[truth] + 0.02 * rng.normal(size=(len(truth), 128))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    table = _table(tmp_path, x, files=4)

    def faces(person: int, *which: int) -> list[tuple[str, int]]:
        return [(f"photo{r:06d}.jpg", 0) for r in np.flatnonzero(truth == person)[list(which)]]

    acts = [("name", "Ann", faces(0, 0, 1)), ("not", "Ann", faces(0, 2)),          # leaves for person 1
            ("name", "Bo", faces(3, 0) + faces(4, 0, 1)),                           # 3 and 4 merge
            ("name", "Cy", faces(5, 0, 1)), ("name", "Di", faces(5, 2, 3, 4))]      # 5 splits
    state = labels.replay(pa.concat_tables([labels.decisions(a, n, f, at=dt.datetime(2026, 1, 1, 0, m, tzinfo=dt.timezone.utc))
                                            for m, (a, n, f) in enumerate(acts)]))
    job.cluster_table(table, str(tmp_path / "plain"), sheet_people=1, search_index="none")
    plain = _people(str(tmp_path / "plain"))
    want, rep = constrain(person_numbers(pa.array(plain.person)), pa.array(plain.image_uri),
                          np.zeros(len(plain), np.int32), x, state, job.THRESHOLD)
    _, lab = np.unique(want, return_inverse=True)
    want = ranked_ids(lab)[lab]
    summary = job.cluster_table(table, str(tmp_path / "named"), sheet_people=1, label_state=state,
                                search_index="none")
    named = _people(str(tmp_path / "named"))
    assert (person_numbers(pa.array(named.person)) == want).all()
    assert vars(summary.names) == vars(rep) and rep.split == 1 and rep.merged == 1 and rep.rejected_out == 1
    moved = named.image_uri == faces(0, 2)[0][0]
    assert named.person[moved].item() == named.person[named.image_uri == faces(1, 0)[0][0]].item()
    assert set(named.name.dropna()) == {"Ann", "Bo", "Cy", "Di"}


def test_check_table_reads_no_faces(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "face_index": pa.array([0], pa.int32())}), bare / "p.parquet")
    import pytest
    with pytest.raises(people.PeopleError, match="no column embedding"):
        spread.check_table(str(bare))
