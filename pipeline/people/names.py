"""Names on people and faces, from the labels log (DESIGN.md "Names: decisions that stick").

The log holds face-level decisions (``pipeline.labels``); a person id is only what one
clustering run called a group of faces.  So a person's name is computed, never stored by
hand: the name most of its named faces have.  Rules, shared by every reader (the people
job, ``label_table.py``, the review page, XMP export):

- a person's name: the name with the most named faces in it (faces marked ``not`` that
  name do not count, forgotten names are gone from the replayed state already); a tie
  goes to the name first in sort order, so every reader agrees;
- a face's name: its own ``name`` decision when it has one (a decision about this very
  face outranks the majority of its group), else its person's name unless the face is
  marked ``not`` that name, else null.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import labels

KEYS = ["image_uri", "face_index"]
_KEY_SCHEMA = pa.schema([("image_uri", pa.string()), ("face_index", pa.int32())])


def _decisions(df: pd.DataFrame) -> pa.Table:
    """A replayed-state frame (image_uri, face_index, name) as an Arrow table for joins."""
    return pa.table({"image_uri": pa.array(df.image_uri.astype(object), pa.string()),
                     "face_index": pa.array(df.face_index.to_numpy(np.int32), pa.int32()),
                     "name": pa.array(df.name.astype(object), pa.string())})


def _keys(t: pa.Table) -> pa.Table:
    """``image_uri``, ``face_index`` and the row number of a table (joins carry no other column:
    struct and list columns do not go through Acero joins)."""
    return pa.table({"image_uri": t.column("image_uri").cast(pa.string()),
                     "face_index": t.column("face_index").cast(pa.int32()),
                     "_row": pa.array(np.arange(t.num_rows, dtype=np.int64))})


def _lookup(keys: pa.Table, other: pa.Table, on: list[str], column: str) -> pa.Array:
    """``other[column]`` for each row of ``keys`` (null where ``other`` has no match; ``other``
    must hold each key at most once)."""
    j = keys.select(on + ["_row"]).join(other.select(on + [column]), keys=on, join_type="inner")
    rows = j.column("_row").to_numpy()
    out = pa.nulls(keys.num_rows, other.schema.field(column).type)
    if not len(rows):
        return out
    order = np.full(keys.num_rows, -1, np.int64)
    order[rows] = np.arange(len(rows))
    taken = j.column(column).combine_chunks().take(pa.array(np.where(order >= 0, order, 0)))
    return pc.if_else(pa.array(order >= 0), taken, out)


def named_faces(people: pa.Table, state: labels.LabelState) -> pa.Table:
    """The named faces of a people table that count for their person's name:
    ``person``, ``name`` (forgotten names and faces marked ``not`` that name left out)."""
    named = _decisions(state.named)
    if state.forgotten:
        named = named.filter(pc.invert(pc.is_in(named.column("name"), pa.array(sorted(state.forgotten)))))
    if state.rejected is not None and len(state.rejected):
        bad = _decisions(state.rejected).append_column("_no", pa.array(np.ones(len(state.rejected), bool)))
        named = named.join(bad, keys=KEYS + ["name"], join_type="left outer")
        named = named.filter(pc.is_null(named.column("_no"))).drop_columns(["_no"])
    p = people.select(KEYS + ["person"]).cast(pa.schema([*_KEY_SCHEMA, ("person", pa.string())]))
    return p.join(named, keys=KEYS, join_type="inner").select(["person", "name"])


def person_names(people: pa.Table, state: labels.LabelState) -> dict[str, str]:
    """person id -> its name: the name most of its named faces have (faces marked `not`
    that name and forgotten names don't count); persons without a named face are absent."""
    votes = named_faces(people, state)
    if votes.num_rows == 0:
        return {}
    counts = votes.group_by(["person", "name"]).aggregate([("name", "count")]).to_pandas()
    counts = counts.sort_values(["person", "name_count", "name"], ascending=[True, False, True], kind="stable")
    best = counts.drop_duplicates("person")
    return dict(zip(best.person, best.name))


def person_name_table(people: pa.Table, state: labels.LabelState) -> pa.Table:
    """``person_names`` as a table (``person``, ``name``) for joins."""
    names = person_names(people, state)
    return pa.table({"person": pa.array(list(names), pa.string()), "name": pa.array(list(names.values()), pa.string())})


def face_names(faces: pa.Table, people: pa.Table | None, state: labels.LabelState) -> pa.Table:
    """``faces`` (image_uri, face_index, any other columns) plus ``person`` (string, null
    without a people table or for a face not in it) and ``name`` (string, null): a face
    takes its person's name, unless it is marked `not` that name; a face with no person takes its own
    `name` decision.  (A face's own ``name`` decision, where it has one, outranks its person's
    majority: see the module docstring.)"""
    keys = _keys(faces)
    if people is not None:
        p = people.select(KEYS + ["person"]).cast(pa.schema([*_KEY_SCHEMA, ("person", pa.string())]))
        person = _lookup(keys, p, KEYS, "person")
        by_person = person_name_table(people, state)
    else:
        person = pa.nulls(faces.num_rows, pa.string())
        by_person = pa.table({"person": pa.array([], pa.string()), "name": pa.array([], pa.string())})
    named = _decisions(state.named)
    if state.forgotten:
        named = named.filter(pc.invert(pc.is_in(named.column("name"), pa.array(sorted(state.forgotten)))))
    own = _lookup(keys, named, KEYS, "name")
    keys = keys.append_column("person", person)
    from_person = _lookup(keys, by_person, ["person"], "name")
    if len(state.rejected) and by_person.num_rows:
        keys = keys.append_column("name", from_person)
        bad = _decisions(state.rejected).append_column("_no", pa.array(np.ones(len(state.rejected), bool)))
        rejected = pc.fill_null(_lookup(keys, bad, KEYS + ["name"], "_no"), False)
        from_person = pc.if_else(rejected, pa.scalar(None, pa.string()), from_person)
    name = pc.coalesce(own, from_person)
    out = faces.drop_columns([c for c in ("person", "name") if c in faces.column_names])
    return out.append_column(pa.field("person", pa.string()), person).append_column(pa.field("name", pa.string()), name)
