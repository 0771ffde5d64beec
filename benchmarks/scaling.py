"""Scaling of the scoring job on this machine: 1 vs 2 CPUs, 1 vs 2 Ray nodes.

    .venv/bin/python benchmarks/scaling.py [--photos 300]

Same photos (LFW portraits + WIDER group photos) each time; each run is a fresh process
(`jobs/score_directory.py`), its job-reported photos/s compared. Nodes: a real 2-node
cluster in a private namespace (tests/support/cluster_scenario.py, needs root), 1 CPU each,
against 1 node of 1 CPU. Efficiency = speed-up / resource ratio.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from common import group_photos, header, portraits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"throughput:\s+([\d.]+) photos/s over ([\d.]+) s")


def local_run(folder: Path, cpus: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        res = subprocess.run([sys.executable, str(REPO / "jobs/score_directory.py"), "--input", str(folder),
                              "--output", out, "--num-cpus", str(cpus)],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"})
    m = RATE.search(res.stdout)
    return float(m.group(1)), float(m.group(2))


def cluster_run(folder: Path, nodes: int) -> tuple[float, float]:
    from cluster_scenario import run_scenario

    report = run_scenario({"nodes": nodes, "head_cpus": 1, "worker_cpus": 1, "uploads": {"photos": str(folder)},
                           "jobs": [{"entrypoint": ["python", "jobs/score_directory.py", "--input", "s3://cluster/photos",
                                                    "--output", "s3://cluster/out"], "timeout_s": 1800}]})
    m = RATE.search(report["jobs"][0]["output_tail"])
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=300, help="portraits (all group photos are added)")
    p.add_argument("--no-cluster", action="store_true", help="skip the 1 vs 2 node runs")
    args = p.parse_args()
    header("faceray scoring job scaling: CPUs and nodes")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, f in enumerate(portraits(args.photos) + group_photos()):
            shutil.copyfile(f, folder / f"{i:05d}_{f.name}")
        n = len(list(folder.iterdir()))
        print(f"\n{n} photos\n\n| setup | photos/s | job s | speed-up | efficiency |\n|---|---|---|---|---|")
        r1, t1 = local_run(folder, 1)
        r2, t2 = local_run(folder, 2)
        print(f"| 1 node, 1 CPU | {r1:.2f} | {t1:.1f} | 1.00× | – |")
        print(f"| 1 node, 2 CPUs | {r2:.2f} | {t2:.1f} | {r2 / r1:.2f}× | {r2 / r1 / 2:.0%} |")
        if not args.no_cluster:
            c1, s1 = cluster_run(folder, 1)
            c2, s2 = cluster_run(folder, 2)
            print(f"| namespace cluster, 1 node × 1 CPU | {c1:.2f} | {s1:.1f} | 1.00× | – |")
            print(f"| namespace cluster, 2 nodes × 1 CPU | {c2:.2f} | {s2:.1f} | {c2 / c1:.2f}× | {c2 / c1 / 2:.0%} |")


if __name__ == "__main__":
    main()
