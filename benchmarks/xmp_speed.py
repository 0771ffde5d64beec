"""XMP sidecars written per second per core (jobs/export_xmp.py), on 10^4 photos.

    python benchmarks/xmp_speed.py [--photos 10000] [--named 0.3] [--cpus 2] [--workdir DIR]

A synthetic prediction table (the export reads only the table, never the photos): N
photos of 4000×3000 with 1–8 faces each (4.5 on average), in part files of 2,000 photos as
the scoring job writes them, and a labels log naming a share of the faces (Latin,
Cyrillic, CJK, names with ``&``).  Measured:

1. one core, in this process: ``export_part`` on every part (read the part, join the
   names, build each packet, write it whole) — new sidecars, then ``--overwrite`` merges
   into those same sidecars; and the packet building alone;
2. the job as a user runs it (``jobs/export_xmp.py`` on a local Ray of ``--cpus`` CPUs),
   wall time including Ray's start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.common import header  # noqa: E402

NAMES = ["Ada Lovelace", "Tom & Jerry", "Пётр Иванов", "王小明", "José Ñúñez", "O'Brien <ob>"]
PART_PHOTOS = 2000


def synthetic_table(root: Path, photos: int, seed: int = 0) -> tuple[str, pa.Table]:
    """Part files of a prediction table (the columns export reads) and its face keys."""
    from pipeline import storage

    rng = np.random.default_rng(seed)
    table = root / "table"
    table.mkdir(parents=True)
    photo_root = root / "photos"
    counts = (np.arange(photos) % 8) + 1
    keys = []
    for part, start in enumerate(range(0, photos, PART_PHOTOS)):
        n = counts[start:start + PART_PHOTOS]
        uris = np.repeat([f"{photo_root}/d{(start + i) // 500:03d}/IMG_{start + i:06d}.jpg" for i in range(len(n))], n)
        idx = np.concatenate([np.arange(k) for k in n]).astype(np.int32)
        m = len(uris)
        w = rng.uniform(60, 600, m).astype(np.float32)
        x = rng.uniform(0, 4000 - 600, m).astype(np.float32)
        y = rng.uniform(0, 3000 - 600, m).astype(np.float32)
        t = pa.table({
            "image_uri": uris, "status": ["ok"] * m, "error": pa.nulls(m, pa.string()),
            "width": pa.array([4000] * m, pa.int32()), "height": pa.array([3000] * m, pa.int32()),
            "face_count": pa.array(np.repeat(n, n), pa.int32()), "face_index": idx,
            "bbox": pa.StructArray.from_arrays([x, y, w, w * 1.2], names=list("xywh")),
            "det_score": rng.uniform(0.6, 1.0, m).astype(np.float32),
            "frame_index": pa.nulls(m, pa.int32()),
        })
        fs, path = storage.resolve(str(table))
        storage.put_parquet(fs, f"{path}/part-bench_{part:04d}.parquet", t)
        keys.append(t.select(["image_uri", "face_index"]))
    (table / "_summary.json").write_text(json.dumps({"job": "score_directory", "input": str(photo_root)}))
    return str(table), pa.concat_tables(keys)


def name_faces(keys: pa.Table, log: str, share: float, seed: int = 1) -> int:
    from pipeline import labels

    rng = np.random.default_rng(seed)
    pick = np.flatnonzero(rng.random(keys.num_rows) < share)
    uris = keys.column("image_uri").to_pylist()
    idx = keys.column("face_index").to_pylist()
    tables = []
    for k, name in enumerate(NAMES):
        faces = [(uris[i], idx[i]) for i in pick[k::len(NAMES)]]
        if faces:
            tables.append(labels.decisions("name", name, faces, author="bench", source="bench"))
    labels.append(log, pa.concat_tables(tables))
    return len(pick)


def one_core(table: str, out: str, named: pa.Table, overwrite: bool) -> tuple[float, float, dict]:
    """(wall s, CPU s of this process, counts) of export_part over every part, in order."""
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.xmp.export import COUNTS, export_part, listing_root, summary_inputs

    _, files = storage.table_files(table)
    uris = []
    for f in files:
        uris += pq.read_table(f, columns=["image_uri"]).column("image_uri").unique().to_pylist()
    root = listing_root(uris, summary_inputs(table))
    totals = dict.fromkeys(COUNTS, 0)
    t0, c0 = time.perf_counter(), time.process_time()
    for f in files:
        res = export_part(f, table, root, out, named, None, overwrite)
        for k, v in res["counts"].items():
            totals[k] += v
    return time.perf_counter() - t0, time.process_time() - c0, totals


def build_only(n: int) -> tuple[float, float]:
    """Packets built per wall second and per CPU second (no file written)."""
    from pipeline.xmp.write import FaceRegion, new_packet

    faces = [[FaceRegion((100.0 * j, 200.0, 300.0, 360.0), NAMES[j % len(NAMES)] if j % 3 == 0 else None)
              for j in range(i % 8 + 1)] for i in range(64)]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        new_packet(4000, 3000, faces[i % 64])
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=10_000)
    p.add_argument("--named", type=float, default=0.3, help="share of faces named in the labels log")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the job's local Ray")
    p.add_argument("--workdir", help="keep the table and sidecars here (default: a temporary folder)")
    args = p.parse_args()
    header("xmp_speed — XMP sidecars written per second per core")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other work on this machine slows every figure)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="xmp-speed-"))
    try:
        table, keys = synthetic_table(work, args.photos)
        log = str(work / "labels")
        n_named = name_faces(keys, log, args.named)
        print(f"table: {args.photos:,} photos, {keys.num_rows:,} faces, {n_named:,} named; "
              f"{(args.photos + PART_PHOTOS - 1) // PART_PHOTOS} part files")
        from pipeline.xmp.export import named_faces

        t0 = time.perf_counter()
        named = named_faces(keys, None, log)
        print(f"names for export (labels log replay + join): {time.perf_counter() - t0:.2f} s")
        rate, cpu_rate = build_only(5000)
        print(f"packet building alone: {rate:,.0f} packets/s wall, {cpu_rate:,.0f} per CPU-second")
        for label, overwrite in (("new sidecars", False), ("--overwrite merges into them", True)):
            secs, cpu, c = one_core(table, str(work / "out"), named, overwrite)
            done = c["written"] + c["merged"]
            print(f"one core, {label}: {done:,} sidecars in {secs:.2f} s = {done / secs:,.0f} sidecars/s wall, "
                  f"{done / cpu:,.0f} per CPU-second ({c['faces']:,} faces, {c['named_faces']:,} named)")
        shutil.rmtree(work / "out")
        cmd = [sys.executable, str(ROOT / "jobs" / "export_xmp.py"), "--table", table, "--output",
               str(work / "out"), "--labels", log, "--num-cpus", str(args.cpus)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            sys.exit(out.stdout[-2000:] + out.stderr[-3000:])
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("time:"))
        print(f"the job, local Ray of {args.cpus} CPUs: {args.photos:,} sidecars, wall {wall:.1f} s with start-up "
              f"(= {args.photos / wall:,.0f}/s, {args.photos / wall / args.cpus:,.0f}/s per core); "
              f"its own summary: {line}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
