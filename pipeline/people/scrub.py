"""Forgetting faces in a people output (``label_table.py --forget``), part file by part file.

Why tasks: a people output of 10^7 faces is ~1 GiB of keys; ``--forget`` must not read it
into one process any more than the people job does.  Each step is one Ray task per part
file and the driver holds only what is about the forgotten faces:

1. ``faces_of_name``: every part's named-face votes (``names.named_faces``) → the persons
   the table names NAME → those persons' faces (with the log's faces named NAME, the
   caller's part).
2. ``scrub_people``: every part's forgotten faces counted per person (their persons' sizes
   change everywhere); then each part that holds such a person (or a face or a name to
   drop) written again under ``_work/``, the rest kept as they are; the new files put in
   place at once (``output.publish``).  Each task also returns its part's rows of its own
   largest people, which hold the contact sheet's (a person's size is the same in every
   part), so the sheet is drawn again from a few hundred rows.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import labels, storage
from pipeline.people.names import KEYS, _KEY_SCHEMA, face_rows, named_faces, names_from_votes
from pipeline.people.output import publish, write_text
from pipeline.people.reading import parquet_files
from pipeline.people.spread import _remote

SHEET_PEOPLE = 40      # people on the contact sheet (as the people job draws it)
SHEET_FACES = 8        # faces per person on it


def _votes(path: str, uri: str, state: labels.LabelState) -> pa.Table:
    fs, _ = storage.resolve(uri)
    return named_faces(pq.read_table(path, filesystem=fs, columns=KEYS + ["person"]), state)


def _faces_of(path: str, uri: str, persons: pa.Array) -> pa.Table:
    fs, _ = storage.resolve(uri)
    t = pq.read_table(path, filesystem=fs, columns=KEYS + ["person"])
    return t.filter(pc.is_in(t.column("person"), persons)).select(KEYS).cast(_KEY_SCHEMA)


def faces_of_name(uri: str, state: labels.LabelState, name: str) -> tuple[pa.Table, list[str]]:
    """The persons of the people output at ``uri`` that ``state`` names ``name``, and their
    faces (``image_uri``, ``face_index``)."""
    import ray

    _, files = parquet_files(uri)
    votes = pa.concat_tables(ray.get([_remote(_votes).remote(p, uri, state) for p in files]))
    persons = sorted(p for p, n in names_from_votes(votes).items() if n == name)
    if not persons:
        return _KEY_SCHEMA.empty_table(), []
    want = pa.array(persons, pa.string())
    return pa.concat_tables(ray.get([_remote(_faces_of).remote(p, uri, want) for p in files])), persons


def _lost(path: str, uri: str, gone: pa.Table) -> tuple[pa.Table, int]:
    """One part: its forgotten faces per person (``person``, ``size`` before, ``lost``) and
    its rows."""
    fs, _ = storage.resolve(uri)
    t = pq.read_table(path, filesystem=fs, columns=KEYS + ["person", "person_size"])
    hit = t.filter(pa.array(face_rows(t, gone)))
    per = hit.group_by("person").aggregate([("person_size", "max"), ("person", "count")])
    return pa.table({"person": per.column("person"), "size": per.column("person_size_max").cast(pa.int64()),
                     "lost": per.column("person_count").cast(pa.int64())}), t.num_rows


def _rewrite(path: str, uri: str, gone: pa.Table, name: str, lost: pa.Table, work: str,
             n_people: int, per_person: int) -> tuple[str | None, int, pa.Table]:
    """One part without the forgotten faces, ``name`` cleared, its persons' sizes less what
    they lost: written to ``work`` when anything changed (→ its path there, else None), its
    rows kept, and its rows of its ``n_people`` largest people (``per_person`` each, most
    typical first) for the contact sheet."""
    fs, root = storage.resolve(uri)
    t = pq.read_table(path, filesystem=fs)
    drop = face_rows(t, gone)
    changed = bool(drop.any())
    t = t.filter(pa.array(~drop))
    if "name" in t.column_names:
        is_name = pc.fill_null(pc.equal(t.column("name"), name), False)
        if pc.any(is_name).as_py():
            i = t.column_names.index("name")
            t = t.set_column(i, t.field(i), pc.if_else(is_name, pa.scalar(None, pa.string()), t.column(i)))
            changed = True
    if lost.num_rows and t.num_rows:
        minus = pc.index_in(t.column("person"), lost.column("person"))
        if pc.any(pc.is_valid(minus)).as_py():
            less = pc.fill_null(pc.take(lost.column("lost"), minus), 0)
            i = t.column_names.index("person_size")
            t = t.set_column(i, t.field(i), pc.subtract(t.column(i).cast(pa.int64()), less).cast(t.field(i).type))
            changed = True
    out = None
    if changed and t.num_rows:
        out = f"{work}/_{path.rsplit('/', 1)[-1]}"
        storage.put_parquet(fs, f"{root}/{out}", t)
    return out, t.num_rows, _sheet_rows(t, n_people, per_person)


def _sheet_rows(t: pa.Table, n_people: int, per_person: int) -> pa.Table:
    """The rows of ``t``'s ``n_people`` largest people (ties: the smaller id), ``per_person``
    each by similarity: the global largest people's sheet rows are in the union of these."""
    if not t.num_rows:
        return t
    sizes = t.group_by("person").aggregate([("person_size", "max")])
    order = np.lexsort((np.asarray(sizes.column("person").to_pylist(), object),
                        -sizes.column("person_size_max").to_numpy()))
    top = sizes.column("person").take(pa.array(order[:n_people]))
    mine = t.filter(pc.is_in(t.column("person"), top))
    mine = mine.sort_by([("person", "ascending"), ("similarity", "descending")])
    person = mine.column("person").combine_chunks()
    first = np.flatnonzero(np.r_[True, pc.not_equal(person[1:], person[:-1]).to_numpy(zero_copy_only=False)])
    rank = np.arange(mine.num_rows) - np.repeat(first, np.diff(np.r_[first, mine.num_rows]))
    return mine.filter(pa.array(rank < per_person))


