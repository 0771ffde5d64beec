"""The labels log (pipeline/labels.py): append-only files, replay in ``at`` order, forget."""
from __future__ import annotations

import datetime as dt
import os

import pandas as pd
import pyarrow as pa
import pytest

from pipeline import labels

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def write(uri: str, action: str, name: str, faces=(), minute: int = 0) -> None:
    labels.append(uri, labels.decisions(action, name, faces, author="test", source="test", at=at(minute)))


def test_missing_log_is_empty_and_first_writer_creates_it(tmp_path):
    uri = str(tmp_path / "labels")
    assert labels.read(uri).num_rows == 0 and labels.load(uri).named.empty
    write(uri, "name", "Ada", [("a.jpg", 0)])
    files = os.listdir(uri)
    assert len(files) == 1 and files[0].startswith("labels-") and files[0].endswith(".parquet")
    df = pd.read_parquet(uri)
    assert list(df.columns) == labels.SCHEMA.names and df.action.tolist() == ["name"]
    assert str(df["at"].dtype) == "datetime64[ms, UTC]"


def test_later_decision_about_a_face_wins_in_at_order(tmp_path):
    uri = str(tmp_path / "labels")
    # written out of order: replay follows `at`, not the order files were written
    write(uri, "name", "Bob", [("a.jpg", 0)], minute=5)
    write(uri, "name", "Ada", [("a.jpg", 0), ("b.jpg", 1)], minute=1)
    write(uri, "not", "Ada", [("b.jpg", 1)], minute=2)
    write(uri, "not", "Cy", [("a.jpg", 0)], minute=6)     # not Cy leaves Bob in place
    s = labels.load(uri)
    named = dict(zip(zip(s.named.image_uri, s.named.face_index), s.named.name))
    assert named == {("a.jpg", 0): "Bob"}
    rejected = set(zip(s.rejected.image_uri, s.rejected.face_index, s.rejected.name))
    assert rejected == {("b.jpg", 1, "Ada"), ("a.jpg", 0, "Cy")}
    write(uri, "name", "Ada", [("b.jpg", 1)], minute=7)    # named again after the `not`
    s = labels.load(uri)
    assert ("b.jpg", 1, "Ada") in set(zip(s.named.image_uri, s.named.face_index, s.named.name))
    assert s.rejected.name.tolist() == ["Cy"]
    assert s.names() == ["Ada", "Bob"]


def test_forget_voids_earlier_rows_until_named_again(tmp_path):
    uri = str(tmp_path / "labels")
    write(uri, "name", "Ada", [("a.jpg", 0), ("b.jpg", 0)], minute=1)
    write(uri, "name", "Bob", [("c.jpg", 0)], minute=1)
    write(uri, "forget", "Ada", minute=2)
    s = labels.load(uri)
    assert s.named.name.tolist() == ["Bob"] and s.forgotten == {"Ada"}
    write(uri, "name", "Ada", [("d.jpg", 0)], minute=3)
    s = labels.load(uri)
    assert set(s.named.image_uri) == {"c.jpg", "d.jpg"} and s.forgotten == set()


def test_bad_decisions_are_refused(tmp_path):
    uri = str(tmp_path / "labels")
    with pytest.raises(labels.LabelsError, match="empty"):
        labels.decisions("name", "   ", [("a.jpg", 0)])
    with pytest.raises(labels.LabelsError, match="unknown action"):
        labels.decisions("rename", "Ada", [("a.jpg", 0)])
    with pytest.raises(labels.LabelsError, match="needs at least one face"):
        labels.decisions("name", "Ada", [])
    with pytest.raises(labels.LabelsError, match="image_uri and face_index"):
        labels.append(uri, pa.table({"action": ["name"], "name": ["Ada"], "image_uri": [None]}))
    assert not os.path.exists(uri)                          # nothing written
    assert labels.clean_name("  Zoë   & Ben <3 ") == "Zoë & Ben <3"


def test_unreadable_file_and_in_progress_files(tmp_path):
    uri = tmp_path / "labels"
    write(str(uri), "name", "Ada", [("a.jpg", 0)])
    (uri / ".labels-x.parquet.inprogress").write_bytes(b"half")   # a writer killed mid-file
    (uri / "notes.txt").write_text("not part of the log")
    assert labels.read(str(uri)).num_rows == 1
    (uri / "labels-broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(labels.LabelsError, match="labels-broken.parquet"):
        labels.read(str(uri))


def test_log_on_s3(local_s3):
    local_s3.create_bucket("labels-test")
    uri = "s3://labels-test/log"
    write(uri, "name", "Ada", [("s3://b/a.jpg", 0)], minute=1)
    write(uri, "name", "Bob", [("s3://b/a.jpg", 0)], minute=2)
    s = labels.load(uri)
    assert s.named.name.tolist() == ["Bob"] and labels.read(uri).num_rows == 2
