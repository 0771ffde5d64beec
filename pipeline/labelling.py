"""label_table.py: a prediction table with ``person`` and ``name`` on every face, and with a
frozen-feature bundle's tasks applied to the **stored embeddings** (DESIGN.md "Names").

Why: a name is a label computed from an embedding the table already holds.  Scoring again
(`score_directory.py --model`) decodes, detects and embeds every photo once more; here each
part file of the table is read, labelled and written in a Ray task (a 10^7-row table is a
cluster job), with ``ModelBundle.predict`` — the implementation scoring uses, with its
open-set rule and per-photo exclusivity (video tracks through ``video.decide_tracks``).

Writing: the new part files go to a hidden ``_label_table-<run>/`` folder under the output
(readers skip ``_`` names), and only once every task has finished and the input checked out
are they moved into place and the previous part files removed (a Ctrl-C waits for that
step).  A run killed before then leaves the previous output as it was, readable.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import labels, stopping, storage
from pipeline.contract import ATTRIBUTE_TASKS, CLASSIFICATION, REGRESSION, UNKNOWN, UsageError

STAGING = "_label_table-"


class LabelTableError(UsageError):
    """label_table.py cannot run as asked: one line, exit 2, nothing written."""


@dataclass
class LabelSummary:
    rows: int = 0
    faces: int = 0
    files: int = 0
    named_faces: int = 0
    people: int = 0                     # distinct persons on the table's faces
    names: dict[str, int] = field(default_factory=dict)   # faces per name
    model_version: str | None = None
    tasks: list[str] = field(default_factory=list)
    unknown: dict[str, int] = field(default_factory=dict)  # open-set tasks: faces left unknown
    seconds: float = 0.0
    output: str = ""
    log_rows: int = 0

    def lines(self) -> list[str]:
        rate = self.rows / self.seconds if self.seconds else 0.0
        top = sorted(self.names.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{n} {c}" for n, c in top[:8]) + (f", … ({len(top)} names)" if len(top) > 8 else "")
        out = [f"rows:          {self.rows} ({self.faces} faces) in {self.files} part files",
               f"people:        {self.people} persons on the faces; {self.named_faces} faces named"
               + (f": {shown}" if shown else "") + f" ({self.log_rows} labels log rows replayed)"]
        if self.model_version:
            unk = ", ".join(f"{t} {n} unknown" for t, n in self.unknown.items())
            out.append(f"model:         {self.model_version}, tasks {', '.join(self.tasks)} from the stored "
                       f"embeddings (no photo read)" + (f"; {unk}" if unk else ""))
        out.append(f"throughput:    {rate:,.0f} rows/s over {self.seconds:.1f} s")
        out.append(f"output:        {self.output}")
        return out


# ------------------------------------------------------------------ the bundle, checked


def frozen_bundle(model_uri: str, columns: list[str]):
    """The bundle, when its every task can be answered from stored embeddings; else a
    ``LabelTableError`` that says what to run instead."""
    from pipeline.heads import IDENTITY, ModelBundle

    bundle = ModelBundle.load(model_uri)
    if bundle.tuned_backbone is not None or bundle.tuned_networks:
        raise LabelTableError(f"--model {model_uri} is a fine-tuned bundle: its heads read its own backbone's "
                              "output on the face chips, which the table does not store; label the photos with "
                              f"score_directory.py --model {model_uri} instead")
    for s in bundle.specs:
        if s.features != IDENTITY and not (s.prefer_builtin and s.name in columns):
            raise LabelTableError(f"--model {model_uri}: task {s.name!r} reads the {s.features} network's features, "
                                  "which the table does not store; label the photos with "
                                  f"score_directory.py --model {model_uri} instead")
    return bundle


def output_tasks(schema: pa.Schema, bundle) -> list[tuple[str, str]]:  # noqa: ANN001
    """The task columns of the labelled table.  With a bundle: the table's built-in
    attributes (unless a bundle task replaces them), then the bundle's tasks
    (``predict.table_tasks``, the prediction table's rule; an older model's columns go with
    its ``model_version``).  Without: the table's own task columns, as they are."""
    from pipeline.predict import table_tasks
    from pipeline.table import BASE_FIELDS, VIDEO_FIELDS

    columns = schema.names
    if bundle is not None:
        builtin = all(n in columns for n, _ in ATTRIBUTE_TASKS)
        return table_tasks(builtin, bundle.tasks)
    fixed = {f.name for f in (*BASE_FIELDS, *VIDEO_FIELDS)} | {"model_version", "person", "name"}
    return [(c, CLASSIFICATION if pa.types.is_string(schema.field(c).type) else REGRESSION) for c in columns
            if c not in fixed and not c.endswith("_score") and f"{c}_score" in columns]


