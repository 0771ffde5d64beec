"""Writing the people table and its side files under the job's --output."""
from __future__ import annotations

import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import stopping, storage
from pipeline.people.reading import parquet_files

PEOPLE_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()),
    pa.field("face_index", pa.int32()),
    pa.field("person", pa.string()),
    pa.field("person_size", pa.int32()),
    pa.field("similarity", pa.float32()),
    pa.field("name", pa.string()),          # the person's name from the labels log (pipeline/people/names.py)
])
ROWS_PER_FILE = 1_000_000


def write_table(output_uri: str, table: pa.Table) -> list[str]:
    """Write ``part-<run>-NNNNN.parquet`` files, then remove older part files (so a crash
    mid-write leaves the previous people readable, never half of them)."""
    fs, path = storage.resolve(output_uri)
    run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    _, old = parquet_files(output_uri)
    names = []
    with stopping.deferred():  # a Ctrl-C waits: never old and new people side by side
        for n, lo in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_FILE)):
            name = f"part-{run}-{n:05d}.parquet"
            storage.put_parquet(fs, f"{path}/{name}", table.slice(lo, ROWS_PER_FILE))
            names.append(name)
        for p in old:
            fs.delete_file(p)
    return names


def write_text(output_uri: str, name: str, text: str) -> None:
    fs, path = storage.resolve(output_uri)
    storage.put_atomic(fs, f"{path}/{name}", text.encode())


def publish(output_uri: str, moves: list[tuple[str, str]], old: list[str], work: str | None = None) -> None:
    """Put the part files tasks wrote under ``work`` (a ``_work/<run>`` side folder) in place:
    each moved to its ``part-…`` name (paths relative to the output), then the ``old`` files
    (full paths) deleted, a Ctrl-C waiting meanwhile (never old and new people side by side);
    then the side folder goes."""
    fs, path = storage.resolve(output_uri)
    with stopping.deferred():
        for src, dst in moves:
            fs.move(f"{path}/{src}", f"{path}/{dst}")
        for p in old:
            fs.delete_file(p)
    if work is None:
        return
    try:
        fs.delete_dir(f"{path}/{work}")
        if not fs.get_file_info(pafs.FileSelector(f"{path}/_work", allow_not_found=True)):
            fs.delete_dir(f"{path}/_work")
    except OSError:
        pass   # an empty side folder left behind is harmless
