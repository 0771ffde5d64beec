"""The ``people`` layout: named people of a ``cluster_faces.py`` output as training examples.

A person named in ``--names`` (CSV ``person,name``) gives every one of its faces to the
task ``identity`` under that name; several person ids may share a name (a person the
clustering split in two).  Embeddings come from the people table's source prediction
table (``_people.json``), joined on ``(image_uri, face_index)``: nothing is re-embedded,
so naming a few hundred people and retraining takes seconds of I/O, not an embedding pass.

Unnamed people are *strangers*: they never train a head, but the open-set rule is
calibrated against them (``heads.calibrate_with_strangers``).  They are split by person,
half for validation (thresholds) and half for a test measure, so the test strangers are
people the thresholds never saw.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.contract import UsageError
from pipeline.people import PeopleError, parquet_files
from pipeline.table import embedding_matrix
from pipeline.training.split import Encoded

MAX_STRANGERS = 50_000      # stranger faces kept per part (val, test): a seeded sample beyond
STRANGER_VAL_SHARE = 0.5    # share of stranger faces (whole people) used to pick thresholds
KEYS = ["image_uri", "face_index"]


class NamingError(UsageError):
    """The people layout cannot be read as asked (flags, names CSV, people or source table): exit 2."""


@dataclass
class NamedPeople:
    """Named faces (one row per face: image_uri, face_index, <task>) with their embeddings,
    and the strangers (split ``val``/``test`` by person) for the open-set calibration."""

    task: str
    table: pa.Table
    x: np.ndarray
    face_index: np.ndarray
    strangers: Encoded
    source_table: str
    named_people: int           # person ids named in the CSV
    stranger_people: int        # unnamed person ids
    stranger_faces: int         # their faces (before any sampling)
    missing: int                # faces of the people table without an embedding in the source
    names_source: str | None = None   # labels layout: the log (named_people counts names, strangers photos)

    def lines(self, names_uri: str) -> list[str]:
        if self.names_source:
            used = {p: int((self.strangers.split == p).sum()) for p in ("val", "test")}
            return [f"named faces:   {self.table.num_rows} faces named {self.named_people} ways in {self.names_source}",
                    f"embeddings:    read from {self.source_table} (none computed)",
                    f"strangers:     {self.stranger_faces} unnamed faces in {self.stranger_people} photos "
                    f"(used: {used['val']} validation, {used['test']} test)"]
        names = len(pc.unique(self.table.column(self.task)))
        used = {p: int((self.strangers.split == p).sum()) for p in ("val", "test")}
        return [f"named people:  {self.named_people} person ids named {names} ways in {names_uri}: "
                f"{self.table.num_rows} faces in {len(pc.unique(self.table.column('image_uri')))} photos",
                f"embeddings:    read from {self.source_table} (none computed)"
                + (f"; {self.missing} faces lacked one" if self.missing else ""),
                f"strangers:     {self.stranger_faces} faces of {self.stranger_people} unnamed people "
                f"(used: {used['val']} validation, {used['test']} test)"]


def check_flags(layout: str, names_uri: str | None, labels_uri: str | None = None) -> None:
    """``--names`` goes with ``--layout people`` and only with it; ``--layout labels`` needs
    ``--labels``, which otherwise goes only with ``--layout people`` (its names appended)."""
    if layout == "people" and not names_uri:
        raise NamingError("--layout people needs --names CSV (columns person,name)")
    if names_uri and layout != "people":
        raise NamingError(f"--names is for --layout people (got --layout {layout})")
    if layout == "labels" and not labels_uri:
        raise NamingError("--layout labels needs --labels URI (the labels log naming the table's faces)")
    if labels_uri and layout not in ("people", "labels"):
        raise NamingError(f"--labels is for --layout labels or people (got --layout {layout})")


def read_names(names_uri: str) -> pa.Table:
    """The CSV as (person, name) strings, blank rows dropped; one name per person."""
    import pyarrow.csv as pacsv

    try:
        fs, path = storage.resolve(names_uri)
        with fs.open_input_stream(path) as f:
            data = f.read()
        header = pacsv.read_csv(io.BytesIO(data)).column_names
        t = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=True))
    except (OSError, pa.ArrowInvalid) as exc:
        raise NamingError(f"--names {names_uri}: cannot read it as CSV: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    cols = {c.strip().lower(): c for c in t.column_names}
    if "person" not in cols or "name" not in cols:
        raise NamingError(f"--names {names_uri} needs columns person,name (has: {', '.join(t.column_names)})")
    t = pa.table({"person": pc.utf8_trim_whitespace(t.column(cols["person"])),
                  "name": pc.utf8_trim_whitespace(t.column(cols["name"]))})
    t = t.filter(pc.and_(pc.is_valid(t.column("person")), pc.is_valid(t.column("name"))))
    t = t.filter(pc.and_(pc.not_equal(t.column("person"), ""), pc.not_equal(t.column("name"), "")))
    t = t.group_by("person").aggregate([("name", "distinct")])
    clash = t.filter(pc.greater(pc.list_value_length(t.column("name_distinct")), 1))
    if clash.num_rows:
        p, n = clash.column("person")[0].as_py(), clash.column("name_distinct")[0].as_py()
        raise NamingError(f"--names {names_uri}: person {p} has {len(n)} names ({', '.join(sorted(n))}); "
                          f"{clash.num_rows} person(s) named twice")
    t = pa.table({"person": t.column("person"), "name": pc.list_element(t.column("name_distinct"), 0)})
    names = pc.unique(t.column("name"))
    if len(names) < 2:
        raise NamingError(f"--names {names_uri} gives {len(names)} name(s): an identity model needs at least 2")
    return t


def read_people_table(people_uri: str) -> tuple[pa.Table, str]:
    """(image_uri, face_index, person) of a cluster_faces.py output and its source table URI."""
    try:
        fs, files = parquet_files(people_uri)
    except PeopleError as exc:
        raise NamingError(f"--data {people_uri}: {exc}") from None
    if not files:
        raise NamingError(f"--data {people_uri}: no people table there (a cluster_faces.py output)")
    _, path = storage.resolve(people_uri)
    try:
        with fs.open_input_stream(f"{path}/_people.json") as f:
            meta = json.loads(f.read())
        source = meta["source_table"]
    except (OSError, ValueError, KeyError, TypeError):
        raise NamingError(f"--data {people_uri}: no readable _people.json naming the source table "
                          "(is it a cluster_faces.py output?)") from None
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    missing = {"image_uri", "face_index", "person"} - set(ds.schema.names)
    if missing:
        raise NamingError(f"--data {people_uri}: not a people table (no column {', '.join(sorted(missing))})")
    t = ds.to_table(columns=["image_uri", "face_index", "person"])
    t = t.cast(pa.schema([("image_uri", pa.string()), ("face_index", pa.int32()), ("person", pa.string())]))
    return t, source


def source_embeddings(source_uri: str, want: pa.Table, people_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the faces ``want`` (image_uri, face_index) from the source table, in
    ``want``'s order, and which rows were found.  Batch by batch: a hash join on the keys,
    then a take of the matched embeddings, so only the wanted faces are ever held."""
    where = f"source table {source_uri} (from {people_uri}/_people.json)"
    try:
        fs, files = parquet_files(source_uri)
    except PeopleError as exc:
        raise NamingError(f"{where}: {exc}") from None
    if not files:
        raise NamingError(f"{where}: no Parquet files")
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    missing = {"image_uri", "face_index", "embedding"} - set(ds.schema.names)
    if missing:
        raise NamingError(f"{where}: no embeddings (no column {', '.join(sorted(missing))})")
    flt = pc.is_valid(pc.field("embedding")) & pc.is_valid(pc.field("face_index"))
    if "status" in ds.schema.names:
        flt = flt & (pc.field("status") == "ok")
    keyed = want.select(KEYS).append_column("row", pa.array(np.arange(want.num_rows, dtype=np.int64)))
    x = np.zeros((want.num_rows, 128), np.float32)
    found = np.zeros(want.num_rows, bool)
    for batch in ds.to_batches(columns=[*KEYS, "embedding"], filter=flt):
        if not batch.num_rows:
            continue
        b = pa.table({"image_uri": batch.column("image_uri").cast(pa.string()),
                      "face_index": batch.column("face_index").cast(pa.int32()),
                      "pos": pa.array(np.arange(batch.num_rows, dtype=np.int64))})
        j = b.join(keyed, keys=KEYS, join_type="inner")
        if not j.num_rows:
            continue
        rows, first = np.unique(j.column("row").to_numpy(), return_index=True)  # a key twice: first row
        pos = j.column("pos").to_numpy()[first]
        x[rows] = embedding_matrix(batch.column("embedding").take(pa.array(pos)))
        found[rows] = True
    return x, found


