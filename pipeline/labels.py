"""The labels log: every naming decision, appended, never rewritten (DESIGN.md "Names").

Why a log and not a names file: a person id changes when faces are re-clustered, a face
does not.  So every decision is kept per face (``image_uri``, ``face_index``), and the
current state is the replay of all decisions in ``at`` order; a person-level act (name a
person, merge two, take a face out) is written as the face rows it covers.

Layout: ``<URI>/labels-<UTC time>-<random>.parquet``, each written whole
(``storage.put_atomic``: a reader sees a file entirely or not at all), so concurrent
writers (two reviewers, an import) never clash and a killed writer leaves nothing half
written.  ``pandas.read_parquet(URI)`` reads the whole log.

Replay rules (``replay``):
- ``name`` X on a face: the face is X (a later row about the same face wins);
- ``not`` X on a face: the face is not X (it loses the name X if it had it, and the people
  job never puts it in X's person);
- ``forget`` X: every earlier ``name``/``not`` row about X is void, and X stays forgotten
  until a new ``name`` X row comes after the ``forget``.
"""
from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.contract import UsageError

NAME, NOT, FORGET = "name", "not", "forget"
ACTIONS = (NAME, NOT, FORGET)
SCHEMA = pa.schema([
    pa.field("at", pa.timestamp("ms", tz="UTC")),
    pa.field("action", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("face_index", pa.int32()),
    pa.field("name", pa.string()),
    pa.field("author", pa.string()),
    pa.field("source", pa.string()),
])
FILE_RE = re.compile(r"^labels-.+\.parquet$")
MAX_NAME = 200


class LabelsError(UsageError):
    """The labels log cannot be read or a decision is malformed: one line, exit 2."""


def clean_name(name: object) -> str:
    """A name as stored: surrounding blanks dropped, inner runs of blanks made one space.
    Empty, over-long or control-character names are refused (a 4xx over HTTP)."""
    if not isinstance(name, str):
        raise LabelsError(f"a name must be text, got {name!r}")
    s = " ".join(name.split())
    if not s:
        raise LabelsError("a name cannot be empty")
    if len(s) > MAX_NAME:
        raise LabelsError(f"a name is at most {MAX_NAME} characters (got {len(s)})")
    if any(ord(c) < 32 for c in s):
        raise LabelsError(f"a name cannot hold control characters: {s!r}")
    return s


def decisions(action: str, name: str, faces: Iterable[tuple[str, int]] = (), *,
              author: str | None = None, source: str | None = None,
              at: dt.datetime | None = None) -> pa.Table:
    """Log rows of one act: ``action`` about ``name`` for each face (none for ``forget``)."""
    if action not in ACTIONS:
        raise LabelsError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    name = clean_name(name)
    faces = [] if action == FORGET else list(faces)
    if action != FORGET and not faces:
        raise LabelsError(f"a {action!r} decision needs at least one face")
    when = at or dt.datetime.now(dt.timezone.utc)
    n = max(len(faces), 1)
    return pa.table({
        "at": pa.array([when] * n, SCHEMA.field("at").type),
        "action": [action] * n,
        "image_uri": [u for u, _ in faces] if faces else [None],
        "face_index": pa.array([int(i) for _, i in faces] if faces else [None], pa.int32()),
        "name": [name] * n,
        "author": [author] * n,
        "source": [source] * n,
    }, schema=SCHEMA)


def validate(rows: pa.Table) -> pa.Table:
    """Rows cast to the log's schema, checked: known actions, clean names, a face on every
    face-level row and none on ``forget`` rows."""
    missing = {"action", "name"} - set(rows.column_names)
    if missing:
        raise LabelsError(f"labels rows lack column(s) {', '.join(sorted(missing))}")
    df = rows.to_pandas()
    now = pd.Timestamp.now(tz="UTC")
    if "at" not in df:
        df["at"] = now
    for col in ("image_uri", "face_index", "author", "source"):
        if col not in df:
            df[col] = None
    bad = ~df.action.isin(ACTIONS)
    if bad.any():
        raise LabelsError(f"unknown action {df.action[bad].iloc[0]!r} (one of {', '.join(ACTIONS)})")
    df["name"] = [clean_name(n) for n in df.name]
    face = df.action != FORGET
    if (face & (df.image_uri.isna() | df.face_index.isna())).any():
        raise LabelsError("a name/not decision needs image_uri and face_index")
    if (~face & df.image_uri.notna()).any():
        raise LabelsError("a forget decision is about a name, not a face: image_uri must be null")
    df["at"] = pd.to_datetime(df["at"], utc=True).fillna(now)
    df["face_index"] = df.face_index.astype("Int32")
    return pa.Table.from_pandas(df[SCHEMA.names], schema=SCHEMA, preserve_index=False)


def append(uri: str, rows: pa.Table) -> str | None:
    """Write ``rows`` as one new log file (created whole, never rewritten); its path, or
    None when there was nothing to write.  The first writer creates the log."""
    rows = validate(rows)
    if rows.num_rows == 0:
        return None
    fs, root = storage.resolve(uri)
    try:
        fs.create_dir(root, recursive=True)
    except OSError as exc:
        raise LabelsError(f"cannot write the labels log {uri}: {exc}") from exc
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = f"{root}/labels-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    storage.put_parquet(fs, path, rows)
    return path


def log_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The log's files (whole ones only: ``labels-*.parquet``; in-progress files are hidden)."""
    fs, root = storage.resolve(uri)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            return fs, []
        if info.type == pafs.FileType.File:
            raise LabelsError(f"{uri}: the labels log is a folder or s3:// prefix, not a file")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise LabelsError(f"cannot read the labels log {uri}: {exc}") from exc
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and FILE_RE.match(i.path.rsplit("/", 1)[-1]))