# ------------------------------------------------------------------ one part, in a task


def _photo_ids(t: pa.Table) -> np.ndarray:
    """A number per photo (per video frame) of a part's rows: exclusivity is per photo."""
    keys = [t.column("image_uri")]
    if "frame_index" in t.column_names:
        keys.append(pc.cast(pc.fill_null(t.column("frame_index"), -1), pa.string()))
    joined = pc.binary_join_element_wise(*keys, "\x1f") if len(keys) > 1 else keys[0]
    return np.asarray(pc.dictionary_encode(joined).combine_chunks().indices.to_numpy(zero_copy_only=False), np.int64)


def _predict(t: pa.Table, bundle, forgotten: set[str]) -> tuple[dict, np.ndarray]:  # noqa: ANN001
    """The bundle's (labels, scores) per task on the part's faces with an embedding, and
    which rows those are.  Forgotten names a bundle still knows come out ``unknown``."""
    from pipeline.table import embedding_matrix

    has = pc.is_valid(t.column("embedding"))
    if "status" in t.column_names:
        has = pc.and_(has, pc.equal(t.column("status"), "ok"))
    rows = np.flatnonzero(np.asarray(pc.fill_null(has, False).to_numpy(zero_copy_only=False), bool))
    if not len(rows):
        return {}, rows
    f = t.take(pa.array(rows))
    emb = embedding_matrix(f.column("embedding"))
    ids = _photo_ids(f)
    preds = bundle.predict(emb, ids)
    if "track_id" in f.column_names and f.column("track_id").null_count < f.num_rows:
        preds = _per_track(f, ids, bundle, preds, emb)
    for s in bundle.specs:
        if s.kind == CLASSIFICATION and forgotten:
            lab, score = preds[s.name]
            gone = np.isin(lab.astype(object), list(forgotten))
            if gone.any():
                lab = lab.copy()
                lab[gone] = UNKNOWN
                preds[s.name] = (lab, score)
    return preds, rows


def _per_track(f: pa.Table, ids: np.ndarray, bundle, preds: dict, emb: np.ndarray) -> dict:  # noqa: ANN001
    """Video faces: identities per track, as scoring decides them (``video.decide_tracks``),
    on the part's frames rebuilt as the photo rows it takes."""
    from pipeline.video import decide_tracks

    order = np.argsort(ids, kind="stable")
    if not (order == np.arange(len(order))).all():   # decide_tracks wants faces photo by photo
        return preds
    counts = np.bincount(ids)
    first = np.r_[0, np.cumsum(counts)[:-1]]
    photos = pa.table({"image_uri": f.column("image_uri").take(pa.array(first)),
                       "face_count": pa.array(counts.astype(np.int32))})
    tracks = np.asarray(pc.fill_null(f.column("track_id"), -1).to_numpy(zero_copy_only=False), np.int64)
    return decide_tracks(photos, tracks, bundle, preds, emb)


