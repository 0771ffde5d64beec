"""``jobs/import_xmp.py``'s work: face tags already in the photos' XMP → ``name`` rows.

Ray tasks over chunks of the photo listing read each photo's regions: from its sidecar
(``IMG_1.jpg.xmp``, then ``IMG_1.xmp``, any case) or, when no sidecar has regions, from the
XMP embedded in the photo; MWG regions, else Microsoft Photo's.  A sidecar that does not
parse is a row of the summary, and the photo's other sources are still tried.  The driver
puts each region into the table's frame (``regions.to_oriented``), matches it to the
photo's faces (IoU ≥ 0.5, one to one) and appends the named matches to the labels log in
one file (``source`` ``xmp``).  Regions with no face are written to
``<labels>/_import_unmatched.parquet`` with their box, so the user sees what the detector
missed (a ``_`` name: readers of the log skip it).
"""
from __future__ import annotations

import posixpath
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.contract import UsageError
from pipeline.xmp.read import Region, find_packet, packet_regions, photo_header
from pipeline.xmp.regions import Box, iou_matrix, match, to_oriented
from pipeline.xmp.write import XmpError

CHUNK = 256                 # photos per Ray task
JPEG_HEAD = 1 << 20         # bytes of a JPEG read for its EXIF and XMP (APP segments come first)
UNMATCHED_FILE = "_import_unmatched.parquet"
AUTHOR = "import_xmp"
REGION_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("source", pa.string()), ("form", pa.string()), ("name", pa.string()),
    ("x", pa.float64()), ("y", pa.float64()), ("w", pa.float64()), ("h", pa.float64()),
    ("applied_w", pa.float64()), ("applied_h", pa.float64()), ("orientation", pa.int32()),
    ("photo_w", pa.int32()), ("photo_h", pa.int32()),     # from the photo's header, after orientation
])
UNMATCHED_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("source", pa.string()), ("form", pa.string()), ("name", pa.string()),
    ("bbox", pa.struct([("x", pa.float32()), ("y", pa.float32()), ("w", pa.float32()), ("h", pa.float32())])),
    ("best_iou", pa.float32()), ("reason", pa.string()),
])


class XmpImportError(UsageError):
    """The import cannot run (no photos, no table, …): one line, exit 2."""


@dataclass
class ImportSummary:
    photos: int = 0
    photos_with_regions: int = 0
    regions: int = 0
    matched: int = 0
    unmatched: int = 0
    without_name: int = 0
    not_face_regions: int = 0
    photos_not_in_table: int = 0
    already_named: int = 0
    appended: int = 0
    by_form: dict[str, int] = field(default_factory=dict)
    malformed: list[tuple[str, str]] = field(default_factory=list)
    labels_file: str | None = None
    unmatched_file: str | None = None
    seconds: float = 0.0

    def lines(self) -> list[str]:
        forms = ", ".join(f"{k} {v:,}" for k, v in sorted(self.by_form.items())) or "none"
        out = [f"photos read: {self.photos:,}, {self.photos_with_regions:,} with face regions ({forms})",
               f"regions: {self.regions:,} — matched to a face {self.matched:,}, unmatched {self.unmatched:,}, "
               f"without a name {self.without_name:,}",
               f"photos with regions but not in the table: {self.photos_not_in_table:,}",
               f"other regions skipped (pets, focus, points): {self.not_face_regions:,}",
               f"malformed XMP: {len(self.malformed):,}",
               *[f"  {path}: {why}" for path, why in self.malformed[:20]],
               f"names appended: {self.appended:,} ({self.already_named:,} faces already had that name)",
               f"labels file: {self.labels_file or 'none (nothing new)'}",
               f"unmatched regions: {self.unmatched_file}",
               f"time: {self.seconds:.1f} s"]
        return out


# ------------------------------------------------------------------ listing


