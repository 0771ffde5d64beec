"""The review page's state and actions (DESIGN.md "Review page"), apart from HTTP.

What the page shows is the people table replayed with the labels log (``pipeline.labels``):

* a face's name is its own last ``name`` row, else the name most named faces of its
  cluster carry (a face takes its person's name) unless the face is marked ``not`` that name;
* a **named person** is every face bearing one name (so two clusters named alike — a merge —
  show as one person), referred to by ``name``;
* an **unnamed person** is the faces of one cluster that bear no name, referred to by its
  cluster id ``person`` (``p000042``); a face taken out of a named person falls back there.

Every action is written to the log at once as the face rows it covers (one whole file per
action, ``labels.append``: two reviewers never clash, the later row about a face wins):
name a person (``name`` rows for its faces, except those marked ``not`` that name), merge
(``name`` rows for every face of every person merged, with one name: a merge of unnamed
people needs one), take faces out (``not <name>`` rows), confirm / reject suggestions
(``name`` / ``not`` rows), forget a name (one ``forget`` row).

The log is re-listed at most every ``refresh_s`` seconds (another reviewer's writes show
after that) and at once after this replica's own writes; only new files are read.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse

from pipeline import labels

THUMB_ROUTE = "/v1/faces/thumbnail"


class ReviewError(Exception):
    """A request the review state cannot answer (unknown person, empty name, a face not in
    the table): the client's mistake, sent as a 4xx with this reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def thumbnail_url(image_uri: str, face_index: int, size: int) -> str:
    return f"{THUMB_ROUTE}?" + urlencode({"image_uri": image_uri, "face_index": int(face_index), "size": int(size)})


@dataclass
class Faces:
    """Every face of the table with its cluster, sorted by (image_uri, face_index)."""

    image_uri: np.ndarray      # object (str)
    face_index: np.ndarray     # int32
    person: np.ndarray         # int64 cluster number (p000042 → 42); 0: in no cluster
    embedding: np.ndarray      # float32 N×128, unit rows
    bbox: np.ndarray | None    # float32 N×4 (x, y, w, h), photo pixels
    _keys: pa.Table | None = field(default=None, repr=False)
    _people: pa.Table | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.face_index)

    @property
    def key_table(self) -> pa.Table:
        """(image_uri, face_index) of every face, in order."""
        if self._keys is None:
            self._keys = pa.table({"image_uri": pa.array(self.image_uri, pa.string()),
                                   "face_index": pa.array(self.face_index, pa.int32())})
        return self._keys

    @property
    def people_table(self) -> pa.Table:
        """(image_uri, face_index, person) of the faces in a cluster: the people table's rows."""
        if self._people is None:
            inside = self.person > 0
            self._people = self.key_table.filter(pa.array(inside)).append_column(
                "person", pa.array([pid(p) for p in self.person[inside]], pa.string()))
        return self._people

    @classmethod
    def load(cls, table_uri: str, people_uri: str) -> "Faces":
        """The table's faces (``pipeline.people.read_faces``) joined to the people table's clusters."""
        from pipeline.people import person_numbers, read_faces, read_people

        faces = read_faces(table_uri, with_bbox=True)
        people = read_people(people_uri)
        if people is None:
            raise ReviewError(404, f"{people_uri}: no people table (run cluster_faces.py)")
        n = len(faces)
        left = pa.table({"image_uri": faces.image_uri, "face_index": pa.array(faces.face_index, pa.int32()),
                         "row": pa.array(np.arange(n, dtype=np.int64))})
        right = people.select(["image_uri", "face_index", "person"]).cast(
            pa.schema([("image_uri", pa.string()), ("face_index", pa.int32()), ("person", pa.string())]))
        joined = left.join(right, ["image_uri", "face_index"], join_type="inner")
        person = np.zeros(n, np.int64)
        person[joined.column("row").to_numpy()] = person_numbers(joined.column("person"))
        return cls(np.asarray(faces.image_uri.to_pylist(), dtype=object), faces.face_index, person,
                   faces.embedding, faces.bbox)

    def positions(self, faces: Iterable[tuple[str, int]]) -> np.ndarray:
        """Row numbers of the given faces; a face not in the table is a ``ReviewError``."""
        out = []
        for uri, idx in faces:
            lo = int(np.searchsorted(self.image_uri, uri, side="left"))
            hi = int(np.searchsorted(self.image_uri, uri, side="right"))
            hit = np.flatnonzero(self.face_index[lo:hi] == int(idx))
            if not len(hit):
                raise ReviewError(404, f"face not in the table: {uri} #{idx}")
            out.append(lo + int(hit[0]))
        return np.asarray(out, np.int64)

    def keys(self, rows: np.ndarray) -> list[tuple[str, int]]:
        return [(str(self.image_uri[r]), int(self.face_index[r])) for r in rows]


