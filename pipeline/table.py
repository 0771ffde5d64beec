"""The prediction table (DESIGN.md contract): schema, and photos → one row per face.

Every listed photo yields at least one row: faces give a row each, a photo without a
face or with an error gives one row with its status.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.contract import CLASSIFICATION, EMBEDDING_DIM

BBOX = pa.struct([("x", pa.float32()), ("y", pa.float32()), ("w", pa.float32()), ("h", pa.float32())])

BASE_FIELDS = [
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("face_count", pa.int32(), nullable=False),
    pa.field("face_index", pa.int32()),
    pa.field("bbox", BBOX),
    pa.field("landmarks", pa.list_(pa.float32(), 10)),
    pa.field("det_score", pa.float32()),
    pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
]

# Videos (DESIGN.md): null on photo rows; every table has them, so photos and videos share one schema.
VIDEO_FIELDS = [
    pa.field("frame_index", pa.int32()),
    pa.field("timestamp_s", pa.float32()),
    pa.field("track_id", pa.int32()),
]

# The crop stage's output: one row per photo, faces as flat lists, chips concatenated.
PHOTO_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("face_count", pa.int32()),
    pa.field("boxes", pa.list_(pa.float32())),       # 4 per face: x, y, w, h
    pa.field("landmarks", pa.list_(pa.float32())),   # 10 per face
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("main_face", pa.int32()),               # the face the photo is "of"; null: none
    pa.field("chips", pa.large_binary()),            # face_count × S × S × 3 uint8
    pa.field("frame_index", pa.int32()),             # videos: the frame's number in the source; null: photo
    pa.field("timestamp_s", pa.float32()),           # videos: the frame's time (a segment's start on its
                                                     # no_face / decode_error row)
    pa.field("segment", pa.int32()),                 # videos: the time segment (pipeline/video.py)
])

# Training's view of a photo: its main face only (one row per photo, embedding null
# when the photo has no usable face).
MAIN_FACE_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("face_count", pa.int32()),
    pa.field("main_face", pa.int32()),
    pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
])


def main_face_schema(features: dict[str, int] | None = None, chips: bool = False) -> pa.Schema:
    """``MAIN_FACE_SCHEMA`` plus a ``features_<name>`` column per attribute feature set
    (name → width) that trained heads may read (null with the embedding), and with
    ``chips`` the main face's chip (``chip``: S×S×3 uint8 bytes, for fine-tuning)."""
    extra = [pa.field(f"features_{k}", pa.list_(pa.float32(), d)) for k, d in sorted((features or {}).items())]
    if chips:
        extra.append(pa.field("chip", pa.binary()))
    return pa.schema([*MAIN_FACE_SCHEMA, *extra])


def prediction_schema(tasks: Sequence[tuple[str, str]] = ()) -> pa.Schema:
    """The contract's schema; ``tasks`` are (name, kind) with kind classification|regression."""
    fields = list(BASE_FIELDS)
    for name, kind in tasks:
        fields.append(pa.field(name, pa.string() if kind == CLASSIFICATION else pa.float32()))
        fields.append(pa.field(f"{name}_score", pa.float32()))
    fields.append(pa.field("model_version", pa.string()))
    fields.extend(VIDEO_FIELDS)
    return pa.schema(fields)


def photo_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PHOTO_SCHEMA)


def photo_chips(photos: pa.Table, chip_size: int, main_only: bool = False) -> np.ndarray:
    """All chips of a batch of photos in face order (or each photo's main chip only,
    for the photos that have one) as N×S×S×3 uint8."""
    per_chip = chip_size * chip_size * 3
    blobs = photos.column("chips").to_pylist()
    if main_only:
        mains = photos.column("main_face").to_pylist()
        parts = [np.frombuffer(b, np.uint8, per_chip, m * per_chip) for b, m in zip(blobs, mains) if m is not None]
    else:
        parts = [np.frombuffer(b, np.uint8) for b in blobs if b]
    if not parts:
        return np.zeros((0, chip_size, chip_size, 3), np.uint8)
    return np.concatenate(parts).reshape(-1, chip_size, chip_size, 3)


def main_face_rows(photos: pa.Table, embeddings: np.ndarray,
                   features: dict[str, np.ndarray] | None = None, chips: np.ndarray | None = None) -> pa.Table:
    """One row per photo with its main face's embedding (``embeddings``: one per photo
    whose ``main_face`` is set, in photo order) and, given, its attribute features and
    its chip (``main_face_schema``)."""
    has = _valid(photos.column("main_face"))

    def column(values: np.ndarray, width: int) -> pa.Array:
        mat = np.zeros((photos.num_rows, width), np.float32)
        mat[has] = np.asarray(values, np.float32).reshape(-1, width)
        return pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel(), pa.float32()), width, mask=pa.array(~has))

    feats = dict(sorted((features or {}).items()))
    cols = [photos.column(n) for n in ("image_uri", "status", "error", "face_count", "main_face")]
    arrays = [*cols, column(embeddings, EMBEDDING_DIM), *(column(v, v.shape[1]) for v in feats.values())]
    if chips is not None:
        it = iter(np.asarray(chips, np.uint8))
        arrays.append(pa.array([next(it).tobytes() if h else None for h in has], pa.binary()))
    return pa.Table.from_arrays(arrays, schema=main_face_schema({k: v.shape[1] for k, v in feats.items()},
                                                                chips is not None))


