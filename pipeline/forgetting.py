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
   loses those faces' rows (its contact sheet is drawn again without them, and a search
   index side folder ``_index/`` is removed so it is rebuilt from the table).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import labels, storage
from pipeline.contract import UsageError

KEYS = ["image_uri", "face_index"]
_KEY_SCHEMA = pa.schema([("image_uri", pa.string()), ("face_index", pa.int32())])


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


def faces_of(name: str, log: pa.Table, people: pa.Table | None) -> tuple[pa.Table, list[str]]:
    """The faces to forget: ever named ``name`` in ``log``, or of a person the people table
    names ``name`` (by the state before the forget); and those persons."""
    from pipeline.people.names import person_names

    named = log.filter(pc.and_(pc.equal(log.column("action"), labels.NAME), pc.equal(log.column("name"), name)))
    keys = [named.select(KEYS).cast(_KEY_SCHEMA)]
    persons: list[str] = []
    if people is not None:
        state = labels.replay(log)
        persons = sorted(p for p, n in person_names(people, state).items() if n == name)
        if persons:
            mine = people.filter(pc.is_in(people.column("person"), pa.array(persons, pa.string())))
            keys.append(mine.select(KEYS).cast(_KEY_SCHEMA))
    t = pa.concat_tables(keys).group_by(KEYS).aggregate([])
    return t.append_column("_gone", pa.array(np.ones(t.num_rows, bool))), persons


def _gone_rows(t: pa.Table, gone: pa.Table) -> np.ndarray:
    """Which rows of ``t`` are faces in ``gone``."""
    keys = pa.table({"image_uri": t.column("image_uri").cast(pa.string()),
                     "face_index": t.column("face_index").cast(pa.int32()),
                     "_row": pa.array(np.arange(t.num_rows, dtype=np.int64))})
    hit = keys.join(gone, keys=KEYS, join_type="inner").column("_row").to_numpy()
    mask = np.zeros(t.num_rows, bool)
    mask[hit] = True
    return mask


def scrub_part(path: str, uri: str, gone: pa.Table, name: str) -> int:
    """A Ray task: null the embedding, person and name of the forgotten faces of one part
    file of a prediction or labelled table, and any task value ``name``; the file is
    replaced whole only when something changed.  Rows changed."""
    fs, _ = storage.resolve(uri)
    t = pq.read_table(path, filesystem=fs)
    if "face_index" not in t.column_names or "image_uri" not in t.column_names:
        return 0
    mask = _gone_rows(t, gone)
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


def scrub_people(uri: str, gone: pa.Table, name: str) -> tuple[int, int]:
    """The people table without the forgotten faces (sizes counted again), its contact
    sheet drawn again and any ``_index/`` side folder removed: (rows removed, rows kept)."""
    from pipeline.people.output import write_table, write_text
    from pipeline.people.reading import parquet_files
    from pipeline.people.search_index import remove_index
    from pipeline.people.sheet import contact_sheet

    import pyarrow.dataset as pads

    fs, files = parquet_files(uri)
    t = pads.dataset(files, filesystem=fs, format="parquet").to_table()
    mask = _gone_rows(t, gone)
    t = t.filter(pa.array(~mask))
    if "name" in t.column_names:
        i = t.column_names.index("name")
        t = t.set_column(i, t.schema.field(i), pc.if_else(pc.fill_null(pc.equal(t.column(i), name), False),
                                                          pa.nulls(t.num_rows, pa.string()), t.column(i)))
    if "person_size" in t.column_names and t.num_rows:
        sizes = t.group_by("person").aggregate([("person", "count")])
        size = pc.take(sizes.column("person_count"), pc.index_in(t.column("person"), sizes.column("person")))
        t = t.set_column(t.column_names.index("person_size"), "person_size", size.cast(pa.int32()))
    write_table(uri, t)
    _, root = storage.resolve(uri)
    try:
        with fs.open_input_stream(f"{root}/_people.json") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        meta = None
    if meta is not None:
        meta["faces"] = t.num_rows
        meta["forgotten_faces"] = int(meta.get("forgotten_faces", 0)) + int(mask.sum())
        meta.get("names", {}).pop(name, None)
        if t.num_rows and "source_table" in meta:
            sheet = contact_sheet(t, meta["source_table"], meta, 40)
            write_text(uri, "_people.html", getattr(sheet, "html", sheet))
        write_text(uri, "_people.json", json.dumps(meta, indent=2))
    remove_index(uri)
    return int(mask.sum()), t.num_rows


def forget(name: str, labels_uri: str | None, table_uri: str | None = None, people_uri: str | None = None,
           output_uri: str | None = None, author: str | None = None,
           log: Callable[[str], None] = print) -> ForgetSummary:
    """The whole ``--forget``: checks first (one-line errors, nothing written), then the
    log row, then the tables (see the module docstring)."""
    from pipeline.people import read_people

    name = labels.clean_name(name)
    if not labels_uri:
        raise UsageError("--forget needs --labels (the forget row is what keeps NAME forgotten)")
    log_rows = labels.read(labels_uri)
    people = None
    if people_uri:
        people = read_people(people_uri)
        if people is None:
            raise UsageError(f"--people {people_uri}: no people table there (a cluster_faces.py output)")
    for flag, uri in (("--table", table_uri), ("--output", output_uri)):
        if uri and not storage.table_files(uri)[1]:
            raise UsageError(f"{flag} {uri}: no Parquet files there")
    gone, persons = faces_of(name, log_rows, people)
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
        removed, kept = scrub_people(people_uri, gone, name)
        line = f"{people_uri} (--people): {removed} face rows removed, {kept} kept; contact sheet redrawn"
        summary.rewritten.append(line)
        log(line)
    return summary