def split_strangers(person: pa.Array, seed: int, val_share: float = STRANGER_VAL_SHARE,
                    cap: int = MAX_STRANGERS) -> np.ndarray:
    """'val'/'test' per stranger face, whole people to one side (about ``val_share`` of the
    faces to validation), then at most ``cap`` faces per side ('' for the rest)."""
    uniq, inv = np.unique(np.asarray(person.to_numpy(zero_copy_only=False), dtype=object), return_inverse=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    sizes = np.bincount(inv, minlength=len(uniq))[order]
    ends = np.cumsum(sizes)
    to_val = np.empty(len(uniq), bool)
    to_val[order] = (ends - sizes / 2) <= val_share * len(inv)     # a person goes where its middle falls
    part = np.where(to_val[inv], "val", "test").astype(object)
    for name in ("val", "test"):
        idx = np.flatnonzero(part == name)
        if len(idx) > cap:
            part[rng.choice(idx, len(idx) - cap, replace=False)] = ""
    return part


def read_named(layout: str, data_uri: str, names_uri: str | None, labels_uri: str | None, task: str = "identity",
               seed: int = 0, log: Callable[[str], None] = print) -> NamedPeople:
    """The ``people`` layout (``--names`` CSV; its names appended to ``--labels`` when given)
    or the ``labels`` layout (named faces of the labels log in a prediction table)."""
    if layout == "labels":
        return read_labelled_faces(data_uri, labels_uri or "", task, seed, log)
    named = read_named_people(data_uri, names_uri or "", task, seed, log)
    if labels_uri:
        append_names(named, labels_uri, names_uri or "", task, log)
    return named


def append_names(named: NamedPeople, labels_uri: str, names_uri: str, task: str, log: Callable[[str], None]) -> None:
    """``--layout people --labels L``: the CSV's names as ``name`` rows of the log, one per
    face (so they survive re-clustering)."""
    from pipeline import labels

    t = named.table
    rows = [labels.decisions(labels.NAME, n, zip(g.image_uri, g.face_index), author="train_classifier",
                             source=names_uri.rsplit("/", 1)[-1] or "names.csv")
            for n, g in t.to_pandas().groupby(task)]
    path = labels.append(labels_uri, pa.concat_tables(rows))
    log(f"labels log:    {t.num_rows} faces named in {labels_uri} ({path})")


def read_labelled_faces(table_uri: str, labels_uri: str, task: str = "identity", seed: int = 0,
                        log: Callable[[str], None] = print) -> NamedPeople:
    """The ``labels`` layout: every face the labels log names now (``labels.replay``) is an
    example of ``task`` with its embedding from the prediction table; the table's unnamed
    faces are the strangers (split by photo) for the open-set calibration."""
    from pipeline import labels
    from pipeline.people import read_faces

    state = labels.load(labels_uri)
    if state.named.empty:
        raise NamingError(f"--labels {labels_uri}: no named faces (name some first: --names, the review page, XMP)")
    try:
        faces = read_faces(table_uri)
    except PeopleError as exc:
        raise NamingError(f"--data {table_uri}: {exc}") from None
    keys = pa.table({"image_uri": faces.image_uri.cast(pa.string()), "face_index": pa.array(faces.face_index),
                     "row": pa.array(np.arange(len(faces), dtype=np.int64))})
    named = pa.table({"image_uri": pa.array(state.named.image_uri.astype(object), pa.string()),
                      "face_index": pa.array(state.named.face_index.to_numpy(np.int32), pa.int32()),
                      task: pa.array(state.named.name.astype(object), pa.string())})
    j = named.join(keys, keys=KEYS, join_type="left outer")
    lost = j.filter(pc.is_null(j.column("row")))
    if lost.num_rows:
        u, i = lost.column("image_uri")[0].as_py(), lost.column("face_index")[0].as_py()
        raise NamingError(f"--labels {labels_uri}: {lost.num_rows} named face(s) not in {table_uri} with an "
                          f"embedding (e.g. {u} face {i}): the log belongs to another table?")
    j = j.sort_by("row")
    if len(pc.unique(j.column(task))) < 2:
        raise NamingError(f"--labels {labels_uri} names {len(pc.unique(j.column(task)))} name(s): "
                          "an identity model needs at least 2")
    rows = j.column("row").to_numpy()
    stranger = np.ones(len(faces), bool)
    stranger[rows] = False
    s_rows = np.flatnonzero(stranger)
    photos = faces.image_uri.take(pa.array(s_rows))
    part = split_strangers(photos, seed) if len(s_rows) else np.array([], object)
    used = part != ""
    strangers = Encoded(faces.embedding[s_rows[used]], {task: np.full(int(used.sum()), -1, np.int64)}, part[used],
                        pc.filter(photos, pa.array(used)).to_pylist(), faces.face_index[s_rows[used]])
    table = j.select(["image_uri", "face_index", task])
    log(f"named faces:   {table.num_rows} faces named {len(pc.unique(table.column(task)))} ways in {labels_uri}; "
        f"embeddings read from {table_uri} (none computed); strangers: {len(s_rows)} unnamed faces")
    return NamedPeople(task, table, faces.embedding[rows], faces.face_index[rows], strangers, table_uri,
                       len(pc.unique(table.column(task))), len(pc.unique(photos)) if len(s_rows) else 0,
                       len(s_rows), 0, names_source=labels_uri)


def read_named_people(people_uri: str, names_uri: str, task: str = "identity", seed: int = 0,
                      log: Callable[[str], None] = print) -> NamedPeople:
    """Named faces and strangers of a people table, embeddings from its source table."""
    names = read_names(names_uri)
    people, source = read_people_table(people_uri)
    known = pc.unique(people.column("person"))
    absent = names.filter(pc.invert(pc.is_in(names.column("person"), known))).column("person").to_pylist()
    if absent:
        shown = ", ".join(sorted(absent)[:10]) + (", …" if len(absent) > 10 else "")
        raise NamingError(f"--names {names_uri}: {len(absent)} person(s) not in {people_uri}: {shown}")
    faces = people.join(names, keys="person", join_type="left outer")
    x, found = source_embeddings(source, faces, people_uri)
    named = pc.is_valid(faces.column("name")).to_numpy(zero_copy_only=False)
    missing = int((~found).sum())
    if missing:
        log(f"{missing} faces of {people_uri} have no embedding in {source} (skipped)")
    keep = named & found
    if not keep.any():
        raise NamingError(f"source table {source}: none of the named people's faces has an embedding there")
    t = faces.filter(pa.array(keep))
    table = pa.table({"image_uri": t.column("image_uri"), "face_index": t.column("face_index"),
                      task: t.column("name")})
    if len(pc.unique(table.column(task))) < 2:
        raise NamingError(f"only one named person has faces with embeddings in {source}: need at least 2 names")
    s_rows = np.flatnonzero(~named & found)
    s = faces.take(pa.array(s_rows))
    part = split_strangers(s.column("person").combine_chunks(), seed) if len(s_rows) else np.array([], object)
    used = part != ""
    strangers = Encoded(x[s_rows[used]], {task: np.full(int(used.sum()), -1, np.int64)}, part[used],
                        pc.filter(s.column("image_uri"), pa.array(used)).to_pylist(),
                        s.column("face_index").to_numpy()[used].astype(np.int32))
    return NamedPeople(task, table, x[keep], t.column("face_index").to_numpy().astype(np.int32), strangers, source,
                       names.num_rows, len(pc.unique(s.column("person"))) if len(s_rows) else 0,
                       len(s_rows), missing)
