"""Names on people and faces (pipeline/people/names.py) and the jobs that use them."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa

from pipeline import labels
from pipeline.people.names import face_names, person_names

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def state_of(*acts: tuple[str, str, list[tuple[str, int]]]) -> labels.LabelState:
    rows = [labels.decisions(a, n, f, at=T0 + dt.timedelta(minutes=m)) for m, (a, n, f) in enumerate(acts)]
    return labels.replay(pa.concat_tables(rows))


PEOPLE = pa.table({"image_uri": ["a", "b", "c", "d", "e", "f"], "face_index": pa.array([0, 0, 0, 0, 0, 1], pa.int32()),
                   "person": ["p1", "p1", "p1", "p2", "p2", "p3"], "person_size": pa.array([3, 3, 3, 2, 2, 1], pa.int32()),
                   "similarity": pa.array([1.0] * 6, pa.float32())})


def test_person_names_majority_not_and_forget():
    s = state_of(("name", "Ada", [("a", 0), ("b", 0)]), ("name", "Bob", [("c", 0)]),
                 ("name", "Cy", [("d", 0)]), ("name", "Dee", [("e", 0)]),
                 ("name", "Eve", [("zzz", 0)]))                      # a face of no person
    assert person_names(PEOPLE, s) == {"p1": "Ada", "p2": "Cy"}       # p2: a tie goes to the first in sort order
    s = state_of(("name", "Ada", [("a", 0), ("b", 0)]), ("name", "Bob", [("c", 0)]), ("not", "Ada", [("a", 0), ("b", 0)]))
    assert person_names(PEOPLE, s) == {"p1": "Bob"}                   # `not` Ada: those faces no longer count
    s = state_of(("name", "Ada", [("a", 0), ("b", 0)]), ("forget", "Ada", []))
    assert person_names(PEOPLE, s) == {}


def test_face_names_person_own_and_rejected():
    s = state_of(("name", "Ada", [("a", 0), ("b", 0)]), ("name", "Bob", [("c", 0)]),
                 ("name", "Zed", [("g", 0)]), ("not", "Ada", [("d", 0)]))
    faces = pa.table({"image_uri": ["a", "c", "d", "e", "f", "g", "h"],
                      "face_index": pa.array([0, 0, 0, 0, 1, 0, None], pa.int32()),
                      "bbox": pa.array([{"x": 1.0}] * 7, pa.struct([("x", pa.float32())]))})
    people = PEOPLE.set_column(2, "person", pa.array(["p1", "p1", "p1", "p1", "p1", "p3"]))
    out = face_names(faces, people, s)
    assert out.column_names == ["image_uri", "face_index", "bbox", "person", "name"]
    assert out.column("person").to_pylist() == ["p1", "p1", "p1", "p1", "p3", None, None]
    # c keeps its own Bob, d is `not` Ada, g has no person but its own name, h is a photo row
    assert out.column("name").to_pylist() == ["Ada", "Bob", None, "Ada", None, "Zed", None]
    alone = face_names(faces, None, s)
    assert alone.column("person").null_count == 7
    assert alone.column("name").to_pylist() == ["Ada", "Bob", None, None, None, "Zed", None]
    again = face_names(out, people, s)                               # columns replaced, not doubled
    assert again.column_names == out.column_names and again.equals(out)


def test_constrain_split_merge_and_not():
    import numpy as np

    from pipeline.people.names import constrain

    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=128) for _ in range(3))
    x = np.stack([a, a, a, b, b, b, a, c, c]) + 0.05 * rng.normal(size=(9, 128))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    uris = pa.array([f"{i}.jpg" for i in range(9)])
    # person 1 holds Ada (0, 1) and Bob (3) look-alikes; person 2 is more Ada; person 3 is c
    nums = np.array([1, 1, 1, 1, 1, 1, 2, 3, 3])
    s = state_of(("name", "Ada", [("0.jpg", 0), ("1.jpg", 0), ("6.jpg", 0)]), ("name", "Bob", [("3.jpg", 0)]),
                 ("not", "Ada", [("2.jpg", 0)]))
    out, rep = constrain(nums, uris, np.zeros(9, np.int32), x, s, threshold=0.9)
    ada, bob = out[0], out[3]
    assert ada != bob and out[1] == ada and out[6] == ada           # Ada's faces in one person
    assert out[4] == out[5] == bob                                   # the unnamed b faces went with Bob
    assert out[2] != ada and out[7] == out[8] == 3                   # `not Ada` left; c untouched
    assert rep.split == 1 and rep.merged == 1 and rep.rejected_out == 1 and rep.named_faces == 4


# ---------------------------------------------------------------- the jobs, on real photos


import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from conftest import labelled  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def job(module: str, *argv: str) -> tuple[int, str]:
    """A job's ``main`` as a user runs it, in this process (joins the session's Ray): exit code, stdout."""
    import importlib

    main = importlib.import_module(f"jobs.{module}").main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(argv))
    return code, buf.getvalue()


def ok(module: str, *argv: str) -> str:
    code, out = job(module, *argv)
    assert code == 0, out[-3000:]
    return out


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def named(people_run, tmp_path_factory):
    """Two people named through the CSV (train_classifier --layout people --labels), one of
    their faces marked `not`, then a fresh cluster_faces --labels and a label_table."""
    table, first, people = people_run
    root = tmp_path_factory.mktemp("names")
    kept = labelled(table, people)
    by_person = kept.groupby("person").truth
    share = by_person.agg(lambda s: s.value_counts(normalize=True).iloc[0])
    major = by_person.agg(lambda s: s.value_counts().index[0])
    size = by_person.size()
    pick = size[(share >= 0.95) & ~major.str.contains("unknown")].sort_values(ascending=False)
    chosen = []
    for p in pick.index:                      # the two largest clean people of two identities
        if major[p] not in {major[c] for c in chosen} and not kept[kept.person == p].image_uri.str.contains(
                "/unknown/").any():
            chosen.append(p)
        if len(chosen) == 2:
            break
    names = pd.DataFrame({"person": chosen, "name": [f"{major[p].replace('_', ' ')} (named)" for p in chosen]})
    names.to_csv(root / "names.csv", index=False)
    log = str(root / "labels")
    bundle = root / "bundle"
    ok("train_classifier", "--layout", "people", "--data", people, "--names", str(root / "names.csv"),
       "--labels", log, "--output", str(bundle), "--workers", "1", "--epochs", "15", "--no-report")
    state = labels.load(log)
    everyone = pd.read_parquet(people)
    a_faces = everyone[everyone.person == chosen[0]]
    assert len(state.named) == len(everyone[everyone.person.isin(chosen)])     # every face of both, by face
    rejected = a_faces.sort_values("similarity").iloc[-1]     # A's most typical face: clustering puts it with A
    labels.append(log, labels.decisions("not", names.name[0], [(rejected.image_uri, int(rejected.face_index))],
                                        author="test", source="review"))
    fresh = str(root / "people")
    out = ok("cluster_faces", "--table", table, "--output", fresh, "--labels", log)
    labelled_out = str(root / "labelled")
    lt = ok("label_table", "--table", table, "--people", fresh, "--labels", log, "--output", labelled_out)
    return SimpleNamespace(root=root, table=table, first=first, people=people, log=log, names=names, chosen=chosen,
                           rejected=(rejected.image_uri, int(rejected.face_index)), bundle=bundle, fresh=fresh,
                           cluster_out=out, labelled=labelled_out, label_out=lt, everyone=everyone)


def test_csv_names_and_not_survive_a_fresh_clustering(named):
    new = pd.read_parquet(named.fresh)
    assert "name" in new.columns
    for person, name in zip(named.names.person, named.names.name):
        faces = named.everyone[named.everyone.person == person][["image_uri", "face_index"]]
        got = new.merge(faces, on=["image_uri", "face_index"])
        got = got[~((got.image_uri == named.rejected[0]) & (got.face_index == named.rejected[1]))]
        assert got.person.nunique() == 1, name                      # named alike: one person
        assert (got.name == name).all()                              # it carries the name
    a = named.names.name[0]
    row = new[(new.image_uri == named.rejected[0]) & (new.face_index == named.rejected[1])].iloc[0]
    assert row["name"] != a and row.person not in set(new[new.name == a].person)   # `not A`: out of A's person
    meta = json.loads((Path(named.fresh) / "_people.json").read_text())
    assert set(meta["names"]) == set(named.names.name) and meta["labels"]["rejected_out"] >= 1
    assert "names:" in named.cluster_out and "split" in named.cluster_out
    sheet = (Path(named.fresh) / "_people.html").read_text()
    assert all(n in sheet for n in named.names.name)


def test_label_table_names_every_face_of_a_named_person(named):
    t = pd.read_parquet(named.labelled)
    src = pd.read_parquet(named.table)
    assert len(t) == len(src) and list(t.columns[-2:]) == ["person", "name"]
    people = pd.read_parquet(named.fresh)
    m = t.merge(people[["image_uri", "face_index", "name"]], on=["image_uri", "face_index"], suffixes=("", "_p"))
    rej = (m.image_uri == named.rejected[0]) & (m.face_index == named.rejected[1])
    assert (m[~rej].name.fillna("") == m[~rej].name_p.fillna("")).all()
    assert m[rej].name.isna().all()
    assert "faces named" in named.label_out and "rows/s" in named.label_out


def test_resume_carries_the_names_to_new_photos(named, tmp_path):
    people = str(tmp_path / "people")
    shutil.copytree(named.first, people)                 # clustered before the rest of the photos came
    ok("cluster_faces", "--table", named.table, "--output", people, "--resume", "--labels", named.log)
    after = pd.read_parquet(people)
    before = pd.read_parquet(named.first)
    truth = labelled(named.table, people)
    key = ["image_uri", "face_index"]
    new = truth.merge(before[key], on=key, how="left", indicator=True)
    new = new[new._merge == "left_only"]
    for person, name in zip(named.names.person, named.names.name):
        ident = named.everyone[named.everyone.person == person].image_uri.str.split("/").str[-2].mode()[0]
        mine = new[new.truth == ident]
        if len(mine) < 3:
            continue
        share = (mine.merge(after[key + ["name"]], on=key).name == name).mean()
        print(f"METRIC resume: {len(mine)} new photos of {name}: {share:.0%} carry the name")
        assert share >= 0.8
    ids = before.merge(after, on=key, suffixes=("", "_a"))
    assert (ids.person == ids.person_a).mean() > 0.95      # ids stay on --resume


def test_label_table_model_equals_score_directory_model(named, people, tmp_path):
    photos = tmp_path / "photos"
    uris = named.everyone[named.everyone.person.isin(named.chosen)].image_uri.drop_duplicates().head(12).tolist()
    for name, files in list(people.items())[:3]:
        uris += [str(f) for f in files[-3:]]
    for u in dict.fromkeys(uris):
        d = photos / Path(u).parent.name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(u, d)
    scored = str(tmp_path / "scored")
    ok("score_directory", "--input", str(photos), "--output", scored, "--model", str(named.bundle), "--no-attributes")
    out = str(tmp_path / "labelled")
    text = ok("label_table", "--table", scored, "--model", str(named.bundle), "--output", out)
    a = pd.read_parquet(scored).sort_values(["image_uri", "face_index"]).reset_index(drop=True)
    b = pd.read_parquet(out).sort_values(["image_uri", "face_index"]).reset_index(drop=True)
    faces = a.face_index.notna()
    assert faces.sum() >= 20 and (a.image_uri == b.image_uri).all()
    assert (a.identity[faces] == b.identity[faces]).all()
    assert np.allclose(a.identity_score[faces], b.identity_score[faces], atol=1e-5)
    assert (b.model_version == a.model_version).all() and "no photo read" in text
    assert set(a.identity[faces]) - {"unknown"}                          # some faces named by the model


def test_layout_labels_trains_as_well_as_layout_people(named, tmp_path):
    """The same names given as a CSV (people layout) and through the log (labels layout):
    held-out photos of the two people, scored by each bundle, are named as well."""
    held = named.everyone[named.everyone.person.isin(named.chosen)].drop_duplicates("image_uri").tail(6)
    key = ["image_uri", "face_index"]
    # both bundles train without the held-out photos: a copy of the table and people without them
    table = tmp_path / "table"
    table.mkdir()
    src = pd.read_parquet(named.table)
    keep = ~src.image_uri.isin(set(held.image_uri))
    pq.write_table(pa.Table.from_pandas(src[keep], preserve_index=False), table / "part-0.parquet")
    people = tmp_path / "people"
    people.mkdir()
    pq.write_table(pa.Table.from_pandas(named.everyone[~named.everyone.image_uri.isin(set(held.image_uri))],
                                        preserve_index=False), people / "part-0.parquet")
    meta = json.loads((Path(named.people) / "_people.json").read_text())
    (people / "_people.json").write_text(json.dumps({**meta, "source_table": str(table)}))
    log = str(tmp_path / "labels")
    by_people, by_labels = tmp_path / "b_people", tmp_path / "b_labels"
    ok("train_classifier", "--layout", "people", "--data", str(people), "--names", str(named.root / "names.csv"),
       "--labels", log, "--output", str(by_people), "--workers", "1", "--epochs", "15", "--no-report")
    out = ok("train_classifier", "--layout", "labels", "--data", str(table), "--labels", log,
             "--output", str(by_labels), "--workers", "1", "--epochs", "15", "--no-report")
    assert "(none computed)" in out
    assert json.loads((by_labels / "model.json").read_text())["data"]["layout"] == "labels"
    photos = tmp_path / "photos"
    photos.mkdir()
    for u in held.image_uri:
        shutil.copy(u, photos / Path(u).name)
    truth = dict(zip(named.names.person, named.names.name))
    right = {}
    for b in (by_people, by_labels):
        scored = str(tmp_path / f"scored_{b.name}")
        ok("score_directory", "--input", str(photos), "--output", scored, "--model", str(b), "--no-attributes")
        s = pd.read_parquet(scored)
        s["image_uri"] = s.image_uri.map(lambda u: Path(u).name)
        h = held.assign(image_uri=held.image_uri.map(lambda u: Path(u).name))
        m = h.merge(s, on=key)
        right[b.name] = (m.identity == m.person.map(truth)).mean()
    print(f"METRIC layouts on {len(held)} held-out photos: people {right['b_people']:.0%}, "
          f"labels {right['b_labels']:.0%}")
    assert right["b_labels"] >= right["b_people"] - 0.2 and right["b_labels"] >= 0.6


def test_forget_clears_tables_people_search_and_later_runs(named, tmp_path):
    from pipeline.people import FaceIndex

    table, people, out, log = (str(tmp_path / n) for n in ("table", "people", "labelled", "labels"))
    shutil.copytree(named.table, table)
    shutil.copytree(named.fresh, people)
    shutil.copytree(named.labelled, out)
    shutil.copytree(named.log, log)
    a = named.names.name[0]
    before = pd.read_parquet(table)
    a_keys = pd.read_parquet(people).query("name == @a")[["image_uri", "face_index"]]
    query = before.merge(a_keys.head(1), on=["image_uri", "face_index"]).embedding.iloc[0]
    text = ok("label_table", "--forget", a, "--labels", log, "--table", table, "--people", people, "--output", out)
    assert "rewritten:" in text and table in text and people in text
    after = pd.read_parquet(table)
    assert len(after) == len(before)                                       # photo rows kept
    gone = after.merge(a_keys, on=["image_uri", "face_index"])
    assert len(gone) == len(a_keys) and gone.embedding.isna().all()
    p = pd.read_parquet(people)
    assert p.merge(a_keys, on=["image_uri", "face_index"]).empty and a not in set(p.name.dropna())
    lab = pd.read_parquet(out)
    assert a not in set(lab.name.dropna()) and lab.merge(a_keys, on=["image_uri", "face_index"]).embedding.isna().all()
    index = FaceIndex.from_uris(table, people)
    assert "_index" in index.source and index.index.ntotal == len(p)   # the people job's index, scrubbed
    hits = index.search(np.asarray(query, np.float32)[None], k=50)[0]
    assert not {(u, i) for u, i, _, _ in hits} & set(zip(a_keys.image_uri, a_keys.face_index))
    # later runs never name anyone A
    again = str(tmp_path / "people2")
    ok("cluster_faces", "--table", table, "--output", again, "--labels", log)
    assert a not in set(pd.read_parquet(again).name.dropna())
    ok("label_table", "--table", table, "--people", again, "--labels", log, "--model", str(named.bundle),
       "--output", out)
    lab = pd.read_parquet(out)
    assert a not in set(lab.name.dropna()) and a not in set(lab.identity.dropna())


def test_killed_label_table_leaves_the_previous_output(named, ray_cluster, tmp_path):
    out = str(tmp_path / "labelled")
    shutil.copytree(named.labelled, out)
    before = pd.read_parquet(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "jobs" / "label_table.py"), "--table", named.table, "--people", named.fresh,
           "--labels", named.log, "--model", str(named.bundle), "--output", out,
           "--ray-address", ray_cluster.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not any(n.startswith("_label_table-") for n in os.listdir(out)):
            assert proc.poll() is None, "label_table ended before it was killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    after = pd.read_parquet(out)
    assert len(after) == len(before) and list(after.columns) == list(before.columns)
    from pipeline import storage

    assert len(storage.table_files(out)[1]) == len(storage.table_files(named.labelled)[1])


def fine_tuned_copy(bundle: Path, out: Path) -> Path:
    """``bundle`` written again as a fine-tuned bundle (with a ``backbone.pt``), by the bundle writer."""
    import torch

    from pipeline.heads import ModelBundle, TaskSpec

    state = torch.load(bundle / "heads.pt", weights_only=True)
    meta = json.loads((bundle / "model.json").read_text())
    heads = {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}
    cents = {k[len("centroids."):]: v.numpy() for k, v in state.items() if k.startswith("centroids.")}
    ModelBundle.write(str(out), [TaskSpec.from_json(t) for t in meta["tasks"]], heads, cents,
                      {"backbone": meta.get("backbone", {})}, backbone=b"tuned weights")
    return out


def test_bad_input_one_line_exit_2_nothing_written(named, tmp_path, capsys):
    tuned = fine_tuned_copy(named.bundle, tmp_path / "tuned")
    out = tmp_path / "out"
    log = tmp_path / "labels"
    labels.append(str(log), labels.decisions("name", "Nobody", [("/nowhere/x.jpg", 0)]))
    assert job("label_table", "--table", named.table, "--labels", str(log), "--output", str(out))[0] == 2
    assert "not in" in err_line(capsys) and not (out.exists() and storage_files(out))
    (log / "labels-broken.parquet").write_bytes(b"half a file")
    assert job("label_table", "--table", named.table, "--labels", str(log), "--output", str(out))[0] == 2
    assert "labels-broken.parquet" in err_line(capsys)
    assert job("label_table", "--table", named.table, "--model", str(tuned), "--output", str(out))[0] == 2
    assert "score_directory.py --model" in err_line(capsys) and not storage_files(out)
    assert job("cluster_faces", "--table", named.table, "--output", str(out), "--labels", str(log))[0] == 2
    assert "labels-broken.parquet" in err_line(capsys)


def storage_files(path: Path) -> list[str]:
    return [p.name for p in path.rglob("*.parquet")] if path.exists() else []


def test_label_table_and_forget_on_s3(ray_cluster, local_s3, tmp_path):
    """The whole job against a real S3 server: table, log and output under s3:// prefixes."""
    from pipeline import storage
    from pipeline.table import prediction_schema

    local_s3.create_bucket("names-test")
    schema = prediction_schema()
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(6, 128)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cols = {f.name: pa.nulls(6, f.type) for f in schema}
    cols.update(image_uri=pa.array([f"s3://names-test/photos/{i // 2}.jpg" for i in range(6)]),
                status=pa.array(["ok"] * 6), face_count=pa.array([2] * 6, pa.int32()),
                face_index=pa.array([i % 2 for i in range(6)], pa.int32()),
                embedding=pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 128).cast(
                    schema.field("embedding").type))
    fs, _ = storage.resolve("s3://names-test/table")
    storage.put_parquet(fs, "names-test/table/part-0.parquet", pa.Table.from_pydict(cols, schema=schema))
    log = "s3://names-test/labels"
    labels.append(log, labels.decisions("name", "Ada", [("s3://names-test/photos/0.jpg", 1)]))
    ok("label_table", "--table", "s3://names-test/table", "--labels", log, "--output", "s3://names-test/labelled")
    ok("label_table", "--table", "s3://names-test/table", "--labels", log, "--output", "s3://names-test/labelled")
    _, files = storage.table_files("s3://names-test/labelled")
    assert len(files) == 1                                        # the second run replaced the first
    t = pq.read_table(files[0], filesystem=fs).to_pandas()
    assert t.name.fillna("-").tolist() == ["-", "Ada", "-", "-", "-", "-"]
    text = ok("label_table", "--forget", "Ada", "--labels", log, "--table", "s3://names-test/table",
              "--output", "s3://names-test/labelled")
    assert "1 rows cleared" in text
    for uri in ("s3://names-test/table", "s3://names-test/labelled"):
        _, files = storage.table_files(uri)
        t = pq.read_table(files[0], filesystem=fs).to_pandas()
        assert len(t) == 6 and t.embedding.isna().tolist() == [False, True, False, False, False, False]
    assert labels.load(log).forgotten == {"Ada"}
