"""label_table.py --model (a bundle on the stored embeddings) vs score_directory.py --model
(the photos decoded, detected and embedded again): the saving, as a ratio.

    python benchmarks/label_table.py [--rows 1000000] [--part-rows 10000] [--cpus 2]
                                     [--score-photos 400] [--workdir DIR]

1. A synthetic prediction table of ``--rows`` face rows (128-d unit embeddings around 200
   identities, 1–4 faces per photo, part files of ``--part-rows`` rows as scoring writes
   them), a real bundle written by ``ModelBundle.write`` (identity, 200 names, linear
   head, open set, exclusive per photo), a people table and a labels log naming 1 % of the
   faces.  ``jobs/label_table.py --model`` as a user runs it (its own local Ray of
   ``--cpus`` CPUs, start-up included), then with ``--people --labels`` as well.
2. ``jobs/score_directory.py --model`` (the same kind of bundle, ``--no-attributes``) on
   ``--score-photos`` real portraits; its rows/s scaled to ``--rows`` rows (the work per
   row is what it is; a 10^4-row table's photos take the same per row).
"""
from __future__ import annotations

import argparse
import os
import re
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
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.common import header, portraits  # noqa: E402

IDENTITIES = 200


def write_bundle(out: Path, rng: np.random.Generator, centres: np.ndarray) -> None:
    """A real identity bundle (the bundle writer's format): a linear head whose weights are
    the identities' centres, open-set thresholds, centroids."""
    import torch

    from pipeline.heads import ModelBundle, TaskSpec, build_heads

    names = [f"person {i:03d}" for i in range(len(centres))]
    spec = TaskSpec("identity", "classification", names, open_set=True, exclusive=True, min_prob=0.3, max_dist=0.4)
    heads = build_heads([spec])
    state = heads.state_dict()
    lin = [k for k in state if k.endswith("weight") and state[k].shape == (len(names), 128)]
    if lin:
        state[lin[0]] = torch.from_numpy(centres * 20)
    heads.load_state_dict(state)
    ModelBundle.write(str(out), [spec], heads.state_dict(), {"identity": centres.astype(np.float32)},
                      {"backbone": {"id": "dlib_resnet_v1"}})