def list_sidecars(photos_uri: str) -> dict[str, str]:
    """Every ``.xmp`` file under ``photos_uri``: lower-cased path → path."""
    fs, root = storage.resolve(photos_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        root = posixpath.dirname(root)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path.lower(): i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(".xmp")}


def sidecars_of(path: str, sidecars: dict[str, str]) -> list[str]:
    """A photo's sidecars, its own first: ``X.<ext>.xmp`` (darktable, digiKam), ``X.xmp``
    (Lightroom, digiKam's other choice)."""
    stem = posixpath.splitext(path)[0]
    found = [sidecars.get(c.lower()) for c in (path + ".xmp", stem + ".xmp")]
    return [f for f in dict.fromkeys(found) if f]


# ------------------------------------------------------------------ in a task


def _read_head(fs: pafs.FileSystem, path: str) -> bytes:
    ext = posixpath.splitext(path)[1].lower()
    with fs.open_input_file(path) as f:
        return f.read(JPEG_HEAD) if ext in (".jpg", ".jpeg", ".jpe", ".jfif") else f.read()


def photo_regions(fs: pafs.FileSystem, image_uri: str, sidecars: list[str]
                  ) -> tuple[list[tuple[str, Region]], int, tuple, list[tuple[str, str]]]:
    """(source, region) pairs of one photo, regions skipped, its header (orientation,
    oriented width, height), and the malformed sources (path, why)."""
    path = storage.path_of(image_uri)
    malformed: list[tuple[str, str]] = []
    try:
        data = _read_head(fs, path)
    except OSError as exc:
        malformed.append((image_uri, f"photo not readable: {exc}"))
        data = b""
    head = photo_header(data) if data else (None, None, None)
    for sidecar in sidecars:
        try:
            with fs.open_input_stream(sidecar) as f:
                regions, skipped = packet_regions(f.read())
        except (XmpError, OSError, ValueError) as exc:
            malformed.append((sidecar, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        if regions or skipped:
            return [(sidecar, r) for r in regions], skipped, head, malformed
    packet = find_packet(data) if data else None
    if packet is not None:
        try:
            regions, skipped = packet_regions(packet)
            return [("embedded", r) for r in regions], skipped, head, malformed
        except (XmpError, ValueError) as exc:
            malformed.append((f"{image_uri} (embedded XMP)", str(exc).splitlines()[0]))
    return [], 0, head, malformed


def read_chunk(photos: list[tuple[str, list[str]]], board=None) -> dict:  # noqa: ANN001
    """The regions of a chunk of (photo URI, its sidecars), as ``REGION_SCHEMA`` rows."""
    cols: dict[str, list] = {n: [] for n in REGION_SCHEMA.names}
    skipped_total, malformed = 0, []
    fs = None
    for uri, sidecars in photos:
        if fs is None:
            fs, _ = storage.resolve(uri)
        found, skipped, (rot, pw, ph), bad = photo_regions(fs, uri, sidecars)
        skipped_total += skipped
        malformed += bad
        for source, r in found:
            aw, ah = r.applied or (None, None)
            for k, v in zip(REGION_SCHEMA.names, (uri, source, r.form, r.name, r.box.x, r.box.y, r.box.w, r.box.h,
                                                  aw, ah, rot, pw, ph)):
                cols[k].append(v)
    if board is not None and photos:
        board.add.remote(zlib.crc32(photos[0][0].encode()), len(photos), len(cols["image_uri"]), {})
    return {"regions": pa.table(cols, schema=REGION_SCHEMA), "skipped": skipped_total, "malformed": malformed}


# ------------------------------------------------------------------ the driver


def table_faces(table_uri: str, uris: list[str]) -> tuple[pd.DataFrame, set[str]]:
    """The table's photo faces of ``uris`` (image_uri, face_index, x, y, w, h, width,
    height), and which of ``uris`` the table has at all (with or without a face)."""
    import pyarrow.dataset as pads

    fs, files = storage.table_files(table_uri)
    if not files:
        raise XmpImportError(f"{table_uri}: no Parquet files (is it a score_directory.py output?)")
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    flt = pc.field("image_uri").isin(uris)
    if "frame_index" in ds.schema.names:
        flt = flt & ~pc.is_valid(pc.field("frame_index"))
    t = ds.to_table(columns=["image_uri", "face_index", "bbox", "width", "height"], filter=flt)
    present = set(t.column("image_uri").to_pylist())
    t = t.filter(pc.is_valid(t.column("face_index")))
    df = t.select(["image_uri", "face_index", "width", "height"]).to_pandas()
    b = t.column("bbox").combine_chunks()
    for k in "xywh":
        df[k] = b.field(k).to_numpy(zero_copy_only=False).astype(np.float64)
    return df, present


def _oriented_pixels(row, width: int, height: int) -> np.ndarray:  # noqa: ANN001
    applied = (row.applied_w, row.applied_h) if pd.notna(row.applied_w) and pd.notna(row.applied_h) else None
    rot = int(row.orientation) if pd.notna(row.orientation) else None
    box = to_oriented(Box(row.x, row.y, row.w, row.h), applied, width, height, rot)
    return np.array(box.pixels(width, height))


def match_regions(regions: pd.DataFrame, faces: pd.DataFrame, present: set[str],
                  min_iou: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matched: image_uri, face_index, name; unmatched: ``UNMATCHED_SCHEMA`` columns, the
    box in pixels of the oriented photo: the table's size, else the photo header's)."""
    matched, unmatched = [], []
    by_photo = {uri: g for uri, g in faces.groupby("image_uri", sort=False)}
    for uri, group in regions.groupby("image_uri", sort=False):
        photo = by_photo.get(uri)
        rows = list(group.itertuples())
        if photo is not None:
            width, height = int(photo.width.iloc[0]), int(photo.height.iloc[0])
        else:
            width, height = rows[0].photo_w, rows[0].photo_h
        if pd.isna(width) or pd.isna(height):    # no size anywhere: the box stays normalised
            width = height = 1
        boxes = np.stack([_oriented_pixels(r, int(width), int(height)) for r in rows])
        face_boxes = photo[["x", "y", "w", "h"]].to_numpy() if photo is not None else np.zeros((0, 4))
        pairs = {r: f for r, f, _ in match(boxes, face_boxes, min_iou)}
        best = iou_matrix(boxes, face_boxes).max(axis=1) if len(face_boxes) else np.zeros(len(boxes))
        reason = "no face found there" if uri in present else "photo not in the table"
        for i, r in enumerate(rows):
            if i in pairs:
                matched.append((uri, int(photo.face_index.iloc[pairs[i]]), r.name))
            else:
                unmatched.append((uri, r.source, r.form, r.name, tuple(boxes[i]), float(best[i]), reason))
    return (pd.DataFrame(matched, columns=["image_uri", "face_index", "name"]),
            pd.DataFrame(unmatched, columns=["image_uri", "source", "form", "name", "bbox", "best_iou", "reason"]))


def _unmatched_table(df: pd.DataFrame) -> pa.Table:
    boxes = [dict(zip("xywh", b)) for b in df.bbox] if len(df) else []
    return pa.table({"image_uri": df.image_uri.tolist(), "source": df.source.tolist(), "form": df.form.tolist(),
                     "name": df.name.tolist(), "bbox": boxes, "best_iou": df.best_iou.tolist(),
                     "reason": df.reason.tolist()}, schema=UNMATCHED_SCHEMA)


@dataclass
class ImportPlan:
    """The photos with their sidecars and the log's state, worked out before Ray starts."""
    photos: str
    table: str
    labels: str
    todo: list[tuple[str, list[str]]]
    sidecars: int
    state: object       # labels.LabelState


def prepare(photos_uri: str, table_uri: str, labels_uri: str) -> ImportPlan:
    """The listing and the checks: no photos, a table without Parquet files or an unreadable
    log is a ``UsageError`` here, before any work."""
    from pipeline import labels

    manifest = storage.list_images(photos_uri)
    if manifest.num_rows == 0:
        raise XmpImportError(f"no photos under {photos_uri}")
    if not storage.table_files(table_uri)[1]:
        raise XmpImportError(f"{table_uri}: no Parquet files (is it a score_directory.py output?)")
    state = labels.load(labels_uri)
    sidecars = list_sidecars(photos_uri)
    todo = [(u, sidecars_of(storage.path_of(u), sidecars)) for u in manifest.column("image_uri").to_pylist()]
    return ImportPlan(photos_uri, table_uri, labels_uri, todo, len(sidecars), state)


def import_regions(plan: ImportPlan, min_iou: float = 0.5, progress_every: float | None = None,
                   log: Callable[[str], None] = print) -> ImportSummary:
    """Read every photo's regions in Ray tasks, match them on the driver, append the names."""
    import ray

    from pipeline import labels, progress

    started = time.monotonic()
    summary = ImportSummary()
    todo, table_uri, labels_uri, state = plan.todo, plan.table, plan.labels, plan.state
    summary.photos = len(todo)
    log(f"import_xmp: {len(todo):,} photos, {plan.sidecars:,} sidecars under {plan.photos}")
    task = ray.remote(num_cpus=1, max_retries=2)(read_chunk)
    parts, skipped = [], 0
    with progress.watch("import_xmp", progress.new_run_id(), "photos", len(todo), progress_every, log) as w:
        refs = [task.remote(todo[i:i + CHUNK], w.board) for i in range(0, len(todo), CHUNK)]
        for res in ray.get(refs):
            parts.append(res["regions"])
            skipped += res["skipped"]
            summary.malformed += res["malformed"]
    regions = pa.concat_tables(parts).to_pandas() if parts else REGION_SCHEMA.empty_table().to_pandas()
    summary.not_face_regions = skipped
    summary.regions = len(regions)
    summary.photos_with_regions = regions.image_uri.nunique()
    summary.by_form = dict(Counter(regions.form))
    faces, present = table_faces(table_uri, sorted(set(regions.image_uri)))
    summary.photos_not_in_table = len(set(regions.image_uri) - present)
    matched, unmatched = match_regions(regions, faces, present, min_iou)
    summary.matched, summary.unmatched = len(matched), len(unmatched)
    summary.without_name = int(regions.name.isna().sum())
    rows = _name_rows(matched, state, summary)
    if rows is not None:
        summary.labels_file = labels.append(labels_uri, rows)
    fs, root = storage.resolve(labels_uri)
    fs.create_dir(root, recursive=True)
    storage.put_parquet(fs, f"{root}/{UNMATCHED_FILE}", _unmatched_table(unmatched))
    summary.unmatched_file = f"{labels_uri.rstrip('/')}/{UNMATCHED_FILE} ({len(unmatched):,} rows)"
    summary.seconds = time.monotonic() - started
    return summary


def _name_rows(matched: pd.DataFrame, state, summary: ImportSummary) -> pa.Table | None:  # noqa: ANN001
    """One ``name`` decision per matched, named region that the log does not already hold."""
    from pipeline import labels

    named = matched[matched.name.notna()]
    if named.empty:
        return None
    have = named.merge(state.named, on=["image_uri", "face_index", "name"], how="left", indicator=True)
    new = named[(have["_merge"] == "left_only").to_numpy()]
    summary.already_named = len(named) - len(new)
    tables = []
    for name, group in new.groupby("name", sort=True):
        try:
            tables.append(labels.decisions(labels.NAME, name, zip(group.image_uri, group.face_index),
                                           author=AUTHOR, source="xmp"))
        except labels.LabelsError as exc:
            summary.malformed += [(uri, f"name {name!r}: {exc}") for uri in group.image_uri]
    if not tables:
        return None
    t = pa.concat_tables(tables)
    summary.appended = t.num_rows
    return t
