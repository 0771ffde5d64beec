"""Search at scale: the people job's index (``_index/``, IVF-SQfp16 and IVF-SQ8) as a
replica loads it, against the old way (a replica building an IVF-Flat index from every
embedding), on synthetic tables of 10^6–10^7 faces, side by side in one run.

    python benchmarks/people_search.py [--faces 1000000 10000000] [--queries 1000] [--nprobe 32 64 128 256]

Per size:
1. A synthetic prediction table (``benchmarks.people.Synthetic``: Zipf-sized people whose
   same/different cosines match the LFW pairs), written 500k rows per file, and 1,000
   query faces: new faces of people in the table.  Exact top-10 of each query (faiss
   flat, chunk by chunk) is the ground truth.
2. ``search_index.build_from_table`` on a local Ray (2 CPUs), once per codec: wall of
   the index build.
3. In a fresh process (what a replica does): ``FaceIndex.from_uris`` → load seconds and
   RSS; then each query alone through ``FaceIndex.search`` (1 faiss thread, as a busy
   replica): p50/p99 latency and recall@10 against exact, for each ``--nprobe``.
4. The old way in a fresh process: read every embedding and build IVF-Flat (skipped past
   ``--old-max`` faces, where it needs n × 1 KiB and more).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for _k, _v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402

ROWS_PER_FILE = 500_000


def rss_mib(field: str = "VmRSS") -> float:
    """This process's RSS (``VmHWM``: its peak; unlike ``ru_maxrss`` not inherited over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_table(x_real: np.ndarray, n: int, queries: int, folder: Path) -> None:
    """The table (chunk by chunk, never n×128 floats at once), the queries and their exact top-10."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.people import Synthetic
    from pipeline.knn import merge_topk

    syn = Synthetic(x_real)
    sizes = syn.sizes(n)
    centres = syn.centres(len(sizes))
    starts = np.r_[0, np.cumsum(sizes)]
    qlab = np.random.default_rng(1).choice(len(sizes), queries, p=sizes / n)   # people as often as their faces
    q = syn.faces(centres, qlab)
    best_s, best_i = np.full((queries, 10), -1.0, np.float32), np.full((queries, 10), -1, np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    for part, lo in enumerate(range(0, n, ROWS_PER_FILE)):
        hi = min(n, lo + ROWS_PER_FILE)
        lab = np.searchsorted(starts, np.arange(lo, hi), side="right") - 1
        x = syn.faces(centres, lab)
        flat = faiss.IndexFlatIP(128)
        flat.add(x)
        s, i = flat.search(q, 10)
        best_s, best_i = merge_topk([best_s, s], [best_i, np.where(i >= 0, i + lo, -1)], 10)
        uris = pa.array(np.char.add("s/", np.char.zfill(np.arange(lo, hi).astype(str), 9)).astype(object))
        pq.write_table(pa.table({"image_uri": uris, "status": pa.array(["ok"] * (hi - lo)),
                                 "face_index": pa.array(np.zeros(hi - lo, np.int32)),
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 128)}),
                       folder / f"part-{part:05d}.parquet")
        print(f"  table: {hi}/{n} rows", flush=True)
    np.save(folder.parent / f"queries_{n}.npy", q)
    np.save(folder.parent / f"exact_{n}.npy", best_i)


def build(table: Path, out: Path, codec: str) -> dict:
    import ray

    from pipeline.people import search_index

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.monotonic()
        s = search_index.build_from_table(str(table), str(out), codec)
        return {"kind": s.kind, "nprobe": s.nprobe, "shards": s.shards, "mib": s.bytes / 2**20,
                "seconds": time.monotonic() - t0}
    finally:
        ray.shutdown()


def replica(table: str, out: str, n: int, nprobes: list[int], old: bool) -> dict:
    """In a fresh process: load as a replica does, then one query at a time."""
    import faiss

    from pipeline.people.index import FaceIndex

    base = rss_mib()
    t0 = time.monotonic()
    if not old:
        index = FaceIndex.from_uris(table, out, small=0)      # the _index/ or an error, never a build
    else:
        from pipeline.knn import build_index
        from pipeline.people.reading import read_faces

        faces = read_faces(table)
        index = FaceIndex(build_index(faces.embedding), faces.image_uri, faces.face_index, None, "built")
        del faces
    load_s = time.monotonic() - t0
    loaded = rss_mib()
    peak = rss_mib("VmHWM")
    work = Path(table).parent
    q, exact = np.load(work / f"queries_{n}.npy"), np.load(work / f"exact_{n}.npy")
    faiss.omp_set_num_threads(1)
    ivf = faiss.extract_index_ivf(index.index)
    rows = []
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        lat, rec = [], []
        for qi, e in zip(q, exact):
            t1 = time.perf_counter()
            hits = index.search(qi, k=10)[0]
            lat.append(time.perf_counter() - t1)
            got = {int(u[2:11]) for u, *_ in hits}
            rec.append(len(got & set(e.tolist())) / 10)
        lat = np.asarray(lat) * 1000
        rows.append({"nprobe": nprobe, "p50_ms": float(np.percentile(lat, 50)),
                     "p99_ms": float(np.percentile(lat, 99)), "recall10": float(np.mean(rec))})
    return {"source": index.source, "load_s": load_s, "rss_base_mib": base, "rss_loaded_mib": loaded,
            "peak_mib": peak, "lists": ivf.nlist, "rows": rows}


def in_fresh_process(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--replica", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", nargs="+", type=int, default=[1_000_000, 10_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", nargs="+", type=int, default=[32, 64, 128, 256])
    ap.add_argument("--old-max", type=int, default=2_000_000, help="largest size the old way is measured at")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "faceray_search_bench"))
    ap.add_argument("--tables", nargs="+", help="scored identities (+ unknown) tables for the synthetic model "
                    "(default: benchmarks/people.py's, scored now when missing)")
    ap.add_argument("--replica", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replica:
        table, out, n, nprobes, old = args.replica
        print(json.dumps(replica(table, out, int(n), [int(v) for v in nprobes.split(",")], old == "old")))
        return 0
    from benchmarks.people import load, score_tables

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")
    work = Path(args.work)
    x_real, _ = load(args.tables or score_tables(Path(tempfile.gettempdir()) / "faceray_people_bench"))
    probes = ",".join(map(str, args.nprobe))
    for n in args.faces:
        table = work / f"table_{n}"
        if not (work / f"exact_{n}.npy").exists():
            t0 = time.monotonic()
            make_table(x_real, n, args.queries, table)
            print(f"N={n}: table + exact top-10 of {args.queries} queries: {time.monotonic() - t0:.0f} s")
        ways = []
        for codec in ("fp16", "sq8"):
            out = work / f"people_{n}_{codec}"
            b = build(table, out, codec)
            print(f"N={n}: index {b['kind']} ({b['shards']} shards, {b['mib']:.0f} MiB on disk) built as Ray tasks "
                  f"in {b['seconds']:.1f} s (load average {os.getloadavg()[0]:.1f}); default nprobe {b['nprobe']}",
                  flush=True)
            ways.append(("new", out, f"_index ({b['kind']})"))
        if n <= args.old_max:
            ways.append(("old", out, "old: IVF-Flat built in the replica from every embedding"))
        for way, out, label in ways:
            r = in_fresh_process([str(table), str(out), str(n), probes, way])
            print(f"  {label}: load {r['load_s']:.1f} s, replica RSS {r['rss_loaded_mib']:.0f} MiB "
                  f"(python + faiss alone {r['rss_base_mib']:.0f}, peak {r['peak_mib']:.0f}), {r['lists']} lists")
            for row in r["rows"]:
                print(f"    nprobe {row['nprobe']:>4}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                      f"recall@10 {row['recall10']:.3f}", flush=True)
        if n > args.old_max:
            print(f"  old way skipped at {n} faces: it reads {n * 512 / 2**30:.1f} GiB of floats into the replica "
                  f"and holds them again in the index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