def label_part(t: pa.Table, namer, bundle, tasks: list[tuple[str, str]], forgotten: set[str]) -> pa.Table:  # noqa: ANN001
    """One part of the table, labelled: the bundle's task columns (when given) and
    ``person``, ``name``; the schema is the prediction table's for ``tasks`` plus those two."""
    from pipeline.table import prediction_schema

    n = t.num_rows
    if bundle is not None:
        preds, rows = _predict(t, bundle, forgotten)
        cols = {}
        for s in bundle.specs:
            kind = s.kind
            typ = pa.string() if kind == CLASSIFICATION else pa.float32()
            if s.name not in preds:          # no face in this part
                cols[s.name], cols[f"{s.name}_score"] = pa.nulls(n, typ), pa.nulls(n, pa.float32())
                continue
            lab, score = preds[s.name]
            full = np.full(n, None, object) if kind == CLASSIFICATION else np.zeros(n, np.float32)
            full[rows] = lab
            mask = np.ones(n, bool)
            mask[rows] = False
            sc = np.zeros(n, np.float32)
            sc[rows] = score
            cols[s.name] = pa.array(full, typ, mask=mask)
            cols[f"{s.name}_score"] = pa.array(sc, pa.float32(), mask=mask)
        cols["model_version"] = pa.array([bundle.model_version] * n, pa.string())
        for name, col in cols.items():
            if name in t.column_names:
                t = t.set_column(t.column_names.index(name), name, col)
            else:
                t = t.append_column(name, col)
    t = namer(t)
    schema = prediction_schema(tasks)
    fields = [*schema, pa.field("person", pa.string()), pa.field("name", pa.string())]
    missing = [f for f in fields if f.name not in t.column_names]
    for f in missing:
        t = t.append_column(f, pa.nulls(n, f.type))
    return t.select([f.name for f in fields]).cast(pa.schema(fields))


def _decision_keys(state: labels.LabelState) -> pa.Table:
    """Every face the current decisions are about (named or marked ``not``), once each."""
    import pandas as pd

    df = pd.concat([state.named[["image_uri", "face_index"]], state.rejected[["image_uri", "face_index"]]])
    df = df.drop_duplicates()
    return pa.table({"image_uri": pa.array(df.image_uri.astype(object), pa.string()),
                     "face_index": pa.array(df.face_index.to_numpy(np.int32), pa.int32()),
                     "_decision": pa.array(np.arange(len(df), dtype=np.int64))})


def run_part(path: str, number: int, table_uri: str, staged: str, namer, model_uri: str | None,  # noqa: ANN001
             tasks: list[tuple[str, str]], forgotten: set[str], decisions: pa.Table) -> dict:
    """A Ray task: read one part file, label it, write it to the staging folder; its counts
    and which logged faces it holds."""
    fs, _ = storage.resolve(table_uri)
    t = pq.read_table(path, filesystem=fs)
    bundle = None
    if model_uri:
        import torch

        torch.set_num_threads(1)   # one task per core
        bundle = _bundle(model_uri)
    out = label_part(t, namer, bundle, tasks, forgotten)
    out_fs, _ = storage.resolve(staged)
    storage.put_parquet(out_fs, f"{storage.resolve(staged)[1]}/_{number:05d}.parquet", out)  # hidden name in a hidden folder
    face = pc.is_valid(out.column("face_index"))
    found = np.zeros(0, np.int64)
    if decisions.num_rows:
        keys = out.select(["image_uri", "face_index"]).cast(pa.schema([("image_uri", pa.string()),
                                                                        ("face_index", pa.int32())]))
        found = keys.join(decisions, keys=["image_uri", "face_index"], join_type="inner").column("_decision").to_numpy()
    names = out.filter(pc.is_valid(out.column("name"))).group_by("name").aggregate([("name", "count")])
    unknown = {}
    for name, kind in (bundle.tasks if bundle is not None else []):
        if kind == CLASSIFICATION and any(s.name == name and s.open_set for s in bundle.specs):
            unknown[name] = int(pc.sum(pc.equal(out.column(name), UNKNOWN).cast(pa.int64())).as_py() or 0)
    faces = int(pc.sum(face.cast(pa.int64())).as_py() or 0)
    return {"rows": out.num_rows, "faces": faces, "found": found,
            "persons": pc.unique(out.column("person").drop_null()).to_pylist(),
            "names": dict(zip(names.column("name").to_pylist(), names.column("name_count").to_pylist())),
            "unknown": unknown}


