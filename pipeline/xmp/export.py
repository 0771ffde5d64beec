"""``jobs/export_xmp.py``'s work: one XMP sidecar per photo with faces, in Ray tasks.

The driver lists the table's part files, works out the listing root (where relative
paths start) and the named faces (people + labels log), then runs one Ray task per part
file: each reads its part's face rows, groups them by photo and writes that photo's
sidecar (``write.new_packet``, or ``write.merge_packet`` into an existing sidecar with
``overwrite``).  A part holds whole photos (the scoring job commits photos whole), so no
two tasks write one sidecar.  Tasks report each finished batch of photos to the job's
progress board; their counts make the summary.
"""
from __future__ import annotations

import json
import posixpath
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.contract import UsageError
from pipeline.xmp.write import FaceRegion, XmpError, merge_packet, new_packet

NAMED_SCHEMA = pa.schema([("image_uri", pa.string()), ("face_index", pa.int32()), ("name", pa.string())])
REPORT_EVERY = 200          # photos per progress report from a task
COUNTS = ("photos", "faces", "named_faces", "written", "merged", "existing", "malformed_existing",
          "below_score", "video_rows", "skipped_no_size")


class ExportError(UsageError):
    """The export cannot run (no table, --beside on S3, …): one line, exit 2."""


@dataclass
class ExportSummary:
    """What the export did (every count, for the printed summary and ``--json``)."""
    table: str
    output: str
    root: str
    parts: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    malformed: list[str] = field(default_factory=list)   # existing sidecars not merged, with why
    seconds: float = 0.0

    def lines(self) -> list[str]:
        c = self.counts
        rate = c["photos"] / self.seconds if self.seconds else 0.0
        out = [f"photos with faces: {c['photos']:,} ({c['faces']:,} faces, {c['named_faces']:,} named) from "
               f"{self.parts} part file(s) of {self.table}",
               f"sidecars written: {c['written']:,} new, {c['merged']:,} merged into existing ones",
               f"existing sidecars left alone: {c['existing']:,}" + (" (--overwrite merges into them)"
                                                                   if c["existing"] else ""),
               f"existing sidecars not XMP (left alone): {c['malformed_existing']:,}",
               f"faces under --min-score: {c['below_score']:,}; video rows skipped: {c['video_rows']:,}; "
               f"photos without a size: {c['skipped_no_size']:,}",
               f"listing root: {self.root}",
               f"time: {self.seconds:.1f} s ({rate:.1f} photos/s)",
               f"output: {self.output}"]
        out += [f"  not XMP: {m}" for m in self.malformed[:10]]
        return out


# ------------------------------------------------------------------ where sidecars go


