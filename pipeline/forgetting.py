"""Forget a name (``label_table.py --forget NAME``, DESIGN.md "Names"): the right to be
forgotten, as data.

1. A ``forget`` row goes to the labels log: from then on no job names anyone NAME (the
   replay voids every earlier row about NAME; ``label_table`` turns a bundle's NAME into
   ``unknown``) until a new ``name`` row after it.
2. The faces: every face ever named NAME in the log, and every face of the person(s) the
   people table names NAME.
3. Each table faceray wrote under the URIs given is rewritten, part file by part file
   (each file replaced whole, ``storage.put_parquet``), in Ray tasks: prediction and
   labelled tables keep every row (photo rows too) but those faces lose ``embedding``,
   ``person`` and ``name``, and any task column saying NAME becomes null; the people table
   loses those faces' rows (its contact sheet is drawn again without them) and its search
   index ``_index/`` their vectors and keys (``people/scrub.py``, ``search_index.scrub_index``:
   search keeps working, and never finds them).  Nothing reads a whole table into one
   process: every step is a task per part file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import labels, storage
from pipeline.contract import UsageError
from pipeline.people.names import KEYS, _KEY_SCHEMA, face_rows



@dataclass
class ForgetSummary:
    name: str
    faces: int = 0                 # faces forgotten (named NAME, or of its person)
    persons: list[str] = field(default_factory=list)
    log_file: str | None = None
    rewritten: list[str] = field(default_factory=list)   # one line per table

    def lines(self) -> list[str]:
        return [f"forgotten:     {self.name!r}: {self.faces} faces"
                + (f" (persons {', '.join(self.persons)})" if self.persons else ""),
                f"labels log:    forget row written ({self.log_file})",
                *[f"rewritten:     {line}" for line in self.rewritten]]


def faces_of(name: str, log: pa.Table, people_uri: str | None) -> tuple[pa.Table, list[str]]:
    """The faces to forget: ever named ``name`` in ``log``, or of a person the people output
    at ``people_uri`` names ``name`` (by the state before the forget); and those persons."""
    from pipeline.people.scrub import faces_of_name

    named = log.filter(pc.and_(pc.equal(log.column("action"), labels.NAME), pc.equal(log.column("name"), name)))
    keys = [named.select(KEYS).cast(_KEY_SCHEMA)]
    persons: list[str] = []
    if people_uri is not None:
        of_persons, persons = faces_of_name(people_uri, labels.replay(log), name)
        keys.append(of_persons)
    t = pa.concat_tables(keys).group_by(KEYS).aggregate([])
    return t.append_column("_gone", pa.array(np.ones(t.num_rows, bool))), persons


def scrub_part(path: str, uri: str, gone: pa.Table, name: str) -> int:
    """A Ray task: null the embedding, person and name of the forgotten faces of one part
    file of a prediction or labelled table, and any task value ``name``; the file is
    replaced whole only when something changed.  Rows changed."""
    fs, _ = storage.resolve(uri)
    t = pq.read_table(path, filesystem=fs)
    if "face_index" not in t.column_names or "image_uri" not in t.column_names:
        return 0
    mask = face_rows(t, gone)
    changed = mask.copy()
    cols = {}
    for i, f in enumerate(t.schema):
        col = t.column(i)
        if f.name in ("embedding", "person", "name"):
            drop = mask
            if f.name == "name":
                drop = mask | np.asarray(pc.fill_null(pc.equal(col, name), False).to_numpy(zero_copy_only=False), bool)
        elif pa.types.is_string(f.type) and f.name not in ("image_uri", "status", "error", "model_version"):
            drop = np.asarray(pc.fill_null(pc.equal(col, name), False).to_numpy(zero_copy_only=False), bool)
            if drop.any() and f"{f.name}_score" in t.column_names:
                cols[f"{f.name}_score"] = drop
        else:
            continue
        if drop.any():
            cols[f.name] = drop | cols.get(f.name, np.zeros(t.num_rows, bool))
    if not cols:
        return 0
    for cname, drop in cols.items():
        changed |= drop
        idx = t.column_names.index(cname)
        col = t.column(idx)
        t = t.set_column(idx, t.schema.field(idx), pc.if_else(pa.array(drop), pa.nulls(t.num_rows, col.type), col))
    storage.put_parquet(fs, path, t)
    return int(changed.sum())


def scrub_table(uri: str, gone: pa.Table, name: str) -> tuple[int, int, int]:
    """Every part file of a prediction or labelled table through ``scrub_part`` in Ray
    tasks: (rows changed, files rewritten, files)."""
    import ray

    _, files = storage.table_files(uri)
    task = ray.remote(num_cpus=1, max_retries=2)(scrub_part)
    ref = ray.put(gone)
    changed = ray.get([task.remote(p, uri, ref, name) for p in files])
    return sum(changed), sum(1 for c in changed if c), len(files)


def forget(name: str, labels_uri: str | None, table_uri: str | None = None, people_uri: str | None = None,
           output_uri: str | None = None, author: str | None = None,
           log: Callable[[str], None] = print) -> ForgetSummary:
    """The whole ``--forget``: checks first (one-line errors, nothing written), then the
    log row, then the tables (see the module docstring)."""
    from pipeline.people.scrub import scrub_people
    from pipeline.people.search_index import scrub_index

    name = labels.clean_name(name)
    if not labels_uri:
        raise UsageError("--forget needs --labels (the forget row is what keeps NAME forgotten)")
    log_rows = labels.read(labels_uri)
    if people_uri and not storage.table_files(people_uri)[1]:
        raise UsageError(f"--people {people_uri}: no people table there (a cluster_faces.py output)")
    for flag, uri in (("--table", table_uri), ("--output", output_uri)):
        if uri and not storage.table_files(uri)[1]:
            raise UsageError(f"{flag} {uri}: no Parquet files there")
    gone, persons = faces_of(name, log_rows, people_uri)
    summary = ForgetSummary(name, gone.num_rows, persons)
    summary.log_file = labels.append(labels_uri, labels.decisions(labels.FORGET, name, author=author,
                                                                  source="label_table --forget"))
    log(f"forget {name!r}: {gone.num_rows} faces (named so in {labels_uri}"
        + (f", or of person(s) {', '.join(persons)} in {people_uri}" if persons else "") + ")")
    for flag, uri in (("--table", table_uri), ("--output", output_uri)):
        if uri:
            rows, rewritten, files = scrub_table(uri, gone, name)
            line = f"{uri} ({flag}): {rows} rows cleared (embedding, person, name), {rewritten} of {files} part files rewritten"
            summary.rewritten.append(line)
            log(line)
    if people_uri:
        s = scrub_people(people_uri, gone, name)
        index = scrub_index(people_uri, gone, s.new_files, s.old_files)
        line = (f"{people_uri} (--people): {s.removed} face rows removed, {s.kept} kept, {s.rewritten} of "
                f"{s.files} part files rewritten; contact sheet redrawn; {index}")
        summary.rewritten.append(line)
        log(line)
    return summary