def pid(num: int) -> str:
    """42 → "p000042" (``pipeline.people.person_strings``' format)."""
    return f"p{int(num):06d}"


@dataclass
class View:
    """One replay of the log over the faces: who each face is now, and the people listed."""

    name: np.ndarray            # object: each face's current name (None: unnamed)
    entry: np.ndarray           # int64: each face's listed person (-1: none)
    names: list[str]            # entry i < len(names) is the named person names[i]
    clusters: np.ndarray        # entry j ≥ len(names) is cluster clusters[j - len(names)] (its unnamed faces)
    size: np.ndarray            # faces per entry
    order: np.ndarray           # entries as listed: unnamed first, then largest first
    members: np.ndarray         # face rows grouped by entry, most typical first
    starts: np.ndarray          # entry e's faces are members[starts[e]:starts[e + 1]]
    similarity: np.ndarray      # each face's cosine to its entry's centre
    centres: np.ndarray         # entry centres (unit rows)
    rejected: dict[str, np.ndarray] = field(default_factory=dict)  # name → face rows marked `not` it
    version: int = 0

    @property
    def n_named(self) -> int:
        return len(self.names)

    def faces_of(self, e: int) -> np.ndarray:
        return self.members[self.starts[e]:self.starts[e + 1]]


def build_view(faces: Faces, state: labels.LabelState, version: int = 0) -> View:
    """Faces + the replayed log → the people the page lists (rules in the module docstring)."""
    from pipeline.people.names import face_names

    n = len(faces)
    rejected: dict[str, np.ndarray] = {}
    if len(state.rejected):
        rows, keep = _rows_of(faces, state.rejected)
        for nm, grp in pd.Series(rows).groupby(state.rejected.name.to_numpy()[keep]):
            rejected[str(nm)] = np.sort(grp.to_numpy(np.int64))
    # who each face is: pipeline.people.names' rules, shared with the people job, label_table and XMP
    name = np.asarray(face_names(faces.key_table, faces.people_table, state).column("name").to_numpy(zero_copy_only=False),
                      dtype=object)
    named = name != None  # noqa: E711
    names, code = np.unique(name[named].astype(str), return_inverse=True) if named.any() else (np.array([], str), None)
    entry = np.full(n, -1, np.int64)
    if code is not None:
        entry[named] = code
    loose = ~named & (faces.person > 0)
    clusters, pcode = np.unique(faces.person[loose], return_inverse=True)
    entry[loose] = len(names) + pcode
    n_entries = len(names) + len(clusters)
    size = np.bincount(entry[entry >= 0], minlength=n_entries)
    # centres and each face's cosine to its entry's centre: "most typical first"
    listed = np.flatnonzero(entry >= 0)
    starts = np.r_[0, np.cumsum(size)].astype(np.int64)
    # per-entry sums as one sparse (entries × faces) product: ~10× np.add.reduceat over 20k segments
    members_of = sparse.csr_matrix((np.ones(len(listed), np.float32), (entry[listed], listed)), shape=(n_entries, n))
    centres = np.asarray(members_of @ faces.embedding, np.float32)
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    similarity = np.zeros(n, np.float32)
    similarity[listed] = np.einsum("ij,ij->i", faces.embedding[listed], centres[entry[listed]])
    members = listed[np.lexsort((listed, -similarity[listed], entry[listed]))]
    is_named = np.r_[np.ones(len(names), bool), np.zeros(len(clusters), bool)]
    tie = np.r_[np.arange(len(names)), clusters].astype(np.int64)
    order = np.lexsort((tie, -size, is_named))
    order = order[size[order] > 0]
    return View(name, entry, [str(s) for s in names], clusters, size, order, members, starts, similarity,
                centres, rejected, version)


