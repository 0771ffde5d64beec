"""The prediction table: one row per face or per faceless photo, with the contract's types."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import table


def _photos() -> pa.Table:
    chips = np.arange(2 * 128 * 128 * 3, dtype=np.uint32).astype(np.uint8).tobytes()
    return table.photo_table([
        dict(image_uri="s3://b/two.jpg", status="ok", error=None, width=640, height=480, face_count=2,
             boxes=[1, 2, 3, 4, 10, 20, 30, 40], landmarks=list(range(20)), scores=[0.9, 0.7], chips=chips),
        dict(image_uri="s3://b/cat.jpg", status="no_face", error=None, width=100, height=80, face_count=0,
             boxes=[], landmarks=[], scores=[], chips=b""),
        dict(image_uri="s3://b/bad.jpg", status="decode_error", error="truncated", width=None, height=None,
             face_count=0, boxes=[], landmarks=[], scores=[], chips=b""),
    ])


def test_chips_roundtrip_in_face_order():
    chips = table.photo_chips(_photos(), 128)
    assert chips.shape == (2, 128, 128, 3) and chips.dtype == np.uint8
    assert chips[1, 0, 0, 0] == (128 * 128 * 3) % 256


def test_face_rows_explode_and_keep_every_photo(tmp_path):
    emb = np.eye(2, 128, dtype=np.float32)
    preds = {"identity": (np.array(["ann", "unknown"], object), np.array([0.8, 0.1], np.float32)),
             "age": (np.array([31.5, 40.0], np.float32), np.array([0.5, 0.5], np.float32))}
    tasks = [("identity", "classification"), ("age", "regression")]
    t = table.face_rows(_photos(), emb, preds, tasks, "abc123")
    assert t.schema.equals(table.prediction_schema(tasks))
    rows = t.to_pylist()
    assert [r["image_uri"] for r in rows] == ["s3://b/two.jpg", "s3://b/two.jpg", "s3://b/cat.jpg", "s3://b/bad.jpg"]
    assert [r["face_index"] for r in rows] == [0, 1, None, None]
    assert rows[1]["bbox"] == {"x": 10, "y": 20, "w": 30, "h": 40}
    assert rows[1]["landmarks"] == list(range(10, 20))
    assert rows[0]["embedding"][0] == 1 and rows[1]["embedding"][1] == 1
    assert rows[1]["identity"] == "unknown" and rows[0]["age"] == 31.5
    assert rows[2]["bbox"] is None and rows[2]["embedding"] is None and rows[2]["identity"] is None
    assert rows[3]["error"] == "truncated" and rows[3]["width"] is None and rows[3]["face_count"] == 0

    pq.write_table(t, tmp_path / "t.parquet")
    df = pq.read_table(tmp_path / "t.parquet").to_pandas()
    assert str(df["face_count"].dtype) == "int32" and str(df["det_score"].dtype) == "float32"
    assert len(df.loc[0, "embedding"]) == 128


def test_no_model_table_has_no_task_columns():
    t = table.face_rows(_photos(), np.zeros((2, 128), np.float32))
    assert t.column_names[-4:] == ["model_version", "frame_index", "timestamp_s", "track_id"]  # DESIGN.md order
    assert "identity" not in t.column_names
    assert all(t.column(c).null_count == t.num_rows for c in ("frame_index", "timestamp_s", "track_id"))  # photos
    assert t.column("model_version").null_count == t.num_rows
