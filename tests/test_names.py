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
