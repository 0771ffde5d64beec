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

from dataclasses import dataclass

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


def face_rows(t: pa.Table, faces: pa.Table) -> np.ndarray:
    """Which rows of ``t`` are faces listed in ``faces`` (``image_uri``, ``face_index``, each
    face once): a boolean mask (forgetting's faces, in a part, an index shard's keys)."""
    hit = _keys(t).join(faces.select(KEYS).cast(_KEY_SCHEMA), keys=KEYS, join_type="inner").column("_row")
    mask = np.zeros(t.num_rows, bool)
    mask[hit.to_numpy()] = True
    return mask


def _lookup(keys: pa.Table, other: pa.Table, on: list[str], column: str) -> pa.Array:
    """``other[column]`` for each row of ``keys`` (null where ``other`` has no match; ``other``
    must hold each key at most once)."""
    left, right = keys.select(on + ["_row"]), other.select(on + [column])
    # Acero builds its hash table on the right side: the smaller one (a part vs the whole people table)
    j = (left.join(right, keys=on, join_type="inner") if right.num_rows <= left.num_rows
         else right.join(left, keys=on, join_type="inner"))
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
    return names_from_votes(named_faces(people, state))


def names_from_votes(votes: pa.Table) -> dict[str, str]:
    """``person_names`` from the (``person``, ``name``) votes of ``named_faces``: they can be
    gathered part by part (``people/scrub.py``) with only the named faces in one process."""
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


class Namer:
    """``face_names`` made once and applied to many parts of a table (label_table's tasks):
    the people keys, each person's name and the decisions, as Arrow tables (they pickle)."""

    def __init__(self, people: pa.Table | None, state: labels.LabelState) -> None:
        self.people = None if people is None else people.select(KEYS + ["person"]).cast(
            pa.schema([*_KEY_SCHEMA, ("person", pa.string())]))
        self.by_person = (person_name_table(people, state) if people is not None else
                          pa.table({"person": pa.array([], pa.string()), "name": pa.array([], pa.string())}))
        named = _decisions(state.named)
        if state.forgotten:
            named = named.filter(pc.invert(pc.is_in(named.column("name"), pa.array(sorted(state.forgotten)))))
        self.named = named
        self.rejected = _decisions(state.rejected).append_column("_no", pa.array(np.ones(len(state.rejected), bool)))

    def __call__(self, faces: pa.Table) -> pa.Table:
        keys = _keys(faces)
        person = (_lookup(keys, self.people, KEYS, "person") if self.people is not None
                  else pa.nulls(faces.num_rows, pa.string()))
        own = _lookup(keys, self.named, KEYS, "name")
        keys = keys.append_column("person", person)
        from_person = _lookup(keys, self.by_person, ["person"], "name")
        if self.rejected.num_rows and self.by_person.num_rows:
            keys = keys.append_column("name", from_person)
            rejected = pc.fill_null(_lookup(keys, self.rejected, KEYS + ["name"], "_no"), False)
            from_person = pc.if_else(rejected, pa.scalar(None, pa.string()), from_person)
        name = pc.coalesce(own, from_person)
        out = faces.drop_columns([c for c in ("person", "name") if c in faces.column_names])
        return (out.append_column(pa.field("person", pa.string()), person)
                .append_column(pa.field("name", pa.string()), name))


def face_names(faces: pa.Table, people: pa.Table | None, state: labels.LabelState) -> pa.Table:
    """``faces`` (image_uri, face_index, any other columns) plus ``person`` (string, null
    without a people table or for a face not in it) and ``name`` (string, null): a face
    takes its person's name, unless it is marked `not` that name; a face with no person takes its own
    `name` decision.  (A face's own ``name`` decision, where it has one, outranks its person's
    majority: see the module docstring.)"""
    return Namer(people, state)(faces)


# ------------------------------------------------------------------ the people job's hook