def synthetic_table(root: Path, rows: int, part_rows: int, rng: np.random.Generator,
                    centres: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """Part files of a prediction table; (people table, named faces) for the second run."""
    from pipeline.table import prediction_schema

    schema = prediction_schema()
    root.mkdir(parents=True)
    photo = 0
    people_parts, named_parts = [], []
    for n, lo in enumerate(range(0, rows, part_rows)):
        m = min(part_rows, rows - lo)
        per = rng.integers(1, 5, size=m)                       # faces per photo
        counts = []
        while sum(counts) < m:
            counts.append(int(per[len(counts)]))
        counts[-1] -= sum(counts) - m
        face_index = np.concatenate([np.arange(c) for c in counts]).astype(np.int32)
        photo_of = np.repeat(np.arange(photo, photo + len(counts)), counts)
        photo += len(counts)
        who = rng.integers(0, len(centres), size=m)
        emb = centres[who] + rng.normal(scale=0.035, size=(m, 128)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        uris = pa.array([f"s3://archive/photos/{p:08d}.jpg" for p in photo_of])
        cols = {f.name: pa.nulls(m, f.type) for f in schema}
        cols.update(image_uri=uris, status=pa.array(["ok"] * m),
                    face_count=pa.array(np.repeat(counts, counts).astype(np.int32)),
                    face_index=pa.array(face_index),
                    embedding=pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 128).cast(
                        schema.field("embedding").type))
        pq.write_table(pa.Table.from_pydict(cols, schema=schema), root / f"part-{n:05d}.parquet")
        people_parts.append(pa.table({"image_uri": uris, "face_index": pa.array(face_index),
                                      "person": pa.array([f"p{w + 1:06d}" for w in who]),
                                      "person_size": pa.array(np.full(m, 1, np.int32)),
                                      "similarity": pa.array(np.ones(m, np.float32))}))
        pick = rng.random(m) < 0.01
        named_parts.append(pa.table({"image_uri": uris.filter(pa.array(pick)),
                                     "face_index": pa.array(face_index[pick]),
                                     "name": pa.array([f"person {w:03d}" for w in who[pick]])}))
    return pa.concat_tables(people_parts), pa.concat_tables(named_parts)


def run(cmd: list[str]) -> tuple[float, str]:
    print(f"  (load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--part-rows", type=int, default=10_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--score-photos", type=int, default=400)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    header("label_table — a bundle on the stored embeddings vs scoring the photos again")
    from pipeline import labels

    work = Path(args.workdir or tempfile.mkdtemp(prefix="faceray-label-table-"))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(IDENTITIES, 128)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    people, named = synthetic_table(work / "table", args.rows, args.part_rows, rng, centres)
    write_bundle(work / "bundle", rng, centres)
    pq.write_table(people, work / "people.parquet")
    (work / "people").mkdir()
    shutil.move(str(work / "people.parquet"), work / "people" / "part-0.parquet")
    log = str(work / "labels")
    rows = [labels.decisions("name", n, zip(g.image_uri, g.face_index), source="benchmark")
            for n, g in named.to_pandas().groupby("name")]
    labels.append(log, pa.concat_tables(rows))
    files = len(list((work / "table").glob("*.parquet")))
    print(f"synthetic table: {args.rows:,} rows in {files} part files, {named.num_rows:,} named faces "
          f"({time.perf_counter() - t0:.1f} s to make)")

    lt = [str(ROOT / "jobs" / "label_table.py"), "--table", str(work / "table"), "--model", str(work / "bundle"),
          "--num-cpus", str(args.cpus)]
    wall, out = run([*lt, "--output", str(work / "out")])
    rate = re.search(r"throughput:\s+([\d,]+) rows/s over ([\d.]+) s", out)
    print(f"label_table --model:                   {wall:6.1f} s wall (job's own {rate.group(2)} s, "
          f"{rate.group(1)} rows/s, Ray start-up included in wall)")
    wall2, out2 = run([*lt, "--people", str(work / "people"), "--labels", log, "--output", str(work / "out2")])
    rate2 = re.search(r"throughput:\s+([\d,]+) rows/s over ([\d.]+) s", out2)
    print(f"label_table --model --people --labels: {wall2:6.1f} s wall (job's own {rate2.group(2)} s, "
          f"{rate2.group(1)} rows/s)")

    # score_directory --model on real photos: rows/s, scaled
    photos = work / "photos"
    photos.mkdir()
    for f in portraits(args.score_photos):
        (photos / f"{f.parent.name}-{f.name}").symlink_to(f)
    score_bundle = work / "bundle"
    wall3, out3 = run([str(ROOT / "jobs" / "score_directory.py"), "--input", str(photos), "--output",
                       str(work / "scored"), "--model", str(score_bundle), "--no-attributes",
                       "--num-cpus", str(args.cpus)])
    n_rows = pq.ParquetDataset(str(work / "scored")).read(columns=["image_uri"]).num_rows
    m = re.search(r"throughput:\s+([\d.]+) photos/s over ([\d.]+) s", out3)
    steady = float(m.group(2))                    # the job's own scoring time, start-up left out
    score_rate = n_rows / steady
    scaled = args.rows / score_rate
    print(f"score_directory --model:               {wall3:6.1f} s wall for {args.score_photos} photos "
          f"({n_rows} rows; scoring itself {steady:.1f} s): {score_rate:.1f} rows/s → {args.rows:,} rows "
          f"≈ {scaled / 3600:.1f} h (start-up not counted)")
    print(f"saving: label_table --model is {scaled / wall:,.0f}× faster than scoring again "
          f"({wall:.1f} s vs ≈{scaled:,.0f} s for {args.rows:,} rows, {args.cpus} CPUs each)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