@dataclass
class Scrubbed:
    removed: int = 0
    kept: int = 0
    rewritten: int = 0             # part files written again
    files: int = 0
    old_files: list[str] = field(default_factory=list)   # the output's part files before
    new_files: list[str] = field(default_factory=list)   # and after


def scrub_people(uri: str, gone: pa.Table, name: str, n_people: int = SHEET_PEOPLE,
                 per_person: int = SHEET_FACES) -> Scrubbed:
    """The people output at ``uri`` without the faces in ``gone`` (sizes counted again, the
    name ``name`` cleared), its ``_people.json`` counts and contact sheet made again."""
    import ray

    from pipeline.people.sheet import contact_sheet

    fs, files = parquet_files(uri)
    _, root = storage.resolve(uri)
    gone_ref = ray.put(gone)
    counted = [_remote(_lost, 2).remote(p, uri, gone_ref) for p in files]
    per = pa.concat_tables(ray.get([c[0] for c in counted]))
    lost = per.group_by("person").aggregate([("size", "max"), ("lost", "sum")])
    lost = pa.table({"person": lost.column("person"), "size": lost.column("size_max"), "lost": lost.column("lost_sum")})
    work = f"_work/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    fs.create_dir(f"{root}/{work}", recursive=True)
    task, lost_ref = _remote(_rewrite, 3), ray.put(lost)
    done = [task.remote(p, uri, gone_ref, name, lost_ref, work, n_people, per_person) for p in files]
    outs, rows, sheet_rows = (ray.get([d[j] for d in done]) for j in range(3))
    run = work.rsplit("/", 1)[-1]
    moves, replaced = [], []
    for i, (p, out) in enumerate(zip(files, outs)):
        if out is not None:
            moves.append((out, f"part-{run}-{i:05d}.parquet"))
        if out is not None or rows[i] == 0:
            replaced.append(p)               # written again, or nothing of it left
    publish(uri, moves, replaced, work)
    s = Scrubbed(removed=int(pc.sum(lost.column("lost")).as_py() or 0), kept=sum(rows),
                 rewritten=len(moves), files=len(files), old_files=files, new_files=parquet_files(uri)[1])
    try:
        with fs.open_input_stream(f"{root}/_people.json") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return s
    size, left = lost.column("size").to_numpy(), (lost.column("size").to_numpy() - lost.column("lost").to_numpy())
    meta["faces"] = s.kept
    meta["forgotten_faces"] = int(meta.get("forgotten_faces", 0)) + s.removed
    if "people" in meta:
        meta["people"] = int(meta["people"]) - int((left == 0).sum())
    if "people_2plus" in meta:
        meta["people_2plus"] = int(meta["people_2plus"]) - int(((size >= 2) & (left < 2)).sum())
    if "single_faces" in meta:
        meta["single_faces"] = int(meta["single_faces"]) + int(((size >= 2) & (left == 1)).sum()) - int(
            ((size == 1) & (left == 0)).sum())
    meta.get("names", {}).pop(name, None)
    meta["files"] = [p.rsplit("/", 1)[-1] for p in s.new_files]
    top = pa.concat_tables(sheet_rows, promote_options="default")
    if "largest" in meta:
        meta["largest"] = int(pc.max(top.column("person_size")).as_py() or 0) if top.num_rows else 0
    if s.kept and "source_table" in meta:
        sheet = contact_sheet(top, meta["source_table"], meta, n_people, per_person)
        meta.update(sheet_faces=sheet.faces, sheet_unreadable=sheet.unreadable)
        write_text(uri, "_people.html", sheet.html)
    elif fs.get_file_info(f"{root}/_people.html").type == pafs.FileType.File:
        fs.delete_file(f"{root}/_people.html")     # nobody left: the old sheet showed the forgotten faces
    write_text(uri, "_people.json", json.dumps(meta, indent=2))
    return s