def summary_inputs(table_uri: str) -> list[str]:
    """The ``--input`` URIs of the scoring runs that wrote a table (its ``_summary*.json``)."""
    fs, path = storage.resolve(table_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError:
        return []
    inputs = []
    for info in infos:
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and name.startswith("_summary") and name.endswith(".json"):
            try:
                with fs.open_input_stream(info.path) as f:
                    value = json.loads(f.read()).get("input")
            except (OSError, ValueError):
                continue
            if isinstance(value, str):
                inputs.append(value)
    return inputs


def _dir_path(uri: str) -> str:
    return storage.path_of(uri).rstrip("/")


def listing_root(uris: list[str], inputs: list[str]) -> str:
    """Where photos' relative paths start: the common folder of the scoring runs' inputs
    when every photo is under it (one run's ``--input``, or the folder above several),
    else the common folder of the photos themselves.  A path in the store (no ``s3://``)."""
    paths = [storage.path_of(u) for u in uris]
    if not paths:
        return ""
    roots = []
    for uri in inputs:
        root = _dir_path(uri) if storage.is_s3(uri) else str(storage.resolve(uri)[1])
        if not any(p == root or p.startswith(root + "/") for p in paths):
            # an input that was a file, or a relative path from elsewhere: its folder, if that fits
            root = posixpath.dirname(root)
        roots.append(root)
    if roots:
        common = posixpath.commonpath(roots) if len(roots) > 1 else roots[0]
        if all(p.startswith(common.rstrip("/") + "/") for p in paths):
            return common.rstrip("/")
    return posixpath.commonpath([posixpath.dirname(p) for p in paths]).rstrip("/")


def sidecar_path(image_uri: str, root: str, out_root: str | None) -> str:
    """``<out_root>/<path under root>.xmp``, or ``<photo>.xmp`` beside it (``out_root`` None)."""
    path = storage.path_of(image_uri)
    if out_root is None:
        return path + ".xmp"
    rel = path[len(root):].lstrip("/") if root and path.startswith(root + "/") else posixpath.basename(path)
    return f"{out_root.rstrip('/')}/{rel}.xmp"


# ------------------------------------------------------------------ names


def named_faces(faces: pa.Table, people_uri: str | None, labels_uri: str | None) -> pa.Table:
    """(image_uri, face_index, name) of every named face of ``faces`` (the table's face
    keys): the labels log's decisions, a face of a named person taking its person's name
    (``pipeline.people.names``, the rule every job shares)."""
    if not people_uri and not labels_uri:
        return NAMED_SCHEMA.empty_table()
    from pipeline import labels
    from pipeline.people import read_people
    from pipeline.people.names import face_names

    people = read_people(people_uri) if people_uri else None
    state = labels.load(labels_uri)
    t = face_names(faces, people, state)
    t = t.filter(pc.is_valid(t.column("name")))
    return t.select(NAMED_SCHEMA.names).cast(NAMED_SCHEMA)


def _face_keys(table_uri: str) -> pa.Table:
    import pyarrow.dataset as pads

    fs, files = storage.table_files(table_uri)
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    flt = pc.is_valid(pc.field("face_index"))
    if "frame_index" in ds.schema.names:
        flt = flt & ~pc.is_valid(pc.field("frame_index"))
    t = ds.to_table(columns=["image_uri", "face_index"], filter=flt)
    return t.cast(pa.schema([("image_uri", pa.string()), ("face_index", pa.int32())]))


# ------------------------------------------------------------------ one part file, in a task


def part_faces(fs: pafs.FileSystem, path: str, min_score: float | None, counts: dict[str, int]) -> pa.Table:
    """A part's photo face rows (status ok, no frame), sorted by photo and face; video rows
    and faces under ``min_score`` counted and left out."""
    schema = pq.read_schema(path, filesystem=fs)
    cols = [c for c in ("image_uri", "status", "face_index", "bbox", "width", "height", "det_score", "frame_index")
            if c in schema.names]
    t = pq.read_table(path, filesystem=fs, columns=cols)
    if "frame_index" in t.column_names:
        video = pc.is_valid(t.column("frame_index"))
        counts["video_rows"] += int(pc.sum(video.cast(pa.int64())).as_py() or 0)
        t = t.filter(pc.invert(video))
    keep = pc.is_valid(t.column("face_index"))
    if "status" in t.column_names:
        keep = pc.and_(keep, pc.equal(t.column("status"), "ok"))
    t = t.filter(keep)
    if min_score is not None and "det_score" in t.column_names:
        low = pc.fill_null(pc.less(t.column("det_score"), min_score), False)
        counts["below_score"] += int(pc.sum(low.cast(pa.int64())).as_py() or 0)
        t = t.filter(pc.invert(low))
    return t.sort_by([("image_uri", "ascending"), ("face_index", "ascending")])


def export_part(part: str, table_uri: str, root: str, output: str | None, named: pa.Table,
                min_score: float | None, overwrite: bool, board=None) -> dict:  # noqa: ANN001
    """Write the sidecars of one part file's photos; the counts, and malformed sidecars."""
    counts = dict.fromkeys(COUNTS, 0)
    malformed: list[str] = []
    fs, _ = storage.resolve(table_uri)
    faces = part_faces(fs, part, min_score, counts)
    names: list[str | None] = [None] * faces.num_rows
    if named.num_rows and faces.num_rows:
        # Acero joins no struct column (bbox): join the keys with their row numbers
        keys = pa.table({"image_uri": faces.column("image_uri").cast(pa.string()),
                         "face_index": faces.column("face_index").cast(pa.int32()),
                         "_row": pa.array(range(faces.num_rows), pa.int64())})
        hit = keys.join(named, keys=["image_uri", "face_index"], join_type="inner")
        for row, name in zip(hit.column("_row").to_pylist(), hit.column("name").to_pylist()):
            names[row] = name
    out_fs, out_root = (storage.resolve(output) if output is not None else (pafs.LocalFileSystem(), None))
    uris = faces.column("image_uri").to_pylist()
    bbox = faces.column("bbox").combine_chunks() if faces.num_rows else None
    boxes = list(zip(*(bbox.field(k).to_pylist() for k in "xywh"))) if bbox is not None else []
    widths, heights = faces.column("width").to_pylist(), faces.column("height").to_pylist()
    made_dirs: set[str] = set()
    reported = [0, 0]   # photos, faces since the last report

    def report(final: bool = False) -> None:
        if board is not None and (final or reported[0] >= REPORT_EVERY) and reported[0]:
            # a key stable across processes: a retried task's reports count once
            board.add.remote(zlib.crc32(f"{part}:{counts['photos']}".encode()), reported[0], reported[1], {})
            reported[0] = reported[1] = 0

    start = 0
    n = len(uris)
    while start < n:
        end = start
        while end < n and uris[end] == uris[start]:
            end += 1
        uri, width, height = uris[start], widths[start], heights[start]
        regions = [FaceRegion(tuple(boxes[i]), names[i]) for i in range(start, end)]
        start = end
        counts["photos"] += 1
        counts["faces"] += len(regions)
        counts["named_faces"] += sum(1 for r in regions if r.name)
        reported[0] += 1
        reported[1] += len(regions)
        if not width or not height:
            counts["skipped_no_size"] += 1
            continue
        target = sidecar_path(uri, root, out_root)
        _write_one(out_fs, target, width, height, regions, overwrite, counts, malformed, made_dirs)
        report()
    report(final=True)
    return {"counts": counts, "malformed": malformed}


def _write_one(fs: pafs.FileSystem, target: str, width: int, height: int, regions: list[FaceRegion],
               overwrite: bool, counts: dict[str, int], malformed: list[str], made_dirs: set[str]) -> None:
    exists = fs.get_file_info(target).type != pafs.FileType.NotFound
    if exists and not overwrite:
        counts["existing"] += 1
        return
    if exists:
        with fs.open_input_stream(target) as f:
            old = f.read()
        try:
            data = merge_packet(old, width, height, regions)
        except XmpError as exc:
            counts["malformed_existing"] += 1
            malformed.append(f"{target}: {exc}")
            return
        counts["merged"] += 1
    else:
        data = new_packet(width, height, regions)
        counts["written"] += 1
    parent = posixpath.dirname(target)
    if parent not in made_dirs and not isinstance(fs, pafs.S3FileSystem):
        fs.create_dir(parent, recursive=True)
        made_dirs.add(parent)
    storage.put_atomic(fs, target, data)


# ------------------------------------------------------------------ the driver


@dataclass
class ExportPlan:
    """What the driver works out before any task runs (every misuse found here, before Ray)."""
    table: str
    output: str | None
    files: list[str]
    photos: int
    root: str
    named: pa.Table


def prepare(table_uri: str, output: str | None, people_uri: str | None = None,
            labels_uri: str | None = None) -> ExportPlan:
    """The part files, the listing root and the named faces; an ``ExportError`` (or another
    ``UsageError``) for a missing table, ``--beside`` on S3, an unwritable output, a bad log."""
    _, files = storage.table_files(table_uri)
    if not files:
        raise ExportError(f"{table_uri}: no Parquet files (is it a score_directory.py output?)")
    keys = _face_keys(table_uri)
    photo_uris = pc.unique(keys.column("image_uri")).to_pylist()
    if output is None and any(storage.is_s3(u) for u in photo_uris[:1]):
        raise ExportError("--beside writes next to the photos of a local folder; these photos are on S3: use --output")
    if output is not None:
        storage.check_writable(output)
    root = listing_root(photo_uris, summary_inputs(table_uri))
    return ExportPlan(table_uri, output, files, len(photo_uris), root, named_faces(keys, people_uri, labels_uri))


def export(plan: ExportPlan, min_score: float | None = None, overwrite: bool = False,
           progress_every: float | None = None, log: Callable[[str], None] = print) -> ExportSummary:
    """Every photo of the plan's table with faces gets a sidecar under its output (or beside
    the photo, output None: local photos only): one Ray task per part file."""
    import ray

    from pipeline import progress

    started = time.monotonic()
    table_uri, output, files, named, root = plan.table, plan.output, plan.files, plan.named, plan.root
    where = output if output is not None else f"beside the photos under {root}"
    summary = ExportSummary(table_uri, where, root, parts=len(files))
    log(f"export_xmp: {plan.photos:,} photos with faces in {len(files)} part file(s), "
        f"{named.num_rows:,} named faces; sidecars {('under ' + output) if output else where}")
    task = ray.remote(num_cpus=1, max_retries=2)(export_part)
    named_ref = ray.put(named)
    run_id = progress.new_run_id()
    with progress.watch("export_xmp", run_id, "sidecars", plan.photos, progress_every, log) as w:
        refs = [task.remote(p, table_uri, root, output, named_ref, min_score, overwrite, w.board) for p in files]
        for ref in refs:
            res = ray.get(ref)
            for k, v in res["counts"].items():
                summary.counts[k] += v
            summary.malformed += res["malformed"]
    summary.seconds = time.monotonic() - started
    return summary

