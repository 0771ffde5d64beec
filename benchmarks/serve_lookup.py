"""How fast the endpoint's prediction-table lookups are on a big table (no HTTP, no Ray).

Writes a synthetic table with the contract's schema (``identity`` task, 1000 labels plus
``unknown``, 2 faces per photo on average, embeddings included in the files) as Parquet,
then times ``serve.lookup.PredictionIndex``: load + index build, lookups by URI, by label
(first page and a deep page) and by two filters.

    .venv/bin/python benchmarks/serve_lookup.py --rows 1000000
"""
from __future__ import annotations

import argparse
import platform
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from pipeline import table  # noqa: E402
from serve.lookup import PredictionIndex  # noqa: E402


def synthetic_table(rows: int, labels: int, seed: int = 0) -> pa.Table:
    """``rows`` prediction rows: photos of 0–4 faces, random identities, status mix."""
    rng = np.random.default_rng(seed)
    counts = rng.choice([0, 1, 2, 3, 4], size=rows, p=[0.1, 0.35, 0.3, 0.15, 0.1])
    reps = np.maximum(counts, 1)
    reps = reps[np.cumsum(reps) <= rows]
    counts = counts[: len(reps)]
    n = int(reps.sum())
    photo = np.repeat(np.arange(len(reps)), reps)
    has_face = np.repeat(counts > 0, reps)
    face_index = np.concatenate([np.arange(r) for r in reps])
    names = np.asarray([f"person_{i:04d}" for i in range(labels)] + ["unknown"], dtype=object)
    status = np.where(has_face, "ok", rng.choice(["no_face", "decode_error"], size=n, p=[0.9, 0.1]))
    emb = rng.standard_normal((n, 128)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    fsl = lambda a, w: pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), pa.float32()), w)  # noqa: E731
    cols = {
        "image_uri": pa.array([f"s3://photos/2024/{p // 1000:05d}/img_{p:08d}.jpg" for p in photo]),
        "status": pa.array(status.tolist()),
        "error": pa.array([None] * n, pa.string()),
        "width": pa.array(np.full(n, 1024), pa.int32()),
        "height": pa.array(np.full(n, 768), pa.int32()),
        "face_count": pa.array(np.repeat(counts, reps), pa.int32()),
        "face_index": pa.array(face_index, pa.int32(), mask=~has_face),
        "bbox": pa.StructArray.from_arrays([pa.array(rng.uniform(0, 900, n), pa.float32()) for _ in range(4)],
                                           fields=list(table.BBOX)),
        "landmarks": fsl(rng.uniform(0, 900, (n, 10)), 10),
        "det_score": pa.array(rng.uniform(0.6, 1, n), pa.float32()),
        "embedding": fsl(emb, 128),
        "identity": pa.array(np.where(has_face, names[rng.integers(0, labels + 1, n)], None).tolist(), pa.string()),
        "identity_score": pa.array(rng.uniform(0, 1, n), pa.float32()),
        "model_version": pa.array(["0123456789abcdef"] * n),
        **{f.name: pa.nulls(n, f.type) for f in table.VIDEO_FIELDS},
    }
    return pa.Table.from_arrays(list(cols.values()), schema=table.prediction_schema([("identity", "classification")]))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, repeat: int) -> tuple[float, float]:
    """(median, p99) milliseconds over ``repeat`` calls."""
    ms = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1000)
    return float(np.median(ms)), float(np.percentile(ms, 99))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--files", type=int, default=8, help="Parquet files the table is split into")
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        t = synthetic_table(args.rows, args.labels)
        step = -(-t.num_rows // args.files)
        for i in range(args.files):
            pq.write_table(t.slice(i * step, step), f"{tmp}/part-{i:03d}.parquet")
        print(f"wrote {t.num_rows} rows in {args.files} files in {time.perf_counter() - t0:.1f} s")
        uris = t.column("image_uri").to_pylist()
        del t
        gc.collect()
        rss0 = rss_mb()
        index = PredictionIndex.load(tmp)
        gc.collect()
        print(f"load + index (embeddings left out): {index.load_seconds:.2f} s, {index.num_rows} rows, "
              f"resident memory +{rss_mb() - rss0:.0f} MB")
        rng = np.random.default_rng(1)
        picks = iter([uris[i] for i in rng.integers(0, len(uris), args.repeat * 2)])
        label = iter([f"person_{i:04d}" for i in rng.integers(0, args.labels, args.repeat * 4)])
        cases = {
            "by image_uri": lambda: index.query(image_uri=next(picks)),
            "by identity, first 100": lambda: index.query(filters={"identity": next(label)}, limit=100),
            "by identity, offset 1000": lambda: index.query(filters={"identity": next(label)}, limit=100, offset=1000),
            "by status=decode_error, 100": lambda: index.query(filters={"status": "decode_error"}, limit=100),
            "identity + status, 100": lambda: index.query(filters={"identity": next(label), "status": "ok"}, limit=100),
        }
        for name, fn in cases.items():
            med, p99 = timed(fn, args.repeat)
            print(f"{name:30s} median {med:7.3f} ms  p99 {p99:7.3f} ms")
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}  (python {platform.python_version()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