def read(uri: str | None) -> pa.Table:
    """The whole log in replay order (``at``, then file, then row); empty when it does not
    exist yet.  A file that is not a labels file is a ``LabelsError`` naming it."""
    if not uri:
        return SCHEMA.empty_table()
    fs, files = log_files(uri)
    parts = []
    for path in files:
        try:
            t = pq.read_table(path, filesystem=fs)
            parts.append(t.select(SCHEMA.names).cast(SCHEMA))
        except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
            raise LabelsError(f"labels log {uri}: cannot read {path.rsplit('/', 1)[-1]}: {exc}") from exc
    if not parts:
        return SCHEMA.empty_table()
    t = pa.concat_tables(parts)
    # a stable sort keeps file (name-ordered by time) and row order among equal times
    return t.take(pa.array(np.argsort(t.column("at").cast(pa.int64()).to_numpy(), kind="stable")))


@dataclass
class LabelState:
    """The log replayed: what is decided now."""

    named: pd.DataFrame       # image_uri, face_index, name: each face's current name
    rejected: pd.DataFrame    # image_uri, face_index, name: "this face is not name"
    forgotten: set[str]       # names forgotten and not named again since
    rows: int = 0             # log rows replayed

    def names(self) -> list[str]:
        """Names in use, sorted (what the review page offers)."""
        return sorted(set(self.named.name))


KEYS = ["image_uri", "face_index"]


def replay(log: pa.Table) -> LabelState:
    """The current decisions of a log read by ``read`` (rules in the module docstring)."""
    df = log.to_pandas()
    empty = pd.DataFrame({"image_uri": pd.Series(dtype=str), "face_index": pd.Series(dtype="int32"),
                          "name": pd.Series(dtype=str)})
    if df.empty:
        return LabelState(empty, empty.copy(), set(), 0)
    df["seq"] = np.arange(len(df))
    forgets = df[df.action == FORGET].groupby("name").seq.max()
    faces = df[df.action != FORGET].copy()
    faces = faces[faces.seq > faces.name.map(forgets).fillna(-1)]      # void before a forget
    named_after = set(faces[faces.action == NAME].name)
    forgotten = set(forgets.index) - named_after
    faces["face_index"] = faces.face_index.astype("int32")
    faces = faces.sort_values("seq")
    # a face is not X while its last row about X is a `not`
    per_name = faces.groupby(KEYS + ["name"], sort=False).tail(1)
    rejected = per_name[per_name.action == NOT][KEYS + ["name"]]
    # a face's name: its last `name` row, unless a later `not` about that name undid it
    last = faces[faces.action == NAME].groupby(KEYS, sort=False).tail(1)
    undone = last.merge(rejected, on=KEYS + ["name"], how="left", indicator=True)["_merge"] == "both"
    named = last[~undone.to_numpy()][KEYS + ["name"]]
    return LabelState(named.reset_index(drop=True), rejected.reset_index(drop=True), forgotten, len(df))


def load(uri: str | None) -> LabelState:
    """``replay(read(uri))``: the state a job starts from."""
    return replay(read(uri))
