"""Naming people (train_classifier.py --layout people) on real photos.

From conftest's shared ``people_run`` (identities + unknown photos scored and clustered
once per session): a people table that lacks a few photos of every identity and half of
the unknown people, names for the people that are mostly one identity (a person split in
two gets the same name twice; the other unknown people stay unnamed: strangers), one Ray
Train fit, then the held-out photos and the held-out unknown people scored with the
bundle: the right names on the first, ``unknown`` on the second (people the thresholds
never saw).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import labelled
from jobs import score_directory, train_classifier

pytestmark = pytest.mark.slow

HELD_OUT = 3   # photos per named identity left out of the people table, scored with the bundle


def main_faces(table: str) -> pd.DataFrame:
    """The centred face of each scored photo (as ``labelled`` picks it) with its folder."""
    t = pd.read_parquet(table)
    t = t[t.status == "ok"].copy()
    b = pd.DataFrame(t.bbox.tolist(), index=t.index)
    t["d"] = ((b.x + b.w / 2 - t.width / 2) ** 2 + (b.y + b.h / 2 - t.height / 2) ** 2) ** 0.5
    t = t.sort_values("d").groupby("image_uri").head(1)
    t["truth"] = t.image_uri.str.split("/").str[-2]
    return t


@pytest.fixture(scope="module")
def naming(people_run, tmp_path_factory):
    table, _, out = people_run
    root = tmp_path_factory.mktemp("naming")
    main = labelled(table, out)
    counts = main[~main.image_uri.str.contains("/unknown/")].truth.value_counts()
    identities = set(counts[counts >= 20].index)
    held = (main[main.truth.isin(identities)].sort_values("image_uri")
            .groupby("truth").tail(HELD_OUT)[["image_uri", "truth"]])
    everyone = pd.read_parquet(out)
    unknown_src = Path(next(u for u in everyone.image_uri if "/unknown/" in u)).parent.parent
    strangers_out = sorted(d.name for d in unknown_src.iterdir() if d.is_dir())[1::2]
    folder = everyone.image_uri.str.split("/").str[-2]
    drop = everyone.image_uri.isin(set(held.image_uri)) | (
        everyone.image_uri.str.contains("/unknown/") & folder.isin(strangers_out))
    people_dir = root / "people"
    people_dir.mkdir()
    pq.write_table(pa.Table.from_pandas(everyone[~drop], preserve_index=False), people_dir / "part-0.parquet")
    shutil.copy(Path(out) / "_people.json", people_dir)

    kept = labelled(table, str(people_dir))
    by_person = kept.groupby("person").truth
    share = by_person.agg(lambda s: s.value_counts(normalize=True).iloc[0])
    major = by_person.agg(lambda s: s.value_counts().index[0])
    names = pd.DataFrame({"person": major.index, "name": major.values})
    names = names[(share.to_numpy() >= 0.9) & names.name.isin(identities).to_numpy()]
    names.to_csv(root / "names.csv", index=False)

    bundle = root / "bundle"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = train_classifier.main(["--layout", "people", "--data", str(people_dir), "--names",
                                      str(root / "names.csv"), "--output", str(bundle), "--workers", "1",
                                      "--epochs", "20"])
    assert code == 0, buf.getvalue()[-3000:]

    photos = root / "photos"
    for uri, truth in held.itertuples(index=False):
        (photos / "known" / truth).mkdir(parents=True, exist_ok=True)
        shutil.copy(uri, photos / "known" / truth)
    for name in strangers_out:
        shutil.copytree(unknown_src / name, photos / "unknown" / name)
    scored = root / "scored"
    assert score_directory.main(["--input", str(photos), "--output", str(scored), "--model", str(bundle),
                                 "--no-attributes"]) == 0
    return SimpleNamespace(root=root, people=people_dir, names=names, bundle=bundle, stdout=buf.getvalue(),
                           scored=main_faces(str(scored)), held=held)


def test_bundle_is_named_people_with_stranger_calibration(naming):
    assert naming.names.name.duplicated().any()          # a person split in two: one name, two ids
    meta = json.loads((naming.bundle / "model.json").read_text())
    metrics = json.loads((naming.bundle / "metrics.json").read_text())
    (task,) = meta["tasks"]
    assert task["name"] == "identity" and task["open_set"] and task["exclusive"]
    assert task["labels"] == sorted(set(naming.names.name))
    assert meta["data"]["layout"] == "people" and meta["data"]["names"].endswith("names.csv")
    s = metrics["strangers"]["identity"]
    print("METRIC naming:", json.dumps(s), "test", metrics["test"]["identity"], "open_set", metrics["open_set"])
    assert meta["metrics"]["strangers"]["identity"] == s
    assert s["faces"] > 0 and s["used"]["val"] > 0 and s["used"]["test"] > 0
    assert s["val"]["known_rejected"] <= 0.03 and s["target_known_rejected"] == 0.03
    assert s["val"]["strangers_rejected"] >= 0.9 and s["test"]["strangers_rejected"] >= 0.8
    assert metrics["open_set"]["identity"]["strangers"] == s["used"]["val"]
    assert metrics["people"]["named_people"] == len(naming.names)
    assert "open set identity: known rejected" in naming.stdout and "(none computed)" in naming.stdout
    assert "open set against strangers" in (naming.bundle / "report.html").read_text()


def test_held_out_photos_named_and_strangers_unknown(naming):
    scored = naming.scored
    known = scored[scored.image_uri.str.contains("/known/")]
    unknown = scored[scored.image_uri.str.contains("/unknown/")]
    right = (known.identity == known.truth).mean()
    rejected = (unknown.identity == "unknown").mean()
    print(f"METRIC naming held-out: {len(known)} known photos named right {right:.1%}, "
          f"{len(unknown)} unknown photos rejected {rejected:.1%}")
    assert len(known) >= 0.9 * len(naming.held) and len(unknown) >= 40
    assert right >= 0.9 and rejected >= 0.9


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_naming_misuse_exits_2_with_one_line(naming, people_run, data_dir, tmp_path, capsys):
    _, _, people = people_run
    out = str(tmp_path / "out")

    def run(*argv: str) -> int:
        return train_classifier.main([*argv, "--output", out, "--workers", "1"])

    names = str(naming.root / "names.csv")
    assert run("--layout", "people", "--data", people) == 2
    assert "needs --names" in _err(capsys)
    assert run("--data", str(data_dir / "identities"), "--names", names) == 2
    assert "--names is for --layout people" in _err(capsys)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\np000001,Someone\n")
    assert run("--layout", "people", "--data", people, "--names", str(bad)) == 2
    assert "needs columns person,name" in _err(capsys)
    bad.write_text("person,name\np000001,A\np999998,B\np999999,C\n")
    assert run("--layout", "people", "--data", people, "--names", str(bad)) == 2
    assert "2 person(s) not in" in (e := _err(capsys)) and "p999998, p999999" in e
    bad.write_text("person,name\np000001,A\np000002,A\n")
    assert run("--layout", "people", "--data", people, "--names", str(bad)) == 2
    assert "at least 2" in _err(capsys)
    bad.write_text("person,name\np000001,A\np000002,B\n")
    no_json = tmp_path / "no_json"
    shutil.copytree(people, no_json, ignore=shutil.ignore_patterns("_people.*"))
    assert run("--layout", "people", "--data", str(no_json), "--names", str(bad)) == 2
    assert "_people.json" in _err(capsys)
    bare = tmp_path / "bare"
    bare.mkdir()
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "face_index": pa.array([0], pa.int32())}), bare / "p.parquet")
    (no_json / "_people.json").write_text(json.dumps({"source_table": str(bare)}))
    assert run("--layout", "people", "--data", str(no_json), "--names", str(bad)) == 2
    assert "no embeddings" in _err(capsys)
    assert run("--layout", "people", "--data", str(tmp_path / "nothing"), "--names", str(bad)) == 2
    assert "no people table" in _err(capsys)