def _rows_of(faces: Faces, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Face rows of a (image_uri, face_index, …) frame, and which of its rows are in the table."""
    uris = df.image_uri.to_numpy(dtype=object)
    idx = df.face_index.to_numpy().astype(np.int64)
    lo = np.searchsorted(faces.image_uri, uris, side="left")
    hi = np.searchsorted(faces.image_uri, uris, side="right")
    rows = np.full(len(df), -1, np.int64)
    for i in np.flatnonzero(hi > lo):  # a photo has few faces: a short scan each
        hit = np.flatnonzero(faces.face_index[lo[i]:hi[i]] == idx[i])
        if len(hit):
            rows[i] = lo[i] + hit[0]
    keep = rows >= 0
    return rows[keep], keep


class LabelLog:
    """The labels log as this replica knows it: files read once each (``refresh``: listed
    ones; ``add``: this replica's own), replayed when asked and changed (``replayed``)."""

    def __init__(self, uri: str | None, refresh_s: float = 1.0) -> None:
        self.uri, self.refresh_s = uri, refresh_s
        self._seen: set[str] = set()
        self._parts: list[pa.Table] = []
        self._lock = threading.Lock()       # guards _parts / _seen / files
        self._checked = -1e9
        self.files = 0                      # files known: a view is current when built from all of them
        self._state = (0, labels.replay(labels.SCHEMA.empty_table()))

    def refresh(self, force: bool = False) -> None:
        """Read files new since the last look (every ``refresh_s`` at most unless forced)."""
        if not self.uri or (not force and time.monotonic() - self._checked < self.refresh_s):
            return
        self._checked = time.monotonic()
        fs, files = labels.log_files(self.uri)
        with self._lock:
            new = [f for f in files if f not in self._seen]
        for path in new:
            try:
                t = pq.read_table(path, filesystem=fs).select(labels.SCHEMA.names).cast(labels.SCHEMA)
            except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
                raise labels.LabelsError(f"labels log {self.uri}: cannot read {path.rsplit('/', 1)[-1]}: {exc}") from exc
            self._take(path, t)

    def add(self, path: str, rows: pa.Table) -> int:
        """This replica's own new file, known without listing or reading it back; the number
        of files known with it (a view built from that many shows it)."""
        return self._take(path, labels.validate(rows))

    def _take(self, path: str, rows: pa.Table) -> int:
        with self._lock:
            if path not in self._seen:
                self._seen.add(path)
                self._parts.append(rows)
                self.files += 1
            return self.files

    def replayed(self) -> tuple[int, labels.LabelState]:
        """(files, state): every file known so far, replayed in ``at`` order (as ``labels.read``:
        then file order, then row)."""
        with self._lock:
            files, parts = self.files, list(self._parts)
        if files == self._state[0]:
            return self._state
        log = pa.concat_tables(parts) if parts else labels.SCHEMA.empty_table()
        with self._lock:
            self._parts = [log] + self._parts[len(parts):]
        log = log.take(pa.array(np.argsort(log.column("at").cast(pa.int64()).to_numpy(), kind="stable")))
        self._state = (files, labels.replay(log))
        return self._state

    @property
    def state(self) -> labels.LabelState:
        return self._state[1]


class Review:
    """People + labels log: what the page lists, and the acts it writes."""

    def __init__(self, faces: Faces, labels_uri: str | None, refresh_s: float = 1.0) -> None:
        self.faces = faces
        self.log = LabelLog(labels_uri, refresh_s)
        self._lock = threading.Lock()       # one view rebuild at a time
        self.log.refresh(force=True)
        files, state = self.log.replayed()
        self._view = build_view(faces, state, files)

    @classmethod
    def load(cls, table_uri: str, people_uri: str, labels_uri: str | None, refresh_s: float = 1.0) -> "Review":
        return cls(Faces.load(table_uri, people_uri), labels_uri, refresh_s)

    # ------------------------------------------------------------ state

    def view(self, force: bool = False, files: int = 0) -> View:
        """The current view (the log re-listed when ``refresh_s`` has passed, or ``force``).
        A read that finds another request rebuilding gets the view before that rebuild rather
        than waiting; ``files``: wait for a view built from at least that many log files (an
        act's answer shows the act; acts queued behind one rebuild share the next one)."""
        if not force and not files and not self._lock.acquire(blocking=False):
            return self._view
        if force or files:
            self._lock.acquire()
        try:
            if files and self._view.version >= files:
                return self._view  # another act's rebuild already shows this one
            self.log.refresh(force)
            if self._view.version != self.log.files:
                n, state = self.log.replayed()
                self._view = build_view(self.faces, state, n)
            return self._view
        finally:
            self._lock.release()

    def _entry(self, v: View, person: str | None = None, name: str | None = None) -> int:
        """The listed person of a reference: ``name`` (a named person) or ``person`` (a cluster
        id: its unnamed faces; when it has none left, the named person most of its faces joined)."""
        if (person is None) == (name is None):
            raise ReviewError(400, "give exactly one of person (a cluster id, p000042) or name")
        if name is not None:
            name = _clean(name)
            i = int(np.searchsorted(v.names, name)) if v.names else 0
            if i < len(v.names) and v.names[i] == name:
                return i
            raise ReviewError(404, f"no person is named {name!r}")
        num = _person_number(person)
        j = int(np.searchsorted(v.clusters, num))
        if j < len(v.clusters) and v.clusters[j] == num:
            return v.n_named + j
        rows = np.flatnonzero(self.faces.person == num)
        if not len(rows):
            raise ReviewError(404, f"unknown person {person!r}: not in the people table")
        return int(np.bincount(v.entry[rows][v.entry[rows] >= 0]).argmax())

    def _face_json(self, v: View, rows: np.ndarray, size: int) -> list[dict[str, Any]]:
        f = self.faces
        return [{"image_uri": str(f.image_uri[r]), "face_index": int(f.face_index[r]),
                 "similarity": round(float(v.similarity[r]), 4),
                 "person": pid(f.person[r]) if f.person[r] > 0 else None, "name": v.name[r],
                 "thumbnail": thumbnail_url(f.image_uri[r], f.face_index[r], size)} for r in rows]

    def _entry_json(self, v: View, e: int, n_faces: int, size: int) -> dict[str, Any]:
        rows = v.faces_of(e)
        clusters = self.faces.person[rows]
        ids, counts = np.unique(clusters[clusters > 0], return_counts=True)
        main = ids[np.lexsort((ids, -counts))] if len(ids) else ids
        return {"person": pid(main[0]) if len(main) else None,
                "name": v.names[e] if e < v.n_named else None,
                "size": int(v.size[e]), "people": [pid(p) for p in main[:20]],
                "faces": self._face_json(v, rows[:n_faces], size)}

    # ------------------------------------------------------------ reads

    def people(self, offset: int = 0, limit: int = 50, faces: int = 4, size: int = 96,
               which: str = "all") -> dict[str, Any]:
        """Listed people, unnamed first, then largest first, each with its most typical faces;
        ``which``: ``all``, ``named`` or ``unnamed`` only."""
        v = self.view()
        if which not in ("all", "named", "unnamed"):
            raise ReviewError(400, f"which must be all, named or unnamed, got {which!r}")
        order = v.order if which == "all" else v.order[(v.order < v.n_named) == (which == "named")]
        page = order[offset:offset + limit]
        total = len(order)
        return {"people": [self._entry_json(v, int(e), faces, size) for e in page], "total": total,
                "offset": offset, "limit": limit,
                "next_offset": offset + limit if offset + limit < total else None}

    def person(self, person: str | None = None, name: str | None = None, offset: int = 0, limit: int = 60,
               size: int = 128) -> dict[str, Any]:
        """One person's faces, most typical first, paged."""
        v = self.view()
        e = self._entry(v, person, name)
        rows = v.faces_of(e)
        out = self._entry_json(v, e, 0, size)
        out.update(faces=self._face_json(v, rows[offset:offset + limit], size), offset=offset, limit=limit,
                   next_offset=offset + limit if offset + limit < len(rows) else None)
        return out

    def names(self) -> dict[str, Any]:
        v = self.view()
        return {"names": list(v.names)}

    def progress(self) -> dict[str, Any]:
        v = self.view()
        in_people = int((self.faces.person > 0).sum())
        named = int((v.name != None).sum())  # noqa: E711
        unnamed_sizes = v.size[v.n_named:]
        return {"faces": len(self.faces), "faces_named": named, "faces_left": in_people - int(
            ((v.name != None) & (self.faces.person > 0)).sum()),  # noqa: E711
                "people_named": v.n_named, "people_left": int((unnamed_sizes > 0).sum()),
                "people_left_2plus": int((unnamed_sizes > 1).sum()), "labels_rows": self.log.state.rows}

    def suggestions(self, name: str, limit: int = 24, people: int = 6, size: int = 128) -> dict[str, Any]:
        """For a named person: unnamed faces (not marked ``not`` it) and unnamed people nearest
        its centre, best first."""
        v = self.view()
        e = self._entry(v, name=name)
        name = v.names[e]
        c = v.centres[e]
        cand = v.name == None  # noqa: E711
        cand[v.rejected.get(name, np.zeros(0, np.int64))] = False
        rows = np.flatnonzero(cand)
        sims = self.faces.embedding[rows] @ c
        k = min(limit, len(rows))
        top = np.argpartition(-sims, k - 1)[:k] if 0 < k < len(rows) else np.arange(len(rows))
        top = top[np.argsort(-sims[top], kind="stable")]
        faces_out = self._face_json(v, rows[top], size)
        for f, s in zip(faces_out, sims[top]):
            f["similarity"] = round(float(s), 4)
        unnamed = np.arange(v.n_named, len(v.size))
        unnamed = unnamed[v.size[unnamed] > 1]  # a person of one face is already among the faces
        psims = v.centres[unnamed] @ c if len(unnamed) else np.zeros(0, np.float32)
        best = np.argsort(-psims, kind="stable")[:people]
        people_out = []
        for i in best:
            entry = self._entry_json(v, int(unnamed[i]), 4, 96)
            entry["similarity"] = round(float(psims[i]), 4)
            people_out.append(entry)
        return {"name": name, "faces": faces_out, "people": people_out}

    def box(self, image_uri: str, face_index: int) -> tuple[float, float, float, float] | None:
        """A face's bbox (photo pixels); ``ReviewError`` 404 when the face is not in the table."""
        (r,) = self.faces.positions([(image_uri, face_index)])
        return None if self.faces.bbox is None else tuple(float(x) for x in self.faces.bbox[r])

    # ------------------------------------------------------------ acts (each one log file)

    def _write(self, rows: list[pa.Table]) -> dict[str, Any]:
        if not self.log.uri:
            raise ReviewError(409, "no labels log configured: start the endpoint with --labels URI to save decisions")
        rows = [r for r in rows if r.num_rows]
        if not rows:
            return {"written": 0, "labels_file": None}
        table = pa.concat_tables(rows)
        path = labels.append(self.log.uri, table)
        self.view(files=self.log.add(path, table))  # the act's answer comes with a view that shows it
        shown = f"s3://{path}" if self.log.uri.startswith("s3://") else path
        return {"written": table.num_rows, "labels_file": shown}

    def name_person(self, name: str, person: str | None = None, current: str | None = None,
                    author: str | None = None) -> dict[str, Any]:
        """``name`` rows for every face of the person (``person`` id or ``current`` name),
        except the faces marked ``not`` that name."""
        name = _clean(name)
        v = self.view()
        rows = v.faces_of(self._entry(v, person, current))
        rows = np.setdiff1d(rows, v.rejected.get(name, np.zeros(0, np.int64)))
        if not len(rows):
            raise ReviewError(409, f"every face of that person is marked 'not {name}'")
        out = self._write([labels.decisions(labels.NAME, name, self.faces.keys(rows), author=author,
                                            source="review")])
        return {**out, "name": name}

    def merge(self, people: list[dict[str, str | None]], name: str | None = None,
              author: str | None = None) -> dict[str, Any]:
        """One name for every face of the given people (each ``{"person"}`` or ``{"name"}``).
        Without ``name``: the one name among them; unnamed people alone need ``name``."""
        if len(people) < 2:
            raise ReviewError(400, "a merge needs at least two people")
        v = self.view()
        entries = [self._entry(v, p.get("person"), p.get("name")) for p in people]
        if len(set(entries)) < 2:
            raise ReviewError(400, "those references are one person already")
        have = sorted({v.names[e] for e in entries if e < v.n_named})
        if name is None or not str(name).strip():
            if len(have) != 1:
                raise ReviewError(400, "merging unnamed people needs a name" if not have else
                                  f"the people are named {', '.join(map(repr, have))}: say which name to keep")
            name = have[0]
        name = _clean(name)
        rows = np.concatenate([v.faces_of(e) for e in entries])
        rows = np.setdiff1d(rows, v.rejected.get(name, np.zeros(0, np.int64)))
        out = self._write([labels.decisions(labels.NAME, name, self.faces.keys(rows), author=author,
                                            source="review")])
        return {**out, "name": name}

    def decide(self, name: str, confirm: list[tuple[str, int]] = (), reject: list[tuple[str, int]] = (),
               author: str | None = None) -> dict[str, Any]:
        """Faces confirmed as ``name`` (``name`` rows) and faces that are not ``name``
        (``not`` rows: taking faces out of a person, rejecting suggestions) — one log file."""
        name = _clean(name)
        if not confirm and not reject:
            raise ReviewError(400, "no faces given (confirm / reject)")
        both = {(u, int(i)) for u, i in confirm} & {(u, int(i)) for u, i in reject}
        if both:
            u, i = sorted(both)[0]
            raise ReviewError(400, f"a face cannot be confirmed and rejected at once: {u} #{i}")
        ok = self.faces.keys(self.faces.positions(confirm))
        no = self.faces.keys(self.faces.positions(reject))
        rows = []
        if ok:
            rows.append(labels.decisions(labels.NAME, name, ok, author=author, source="review"))
        if no:
            rows.append(labels.decisions(labels.NOT, name, no, author=author, source="review"))
        out = self._write(rows)
        return {**out, "name": name, "confirmed": len(ok), "rejected": len(no)}

    def forget(self, name: str, author: str | None = None) -> dict[str, Any]:
        """A ``forget`` row: the name is gone from every face (until named again)."""
        name = _clean(name)
        v = self.view()
        if name not in set(v.names) and name not in self.log.state.names():
            raise ReviewError(404, f"no person is named {name!r}")
        out = self._write([labels.decisions(labels.FORGET, name, author=author, source="review")])
        return {**out, "name": name}


def _clean(name: Any) -> str:
    try:
        return labels.clean_name(name)
    except labels.LabelsError as exc:
        raise ReviewError(400, str(exc)) from None


def _person_number(person: str) -> int:
    s = str(person).strip()
    if len(s) < 2 or s[0] != "p" or not s[1:].isdigit():
        raise ReviewError(404, f"unknown person {person!r}: ids look like p000042")
    return int(s[1:])