@dataclass
class NameReport:
    """What ``constrain`` did, for the people job's summary and ``_people.json``."""
    named_faces: int = 0         # faces of the table with a name decision
    names: int = 0               # distinct names among them
    split: int = 0               # people holding two names, split by name (the conflict rule)
    merged: int = 0              # people merged into another of the same name
    moved: int = 0               # faces moved (named faces to their name's person, unnamed ones by the split)
    rejected_out: int = 0        # faces taken out of a person whose name they are marked `not`

    def line(self) -> str:
        return (f"names:         {self.named_faces} named faces, {self.names} names: {self.split} people holding two "
                f"names split (each name's faces to its own person, unnamed faces to the nearer name's centre), "
                f"{self.merged} people merged into one of the same name, {self.moved} faces moved, "
                f"{self.rejected_out} faces taken out of a person they are marked `not`")


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def constrain(nums: np.ndarray, image_uri: pa.Array, face_index: np.ndarray, x: np.ndarray,
              state: labels.LabelState, threshold: float, start: int = 0,
              outside: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, NameReport]:
    """Person numbers (one per face, >0) made to honour the labels log:

    1. **conflict rule**: a person whose named faces hold two or more names is split by
       name: each named face goes with its name, each unnamed face with the name whose
       named faces' centre (in that person) it is nearest to by cosine; the name with the
       most faces (ties: first in sort order) keeps the person's number;
    2. faces named alike end in one person: the people of one name are merged into the one
       holding most of its faces (ties: the lower number);
    3. a face marked ``not X`` in X's person leaves it: to the nearest other person's centre
       when that is at least ``threshold`` and not a name it is marked ``not``, else to a
       person of its own.

    The faces given may be a part of the table holding whole people (``name_shards.py``):
    then ``start`` is the first number no face of the table has, and ``outside`` the
    (numbers, unit centres) of the people not given, where a `not` face may go too.
    """
    nums = np.asarray(nums, np.int64).copy()
    report = NameReport()
    n = len(nums)
    keys = pa.table({"image_uri": pa.array(image_uri).cast(pa.string()) if not isinstance(image_uri, pa.ChunkedArray)
                     else image_uri.cast(pa.string()),
                     "face_index": pa.array(np.asarray(face_index, np.int32)),
                     "_row": pa.array(np.arange(n, dtype=np.int64))})
    named = _decisions(state.named)
    if state.forgotten:
        named = named.filter(pc.invert(pc.is_in(named.column("name"), pa.array(sorted(state.forgotten)))))
    own = _lookup(keys, named, KEYS, "name")
    valid = np.asarray(pc.is_valid(own).to_numpy(zero_copy_only=False), bool)
    names, code_named = np.unique(np.asarray(own.filter(pa.array(valid)).to_pylist(), object), return_inverse=True) \
        if valid.any() else (np.array([], object), np.zeros(0, np.int64))
    code = np.full(n, -1, np.int64)
    code[valid] = code_named
    report.named_faces, report.names = int(valid.sum()), len(names)
    next_num = max(int(nums.max(initial=0)) + 1, start)
    if len(names):
        # 1. split people holding two names
        rows = np.flatnonzero(code >= 0)
        pairs = np.unique(np.stack([nums[rows], code[rows]], 1), axis=0)
        persons, count = np.unique(pairs[:, 0], return_counts=True)
        for p in persons[count > 1]:
            members = np.flatnonzero(nums == p)
            mine = members[code[members] >= 0]
            held, sizes = np.unique(code[mine], return_counts=True)
            keep = held[np.lexsort((held, -sizes))[0]]           # most faces, then first name
            centre = np.stack([_unit(x[mine[code[mine] == c]].mean(0)) for c in held])
            unnamed = members[code[members] < 0]
            to = np.where(code[members] >= 0, code[members], -1)
            if len(unnamed):
                to[code[members] < 0] = held[(x[unnamed] @ centre.T).argmax(1)]
            for c in held:
                if c == keep:
                    continue
                moving = members[to == c]
                nums[moving] = next_num
                next_num += 1
                report.moved += len(moving)
            report.split += 1
        # 2. one person per name
        rows = np.flatnonzero(code >= 0)
        pairs, per = np.unique(np.stack([code[rows], nums[rows]], 1), axis=0, return_counts=True)
        for c in np.unique(pairs[:, 0]):
            sel = pairs[:, 0] == c
            if sel.sum() < 2:
                continue
            people, faces = pairs[sel, 1], per[sel]
            target = people[np.lexsort((people, -faces))[0]]
            for p in people[people != target]:
                moving = nums == p
                report.moved += int(moving.sum())
                nums[moving] = target
                report.merged += 1
    # 3. `not X` faces out of X's person
    if len(state.rejected) and len(names):
        bad = _decisions(state.rejected)
        j = keys.join(bad, keys=KEYS, join_type="inner")
        if j.num_rows:
            name_of_person = {}
            rows = np.flatnonzero(code >= 0)
            for p, c in zip(nums[rows], code[rows]):
                name_of_person[int(p)] = names[c]
            rej_rows = j.column("_row").to_numpy()
            rej_names = np.asarray(j.column("name").to_pylist(), object)
            out = np.array([name_of_person.get(int(nums[r])) == nm for r, nm in zip(rej_rows, rej_names)], bool)
            leaving = np.unique(rej_rows[out])
            if len(leaving):
                uniq, lab = np.unique(nums, return_inverse=True)
                sums = np.zeros((len(uniq), x.shape[1]), np.float64)
                np.add.at(sums, lab, x)
                cent = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
                if outside is not None:
                    uniq, cent = np.r_[uniq, outside[0]], np.concatenate([cent, outside[1]])
                refused = {}
                for r, nm in zip(rej_rows, rej_names):
                    refused.setdefault(int(r), set()).add(nm)
                for r in leaving:
                    sims = cent @ x[r]
                    dest = None
                    for i in np.argsort(-sims):
                        if sims[i] < threshold:
                            break
                        p = int(uniq[i])
                        if p != nums[r] and name_of_person.get(p) not in refused[int(r)]:
                            dest = p
                            break
                    if dest is None:
                        dest, next_num = next_num, next_num + 1
                    nums[r] = dest
                    report.rejected_out += 1
    return nums, report


def with_names(people: pa.Table, state: labels.LabelState | None) -> pa.Table:
    """The people table with its ``name`` column: each person's name (``person_names``) on
    every face of it; null without a labels log or for an unnamed person."""
    if "name" in people.column_names:
        people = people.drop_columns(["name"])
    if state is None:
        return people.append_column(pa.field("name", pa.string()), pa.nulls(people.num_rows, pa.string()))
    by_person = person_name_table(people, state)
    keys = pa.table({"person": people.column("person"), "_row": pa.array(np.arange(people.num_rows, dtype=np.int64))})
    return people.append_column(pa.field("name", pa.string()), _lookup(keys, by_person, ["person"], "name"))


def name_counts(people: pa.Table) -> dict[str, dict[str, int]]:
    """``_people.json``'s ``names``: per name, its people and faces."""
    t = people.filter(pc.is_valid(people.column("name")))
    if not t.num_rows:
        return {}
    g = t.group_by("name").aggregate([("person", "count_distinct"), ("person", "count")]).sort_by("name")
    return {n: {"people": int(p), "faces": int(f)} for n, p, f in
            zip(g.column("name").to_pylist(), g.column("person_count_distinct").to_pylist(),
                g.column("person_count").to_pylist())}