_BUNDLES: dict[str, object] = {}


def _bundle(model_uri: str):
    """One loaded bundle per worker process (tasks reuse their worker)."""
    if model_uri not in _BUNDLES:
        from pipeline.heads import ModelBundle

        _BUNDLES[model_uri] = ModelBundle.load(model_uri)
    return _BUNDLES[model_uri]


# ------------------------------------------------------------------ the job


def _same_place(a: str, b: str) -> bool:
    fa, pa_ = storage.resolve(a)
    fb, pb = storage.resolve(b)
    return type(fa) is type(fb) and pa_.rstrip("/") == pb.rstrip("/")


def commit(output_uri: str, staged_dir: str, names: list[str], run: str) -> list[str]:
    """Move the staged part files into the output, then remove the previous ones (and any
    staging left by a killed run); a Ctrl-C waits.  The output's new file names."""
    fs, out = storage.resolve(output_uri)
    _, old = storage.table_files(output_uri)
    new = []
    with stopping.deferred():
        for i, name in enumerate(sorted(names)):
            dest = f"{out}/part-{run}-{i:05d}.parquet"
            fs.move(f"{staged_dir}/{name}", dest)
            new.append(dest)
        for p in old:
            fs.delete_file(p)
        for info in fs.get_file_info(pafs.FileSelector(out, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith(STAGING):
                fs.delete_dir(info.path)
    return new


def _gather(refs: list, started: float, every: float, log: Callable[[str], None]) -> list[dict]:
    """The tasks' results in order, with a progress line every ``every`` seconds."""
    import ray

    from pipeline.progress import fmt_duration

    done: dict = {}
    pending = list(refs)
    last = time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(every, 1.0))
        for r in ready:
            done[r] = ray.get(r)
        now = time.monotonic()
        if now - last >= every or not pending:
            last = now
            rows = sum(d["rows"] for d in done.values())
            faces = sum(d["faces"] for d in done.values())
            spent = now - started
            eta = spent * (len(refs) - len(done)) / len(done) if done else None
            log(f"label_table: {len(done)}/{len(refs)} part files ({100 * len(done) / len(refs):.0f}%) "
                f"[{fmt_duration(spent)}] | {rows:,} rows, {faces:,} faces | {rows / spent:,.0f} rows/s | "
                f"ETA {fmt_duration(eta)}")
    return [done[r] for r in refs]


@dataclass
class Plan:
    """What ``run`` needs, checked (``prepare``) before Ray starts and before anything is written."""
    table_uri: str
    output_uri: str
    files: list[str]
    tasks: list[tuple[str, str]]
    state: labels.LabelState
    namer: object
    decisions: pa.Table
    model_uri: str | None = None
    model_version: str | None = None
    model_tasks: list[str] = field(default_factory=list)
    people_uri: str | None = None
    labels_uri: str | None = None


def prepare(table_uri: str, output_uri: str, people_uri: str | None = None, labels_uri: str | None = None,
            model_uri: str | None = None, log: Callable[[str], None] = print) -> Plan:
    """Every check of the job (``LabelTableError``/``LabelsError``: one line, exit 2)."""
    from pipeline.people import read_people
    from pipeline.people.names import Namer

    fs, files = storage.table_files(table_uri)
    if not files:
        raise LabelTableError(f"--table {table_uri}: no Parquet files (is it a score_directory.py output?)")
    schema = pq.read_schema(files[0], filesystem=fs)
    columns = schema.names
    if "embedding" not in columns or "face_index" not in columns:
        raise LabelTableError(f"--table {table_uri}: not a prediction table (no embedding/face_index column)")
    if _same_place(table_uri, output_uri):
        raise LabelTableError("--output must differ from --table (the prediction table stays as score_directory wrote it)")
    bundle = frozen_bundle(model_uri, columns) if model_uri else None
    tasks = output_tasks(schema, bundle)
    if bundle is not None:
        log(f"model {model_uri}: version {bundle.model_version}, tasks {[t for t, _ in bundle.tasks]}")
    state = labels.load(labels_uri)
    people = None
    if people_uri:
        people = read_people(people_uri)
        if people is None:
            raise LabelTableError(f"--people {people_uri}: no people table there (a cluster_faces.py output)")
    storage.check_writable(output_uri)
    return Plan(table_uri, output_uri, files, tasks, state, Namer(people, state), _decision_keys(state), model_uri,
                bundle.model_version if bundle else None, [t for t, _ in bundle.tasks] if bundle else [],
                people_uri, labels_uri)


def label_table(table_uri: str, output_uri: str, people_uri: str | None = None, labels_uri: str | None = None,
                model_uri: str | None = None, log: Callable[[str], None] = print,
                progress_every: float | None = None) -> LabelSummary:
    """The whole job: ``prepare`` then ``run``."""
    return run(prepare(table_uri, output_uri, people_uri, labels_uri, model_uri, log), log, progress_every)


def run(plan: Plan, log: Callable[[str], None] = print, progress_every: float | None = None) -> LabelSummary:
    """Label every part file in a Ray task, check every logged face was found, then put the
    new part files in place (see the module docstring)."""
    import ray

    from pipeline import progress

    started = time.monotonic()
    table_uri, output_uri, files, state = plan.table_uri, plan.output_uri, plan.files, plan.state
    people_uri, labels_uri, model_uri, tasks = plan.people_uri, plan.labels_uri, plan.model_uri, plan.tasks
    namer, decisions = plan.namer, plan.decisions
    summary = LabelSummary(output=output_uri, model_version=plan.model_version, tasks=plan.model_tasks,
                           log_rows=state.rows)
    run_id = progress.new_run_id()
    out_fs, out_path = storage.resolve(output_uri)
    staged_dir = f"{out_path}/{STAGING}{run_id}"
    out_fs.create_dir(staged_dir, recursive=True)
    staged = output_uri.rstrip("/") + f"/{STAGING}{run_id}"
    log(f"labelling {len(files)} part files of {table_uri}"
        + (f" with people {people_uri}" if people_uri else "")
        + (f", labels {labels_uri} ({state.rows} rows, {len(state.named)} named faces)" if labels_uri else ""))
    task = ray.remote(num_cpus=1, max_retries=2)(run_part)
    shared = ray.put(namer), ray.put(decisions)
    try:
        refs = [task.remote(p, i, table_uri, staged, shared[0], model_uri, tasks, state.forgotten, shared[1])
                for i, p in enumerate(files)]
        results = _gather(refs, started, progress_every or progress.DEFAULT_EVERY_S, log)
        found = np.unique(np.concatenate([r["found"] for r in results])) if results else np.zeros(0, np.int64)
        if len(found) < decisions.num_rows:
            lost = decisions.filter(pc.invert(pc.is_in(decisions.column("_decision"), pa.array(found, pa.int64()))))
            u, i = lost.column("image_uri")[0].as_py(), lost.column("face_index")[0].as_py()
            raise LabelTableError(f"--labels {labels_uri}: {lost.num_rows} decided face(s) not in {table_uri} "
                                  f"(e.g. {u} face {i}): the log belongs to another table?")
        new = commit(output_uri, staged_dir, [f"_{i:05d}.parquet" for i in range(len(files))], run_id)
    except BaseException:
        try:
            out_fs.delete_dir(staged_dir)
        except OSError:
            pass
        raise
    summary.files = len(new)
    summary.rows = sum(r["rows"] for r in results)
    summary.faces = sum(r["faces"] for r in results)
    persons: set[str] = set()
    for r in results:
        persons.update(r["persons"])
        for n, c in r["names"].items():
            summary.names[n] = summary.names.get(n, 0) + c
        for t, c in r["unknown"].items():
            summary.unknown[t] = summary.unknown.get(t, 0) + c
    summary.people = len(persons)
    summary.named_faces = sum(summary.names.values())
    summary.seconds = time.monotonic() - started
    return summary