def chip_matrix(col: pa.ChunkedArray | pa.Array, size: int) -> np.ndarray:
    """A ``chip`` column (no nulls) as N×S×S×3 uint8."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.frombuffer(bytearray(b"".join(arr.to_pylist())), np.uint8).reshape(-1, size, size, 3)


def embedding_matrix(col: pa.ChunkedArray | pa.Array, dim: int = EMBEDDING_DIM) -> np.ndarray:
    """A column of embeddings (or ``dim``-wide features; no nulls) as an N×dim float32 matrix."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)


def _valid(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Validity of a column as a numpy bool array."""
    import pyarrow.compute as pc

    return np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), bool)


def face_rows(photos: pa.Table, embeddings: np.ndarray,
              predictions: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
              tasks: Sequence[tuple[str, str]] = (), model_version: str | None = None,
              track_ids: np.ndarray | None = None) -> pa.Table:
    """Explode photo rows into the prediction table: a row per face, or one per faceless photo.

    ``embeddings``, each prediction array and ``track_ids`` (videos: -1 for a photo's
    faces) are in face order (photo by photo).
    """
    counts = np.asarray(photos.column("face_count").to_numpy(zero_copy_only=False), np.int64)
    reps = np.maximum(counts, 1)
    n = int(reps.sum())
    photo_of_row = np.repeat(np.arange(len(counts)), reps)
    has_face = np.repeat(counts > 0, reps)
    face_index = np.concatenate([np.arange(r) for r in reps]) if n else np.zeros(0, np.int64)
    face_pos = np.full(n, -1, np.int64)
    face_pos[has_face] = np.arange(int(counts.sum()))

    def take_photo(name: str) -> pa.Array:
        return photos.column(name).take(pa.array(photo_of_row))

    def per_face(values: np.ndarray, width: int, typ: pa.DataType) -> pa.Array:
        flat = np.zeros((n, width), np.float32)
        flat[has_face] = values.reshape(-1, width)[face_pos[has_face]]
        arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), width)
        return _mask(arr.cast(typ) if typ != arr.type else arr, has_face)

    boxes = _flat(photos, "boxes", 4)
    bbox = pa.StructArray.from_arrays(
        [pa.array(np.where(has_face, _spread(boxes[:, i], face_pos), 0), pa.float32()) for i in range(4)],
        fields=list(BBOX), mask=pa.array(~has_face))
    scores = _flat(photos, "scores", 1)[:, 0]
    cols: dict[str, pa.Array] = {
        "image_uri": take_photo("image_uri"),
        "status": take_photo("status"),
        "error": take_photo("error"),
        "width": take_photo("width"),
        "height": take_photo("height"),
        "face_count": pa.array(counts[photo_of_row], pa.int32()),
        "face_index": pa.array(face_index, pa.int32(), mask=~has_face),
        "bbox": bbox,
        "landmarks": per_face(_flat(photos, "landmarks", 10), 10, pa.list_(pa.float32(), 10)),
        "det_score": pa.array(_spread(scores, face_pos), pa.float32(), mask=~has_face),
        "embedding": per_face(embeddings.astype(np.float32), EMBEDDING_DIM,
                              pa.list_(pa.float32(), EMBEDDING_DIM)),
    }
    for name, kind in tasks:
        labels, conf = (predictions or {})[name]
        if kind == CLASSIFICATION:
            lab = np.empty(n, dtype=object)
            lab[has_face] = np.asarray(labels, dtype=object)[face_pos[has_face]]
            cols[name] = pa.array(lab, pa.string(), mask=~has_face)
        else:
            cols[name] = pa.array(_spread(np.asarray(labels, np.float32), face_pos), pa.float32(), mask=~has_face)
        cols[f"{name}_score"] = pa.array(_spread(np.asarray(conf, np.float32), face_pos), pa.float32(), mask=~has_face)
    cols["model_version"] = pa.array([model_version] * n, pa.string())
    for name in ("frame_index", "timestamp_s"):
        cols[name] = (take_photo(name) if name in photos.schema.names
                      else pa.nulls(n, pa.int32() if name == "frame_index" else pa.float32()))
    if track_ids is None:
        cols["track_id"] = pa.nulls(n, pa.int32())
    else:
        tid = _spread(np.asarray(track_ids, np.int64), face_pos)
        cols["track_id"] = pa.array(tid, pa.int32(), mask=~has_face | (tid < 0))
    return pa.Table.from_arrays(list(cols.values()), schema=prediction_schema(tasks))


def first_rows(t: pa.Table) -> pa.Table:
    """One row per photo of a prediction table (its first face, or its only row)."""
    import pyarrow.compute as pc

    return t.filter(pc.equal(pc.fill_null(t.column("face_index"), 0), 0))


def _flat(photos: pa.Table, name: str, width: int) -> np.ndarray:
    values = photos.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, np.float32).reshape(-1, width)


def _spread(values: np.ndarray, face_pos: np.ndarray) -> np.ndarray:
    """Per-face values placed on the table's rows (0 where the row has no face)."""
    out = np.zeros(len(face_pos), dtype=values.dtype if len(values) else np.float32)
    sel = face_pos >= 0
    out[sel] = values[face_pos[sel]]
    return out


def _mask(arr: pa.Array, valid: np.ndarray) -> pa.Array:
    """Null out the rows without a face (FixedSizeList has no mask argument in from_arrays)."""
    if valid.all():
        return arr
    return pa.FixedSizeListArray.from_arrays(arr.values, arr.type.list_size, mask=pa.array(~valid))
