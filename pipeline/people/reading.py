"""Reading a prediction table's faces and an existing people table."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.contract import UsageError
from pipeline.table import embedding_matrix


class PeopleError(UsageError):
    """The table cannot be clustered (no embeddings, no faces, unreadable): exit 2."""


@dataclass
class Faces:
    """The faces of a table, sorted by (image_uri, face_index)."""
    image_uri: pa.Array
    face_index: np.ndarray          # int32
    embedding: np.ndarray           # float32 N×128, unit rows
    bbox: np.ndarray | None = None  # float32 N×4 (x, y, w, h) in photo pixels

    def __len__(self) -> int:
        return len(self.face_index)


def parquet_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The table's Parquet files (``storage.table_files``), misuse as a ``PeopleError``."""
    try:
        return storage.table_files(uri)
    except storage.StorageError as exc:
        raise PeopleError(str(exc)) from exc


def read_faces(table_uri: str, with_bbox: bool = False) -> Faces:
    """Every face (status ok, with an embedding) of a prediction table."""
    fs, files = parquet_files(table_uri)
    if not files:
        raise PeopleError(f"{table_uri}: no Parquet files (is it a score_directory.py output?)")
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    names = set(ds.schema.names)
    missing = {"image_uri", "face_index", "embedding"} - names
    if missing:
        raise PeopleError(f"{table_uri}: not a prediction table with embeddings (no column "
                          f"{', '.join(sorted(missing))})")
    cols = ["image_uri", "face_index", "embedding"] + (["bbox"] if with_bbox and "bbox" in names else [])
    flt = pc.is_valid(pc.field("embedding")) & pc.is_valid(pc.field("face_index"))
    if "status" in names:
        flt = flt & (pc.field("status") == "ok")
    t = ds.to_table(columns=cols, filter=flt)
    if t.num_rows == 0:
        raise PeopleError(f"{table_uri}: no faces with embeddings (every row lacks a face or an embedding)")
    t = t.sort_by([("image_uri", "ascending"), ("face_index", "ascending")])
    bbox = None
    if "bbox" in t.column_names:
        b = t.column("bbox").combine_chunks()
        bbox = np.stack([b.field(n).to_numpy(zero_copy_only=False) for n in "xywh"], 1).astype(np.float32)
    return Faces(t.column("image_uri").combine_chunks(), t.column("face_index").to_numpy().astype(np.int32),
                 embedding_matrix(t.column("embedding")), bbox)


def read_people(uri: str) -> pa.Table | None:
    """An existing people output (image_uri, face_index, person), or None when there is none."""
    fs, files = parquet_files(uri)
    if not files:
        return None
    t = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["image_uri", "face_index", "person"])
    return t
