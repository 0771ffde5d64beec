"""The people job's kNN over several index groups: each query shard's IVF lists assigned
once and shared by every group (``knn._assign``), against every group assigning each
query again, side by side in one run on the same table and the same Ray.

    python benchmarks/knn_groups.py [--table /tmp/faceray_people_bench/synthetic_3000000] [--num-cpus 2]

The table is one of ``benchmarks/people.py --scale N``'s synthetic tables (written there
first).  Both runs read it with the people job's reader tasks, search with its settings
(k 32, nprobe ``spread.NPROBE``, groups of ``knn.SHARD_DB_ROWS`` faces) and keep its
edges (``graph.shard_edges``, fixed rule); the edge counts must agree.  Reported: wall and
the CPU seconds of the Ray workers (``ray.util.state`` is not needed: /proc of the tree).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for _k, _v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402


def tree_cpu(root: int) -> float:
    """CPU seconds (user + sys) of ``root``'s descendants now alive (the Ray workers)."""
    from benchmarks.people import PeakRss

    return sum(cpu for p, (_, cpu) in PeakRss._tree(root).items() if p != root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(Path(tempfile.gettempdir()) / "faceray_people_bench/synthetic_3000000"))
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()
    import ray

    from pipeline import knn
    from pipeline.people.graph import K, THRESHOLD, shard_edges
    from pipeline.people.reading import parquet_files
    from pipeline.people.spread import NPROBE, _count_edges, _read_file, _remote
    from pipeline.runtime import init_ray, stop_ray

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    _, files = parquet_files(args.table)
    if not files:
        raise SystemExit(f"{args.table}: no Parquet files (write it with benchmarks/people.py --scale N)")
    started = init_ray(None, args.num_cpus, torch_first=False)
    try:
        read = _remote(_read_file, 6)
        shards = [read.remote(args.table, f, 0.0, None) for f in files]
        counts = np.asarray(ray.get([s[5] for s in shards]), np.int64)
        xs, todos = [s[1] for s in shards], [s[2] for s in shards]
        bounds = np.r_[0, np.cumsum(counts)]
        print(f"{int(counts.sum())} faces in {len(files)} files; groups of ≤ {knn.SHARD_DB_ROWS} faces, "
              f"k {K + 1}, nprobe {NPROBE}")
        finish = partial(shard_edges, threshold=THRESHOLD, rule="fixed")
        for preassign in (False, True):
            cpu0, t0 = tree_cpu(os.getpid()), time.monotonic()
            refs, note = knn.topk_refs(xs, todos, bounds, K + 1, finish, nprobe=NPROBE, preassign=preassign)
            edges = int(sum(ray.get([_remote(_count_edges).remote(e) for e in refs])))
            wall, cpu = time.monotonic() - t0, tree_cpu(os.getpid()) - cpu0
            del refs
            what = "lists assigned once per query shard" if preassign else "each group assigns every query"
            print(f"{what:40s}: wall {wall:7.1f} s, workers' CPU {cpu:7.0f} s, {edges} edges ({note})")
    finally:
        if started:
            stop_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())
