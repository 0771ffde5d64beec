"""Labelled photo sets (DESIGN.md "Labelled data layouts") → one manifest Arrow table.

The manifest has ``image_uri``, ``size`` and one column per task: string for
classification, float32 for regression, null where a photo has no label for that task.
Training never looks at the layout again, so a new layout is one reader here.

* ``folders``: ``<root>/<label>/<image>`` — one classification task named by ``task``
  (default ``identity``).  Images directly under ``<root>`` or deeper than one folder
  level are labelled by their first folder; images at the root are counted as skipped.
* ``csv``: ``<root>/index.csv`` with ``path`` (relative to root) and one column per task.
  A column whose non-empty cells all parse as numbers is a regression task, otherwise
  classification (labels kept as text).  Empty cells are missing labels.
* ``utk``: UTKFace names ``<age>_<gender>_<race>_<date>.jpg[.chip.jpg]`` → ``age``
  (regression, years), ``gender`` (``male``/``female`` for 0/1) and ``race``
  (``white``, ``black``, ``asian``, ``indian``, ``others`` for 0..4).  Names that do not
  parse are counted as skipped.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.contract import CLASSIFICATION, REGRESSION, UsageError

LAYOUTS = ("folders", "csv", "utk")
UTK_GENDERS = ("male", "female")
UTK_RACES = ("white", "black", "asian", "indian", "others")
_UTK_NAME = re.compile(r"^(\d{1,3})_(\d)_(\d)_(\d+)\.jpg(\.chip\.jpg)?$", re.IGNORECASE)


@dataclass
class LabelledSet:
    """A manifest (image_uri, size, <task>...) and what each task is."""

    uri: str
    layout: str
    table: pa.Table
    tasks: list[tuple[str, str]]
    skipped: dict[str, int] = field(default_factory=dict)   # reason → count of files ignored

    def label_counts(self, task: str) -> dict[str, int]:
        col = self.table.column(task)
        vc = pc.value_counts(col.drop_null()).to_pylist()
        return {d["values"]: d["counts"] for d in vc}


def read_labelled(uri: str, layout: str = "folders", task: str | None = None) -> LabelledSet:
    """Read a labelled set; ``task`` names the folders task, or selects csv/utk tasks (comma list)."""
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    reader = {"folders": _folders, "csv": _csv, "utk": _utk}[layout]
    ls = reader(uri, task)
    if layout != "folders" and task:
        wanted = [t.strip() for t in task.split(",") if t.strip()]
        names = [n for n, _ in ls.tasks]
        missing = [t for t in wanted if t not in names]
        if missing:
            raise UsageError(f"--task {','.join(missing)} not in {uri} (tasks there: {', '.join(names)})")
        ls.tasks = [t for t in ls.tasks if t[0] in wanted]
        ls.table = ls.table.select(["image_uri", "size", *wanted])
    if ls.table.num_rows == 0:
        raise UsageError(f"no labelled images found in {uri} (layout {layout})")
    return ls


def _folders(uri: str, task: str | None) -> LabelledSet:
    name = task or "identity"
    manifest = storage.list_images(uri)
    root = storage.path_of(_listing_root(uri)).rstrip("/") + "/"
    labels, keep = [], []
    skipped = 0
    for i, u in enumerate(manifest.column("image_uri").to_pylist()):
        rel = storage.path_of(u)[len(root):] if storage.path_of(u).startswith(root) else ""
        parts = rel.split("/")
        if len(parts) < 2:
            skipped += 1
            continue
        labels.append(parts[0])
        keep.append(i)
    t = manifest.take(pa.array(keep, pa.int64())).append_column(name, pa.array(labels, pa.string()))
    return LabelledSet(uri, "folders", t, [(name, CLASSIFICATION)],
                       {"image outside a label folder": skipped} if skipped else {})


def _listing_root(uri: str) -> str:
    """The root as list_images spells its URIs (s3://… or an absolute local path)."""
    fs, path = storage.resolve(uri)
    return f"s3://{path}" if storage.is_s3(uri) else path


def _csv(uri: str, task: str | None) -> LabelledSet:
    import pyarrow.csv as pacsv

    fs, root = storage.resolve(uri)
    index = f"{root}/index.csv"
    try:
        with fs.open_input_stream(index) as f:
            data = f.read()
    except (FileNotFoundError, OSError) as exc:
        raise UsageError(f"csv layout needs {uri.rstrip('/')}/index.csv: {exc}") from None
    # Everything as text first: numeric detection is ours (empty cells → null either way).
    header = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(block_size=1 << 20)).column_names
    raw = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header}, strings_can_be_null=True))
    if "path" not in raw.column_names:
        raise UsageError(f"{uri}/index.csv has no 'path' column (columns: {', '.join(raw.column_names)})")
    task_cols = [c for c in raw.column_names if c != "path"]
    if not task_cols:
        raise UsageError(f"{uri}/index.csv has no label columns besides 'path'")
    base = _listing_root(uri).rstrip("/")
    paths = raw.column("path").to_pylist()
    ok = [i for i, p in enumerate(paths) if p and p.strip()]
    uris = [f"{base}/{paths[i].strip().lstrip('/')}" for i in ok]
    sizes = _sizes(fs, uris)
    present = [j for j, s in enumerate(sizes) if s is not None]
    cols: dict[str, pa.Array] = {
        "image_uri": pa.array([uris[j] for j in present], pa.string()),
        "size": pa.array([sizes[j] for j in present], pa.int64()),
    }
    tasks = []
    for c in task_cols:
        vals = raw.column(c).take(pa.array([ok[j] for j in present], pa.int64())).to_pylist()
        vals = [v.strip() if isinstance(v, str) and v.strip() else None for v in vals]
        if all(v is None for v in vals):
            continue
        if all(v is None or _is_number(v) for v in vals):
            cols[c] = pa.array([float(v) if v is not None else None for v in vals], pa.float32())
            tasks.append((c, REGRESSION))
        else:
            cols[c] = pa.array(vals, pa.string())
            tasks.append((c, CLASSIFICATION))
    skipped = {}
    if len(paths) - len(ok):
        skipped["row without a path"] = len(paths) - len(ok)
    if len(ok) - len(present):
        skipped["listed file missing"] = len(ok) - len(present)
    return LabelledSet(uri, "csv", pa.table(cols), tasks, skipped)


def _is_number(v: str) -> bool:
    try:
        return np.isfinite(float(v))
    except ValueError:
        return False


def _sizes(fs, uris: list[str]) -> list[int | None]:
    import pyarrow.fs as pafs

    out: list[int | None] = []
    chunk = 1000
    for i in range(0, len(uris), chunk):
        infos = fs.get_file_info([storage.path_of(u) for u in uris[i:i + chunk]])
        out.extend(inf.size if inf.type == pafs.FileType.File else None for inf in infos)
    return out


def parse_utk_name(name: str) -> tuple[float, str, str] | None:
    """(age, gender, race) from a UTKFace file name, or None when it does not parse."""
    m = _UTK_NAME.match(name)
    if not m:
        return None
    age, g, r = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if g > 1 or r > 4 or age > 130:
        return None
    return float(age), UTK_GENDERS[g], UTK_RACES[r]


def _utk(uri: str, task: str | None) -> LabelledSet:
    manifest = storage.list_images(uri)
    ages, genders, races, keep = [], [], [], []
    for i, u in enumerate(manifest.column("image_uri").to_pylist()):
        p = parse_utk_name(os.path.basename(u))
        if p is None:
            continue
        keep.append(i)
        ages.append(p[0]), genders.append(p[1]), races.append(p[2])
    t = manifest.take(pa.array(keep, pa.int64()))
    t = t.append_column("age", pa.array(ages, pa.float32()))
    t = t.append_column("gender", pa.array(genders, pa.string()))
    t = t.append_column("race", pa.array(races, pa.string()))
    bad = manifest.num_rows - len(keep)
    return LabelledSet(uri, "utk", t, [("age", REGRESSION), ("gender", CLASSIFICATION), ("race", CLASSIFICATION)],
                       {"name not <age>_<gender>_<race>_<date>.jpg": bad} if bad else {})
